"""Image logging (TensorBoard, MLflow, W&B: every logger that takes images): inputs vs
reconstructions, and samples from the prior.

Rank zero only. The same validation images and the same random numbers for the prior's draws are
used every epoch, so the grids of successive epochs show the model improving rather than new
draws (with a learned prior, the codes move with it).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from vaelab.errors import require
from vaelab.evaluation.pictures import grid, pair_grid
from vaelab.loggers import image_loggers, log_image_grids


class ImageLogger(L.Callback):
    """Every `every_n_epochs` validation epochs, log `images/reconstructions` (inputs above their
    reconstructions, and the clean targets below when the inputs are corrupted) and
    `images/samples` (means of p(x|z), z ~ p(z) from the model's prior; a conditional model's
    samples in one row per class)."""

    def __init__(self, n_images: int = 16, n_samples: int = 64, every_n_epochs: int = 1) -> None:
        require(n_images >= 1, f"callbacks image n_images must be >= 1, got {n_images}")
        require(n_samples >= 1, f"callbacks image n_samples must be >= 1, got {n_samples}")
        require(every_n_epochs >= 1, f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.n_images = n_images
        self.n_samples = n_samples
        self.every_n_epochs = every_n_epochs
        self.inputs: Tensor | None = None
        self.targets: Tensor | None = None
        self.labels: Tensor | None = None
        self.seed = 0
        self.warned = False

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        if not image_loggers(trainer):
            if not self.warned:
                rank_zero_warn("ImageLogger: no logger that takes images; images are not logged")
                self.warned = True
            return
        model = pl_module.model
        if self.inputs is None:
            batch = next(iter(trainer.datamodule.val_dataloader()))
            inputs, targets, labels = trainer.datamodule.fetch(
                move_data_to_device(batch, pl_module.device)
            )
            inputs, targets = inputs.to(pl_module.dtype), targets.to(pl_module.dtype)  # 64-true
            self.inputs, self.targets = inputs[: self.n_images], targets[: self.n_images]
            self.labels = labels[: self.n_images]
        # The same random numbers every epoch (a learned prior still moves), outside the run's
        # random state.
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            sample_labels = model.sample_labels(self.n_samples)  # a row per class, or None
            given = model.given(sample_labels)
            n = self.n_samples if sample_labels is None else len(sample_labels)
            samples = given.decode(given.sample_codes(n)).mean
            reconstructions = model.given(self.labels).reconstruct(self.inputs)
        nrow = 8 if sample_labels is None else int((sample_labels == sample_labels[0]).sum())
        grids = {
            "images/reconstructions": pair_grid(self.inputs, reconstructions, self.targets),
            "images/samples": grid(samples, nrow=nrow),
        }
        log_image_grids(trainer, grids, trainer.global_step)


def tensorboard_writer(trainer: L.Trainer, what: str | None = None):
    """The SummaryWriter of the trainer's TensorBoard logger, or None (with a warning that
    `what` is not logged, when given)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    if what:
        rank_zero_warn(f"no TensorBoard logger configured; {what} not logged")
    return None

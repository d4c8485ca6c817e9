"""Disentanglement metrics (to every logger) and pictures (traversals to every logger that takes
images; the MI heat map and the traversal GIF to TensorBoard), for data with ground-truth
factors."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import matplotlib.pyplot as plt
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from vaelab.callbacks.images import tensorboard_writer
from vaelab.errors import require
from vaelab.evaluation import disentanglement, pictures
from vaelab.loggers import log_image_grids

log = logging.getLogger(__name__)


class DisentanglementLogger(L.Callback):
    """When training ends (and every `every_n_epochs` validation epochs if set), on the data's
    whole factor grid: `disentanglement/mig`, `dci_disentanglement`, `dci_completeness`,
    `dci_informativeness`, `sap`, `beta_vae_score`, `factor_vae_score` as scalars (so the HParams
    view compares them across a sweep), and `images/factor_mi` (MI heat map),
    `images/traversals` (one row per latent dimension) and `images/traversals_gif` (animated).
    `protocol`: vaelab.evaluation.disentanglement.Protocol's fields (its defaults are
    disentanglement_lib's). Rank zero only; outside the run's random state. Data without factors:
    one warning, nothing logged."""

    def __init__(self, every_n_epochs: int | None = None, protocol: dict[str, Any] | None = None):
        require(
            every_n_epochs is None or (isinstance(every_n_epochs, int) and every_n_epochs >= 1),
            f"disentanglement every_n_epochs must be null or >= 1, got {every_n_epochs}",
        )
        self.every_n_epochs = every_n_epochs
        self.protocol = disentanglement.protocol_from(
            protocol, "callbacks.disentanglement.protocol"
        )
        self.last_step: int | None = None
        self.results: dict[str, float] = {}

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs is None:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.log_report(trainer, pl_module)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_step != trainer.global_step:
            self.log_report(trainer, pl_module)

    def log_report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule.factors is None:
            rank_zero_warn("DisentanglementLogger: the data have no ground-truth factors")
            return
        start = time.perf_counter()
        results, figures = disentanglement.report(
            pl_module.model, datamodule, pl_module.device, self.protocol, progress=log.info
        )
        step = trainer.global_step
        self.results = disentanglement.scalars(results)
        for logger in trainer.loggers:  # every logger takes scalars
            logger.log_metrics(self.results, step)
        log.info(
            "disentanglement (step %d, %d grid images, %.0f s): %s",
            step,
            len(datamodule.factors),
            time.perf_counter() - start,
            ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in self.results.items()),
        )
        log_image_grids(trainer, {"images/traversals": figures["traversals_all"]}, step)
        writer = tensorboard_writer(trainer, "the MI heat map and the traversal GIF are")
        if writer is None:
            plt.close(figures["factor_mi"])
            return
        writer.add_figure("images/factor_mi", figures["factor_mi"], step)
        plt.close(figures["factor_mi"])
        frames = figures["traversal_frames"]
        _, height, width = frames[0].shape
        pictures.add_gif(
            writer, "images/traversals_gif", pictures.gif_bytes(frames), height, width, step
        )
        writer.flush()
        self.last_step = step

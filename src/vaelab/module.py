"""VAEModule: the LightningModule that trains a VAE with an objective.

It receives built objects (Hydra instantiates them): the VAE, the objective, and optimizer and
scheduler factories (`_partial_: true`). One shared step serves every stage and logs
`{stage}/loss`, `{stage}/elbo`, `{stage}/rate`, `{stage}/distortion` in nats per example, and
`{stage}/bpd` (bits per dimension) where the data's pixel model defines it, plus what the
objective adds (`train/beta` for KL schedules, `{stage}/iwae` for IWAE). An objective without an
ELBO (the plain autoencoder) logs only its loss and distortion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vaelab.vae import VAE

Objective = Callable[..., dict[str, Tensor]]  # (vae, inputs, targets, step) -> named parts
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class VAEModule(L.LightningModule):
    def __init__(
        self,
        vae: VAE,
        objective: Objective,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        bpd_offset: float | None = None,
        run_config: dict[str, Any] | None = None,
        eval_seed: int | None = 0,
    ) -> None:
        """`bpd_offset`: from the DataModule (None: no bits per dimension for these data).
        `eval_seed`: validation and test draw their Monte-Carlo samples from this seed (then the
        training random state is restored), so the same checkpoint always gets the same numbers
        and successive validation epochs compare on common random numbers.
        `run_config`: the resolved run config, saved as hyper-parameters, so checkpoints carry
        it and TensorBoard's HParams tab shows it."""
        super().__init__()
        self.vae = vae
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.bpd_offset = bpd_offset
        self.num_dims = math.prod(vae.image_shape)
        self.eval_seed = eval_seed
        self._saved_rng: tuple[Tensor, list[Tensor]] | None = None
        if run_config is not None:
            self.save_hyperparameters(run_config)

    def step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> Tensor:
        inputs, targets, _ = batch  # inputs differ from targets for a denoising autoencoder
        training = stage == "train"
        parts = self.objective(
            self.vae, inputs, targets, step=self.global_step if training else None
        )
        # Training curves are per step, logged only on the steps the logger writes
        # (trainer.log_every_n_steps): each self.log call costs ~0.5 ms of Python, more than a
        # small VAE's step. Validation and test values are means over the whole split (weighted
        # by batch size, reduced across processes).
        if training and self.global_step % self.trainer.log_every_n_steps:
            return parts["loss"]
        metrics = {name: value.mean() for name, value in parts.items()}
        if "beta" in metrics and not training:
            del metrics["beta"]  # the schedule's value is a training quantity (train/beta)
        if self.bpd_offset is not None and "elbo" in metrics:
            nll_per_dim = -metrics["elbo"] / self.num_dims
            metrics["bpd"] = (nll_per_dim + self.bpd_offset) / math.log(2)
        self.log_dict(
            {f"{stage}/{name}": value.detach() for name, value in metrics.items()},
            on_step=training,
            on_epoch=not training,
            sync_dist=not training,
            batch_size=len(inputs),
        )
        return parts["loss"]

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "test")

    def _seed_evaluation(self) -> None:
        if self.eval_seed is None:
            return
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        self._saved_rng = (torch.get_rng_state(), cuda)
        torch.manual_seed(self.eval_seed + self.global_rank)

    def _restore_training_rng(self) -> None:
        if self._saved_rng is not None:
            cpu, cuda = self._saved_rng
            torch.set_rng_state(cpu)
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
            self._saved_rng = None

    def on_validation_epoch_start(self) -> None:
        self._seed_evaluation()

    def on_validation_epoch_end(self) -> None:
        self._restore_training_rng()

    def on_test_epoch_start(self) -> None:
        self._seed_evaluation()

    def on_test_epoch_end(self) -> None:
        self._restore_training_rng()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.scheduler_interval,
                "monitor": "val/elbo",
            },
        }

"""VAEModule: the LightningModule that trains a VAE with an objective.

It receives built objects (Hydra instantiates them): the VAE, the objective, and optimizer and
scheduler factories (`_partial_: true`). One shared step serves every stage and logs
`{stage}/loss`, `{stage}/elbo`, `{stage}/rate`, `{stage}/distortion` in nats per example, and
`{stage}/bpd` (bits per dimension) where the data's pixel model defines it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vaelab.objectives import ELBO
from vaelab.vae import VAE

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class VAEModule(L.LightningModule):
    def __init__(
        self,
        vae: VAE,
        objective: ELBO,
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

    def step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, _ = batch
        parts = self.objective(self.vae, images)
        metrics = {
            "loss": parts["loss"],
            "elbo": parts["elbo"].mean(),
            "rate": parts["rate"].mean(),
            "distortion": parts["distortion"].mean(),
        }
        if self.bpd_offset is not None:
            nll_per_dim = -metrics["elbo"] / self.num_dims
            metrics["bpd"] = (nll_per_dim + self.bpd_offset) / math.log(2)
        # Training curves are per step; validation and test values are means over the whole
        # split (weighted by batch size, reduced across processes).
        training = stage == "train"
        self.log_dict(
            {f"{stage}/{name}": value.detach() for name, value in metrics.items()},
            on_step=training,
            on_epoch=not training,
            sync_dist=not training,
            batch_size=len(images),
        )
        return parts["loss"]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
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

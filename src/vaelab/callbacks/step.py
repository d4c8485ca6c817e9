"""Observers of the step: what follows from its outputs (bits per dimension) or is measured beside
it (the rate of each stochastic layer), logged like the step's own parts. train.py and
evaluate.py add them for the run's model and data (`step_callbacks`)."""

from __future__ import annotations

import math

import lightning as L
import torch

from vaelab.data import ImageDataModule
from vaelab.models import LatentVariableModel


class BitsPerDim(L.Callback):
    """`{stage}/bpd` = (-elbo / D + offset) / ln 2 from the step's `elbo`: D the data's
    dimensions, `offset` the likelihood's for the data's pixel model (0 for binary or discrete
    8-bit pixels, ln 256 for a density on dequantised values, Theis et al. 2016). Training values
    on the steps the logger writes, as the step's own; validation and test: split means."""

    def __init__(self, num_dims: int, offset: float) -> None:
        self.num_dims, self.offset = num_dims, offset
        self.log_this_step = False

    def log_bpd(self, pl_module, stage: str, outputs, batch) -> None:
        if not isinstance(outputs, dict) or "elbo" not in outputs:
            return
        training = stage == "train"
        bpd = (-outputs["elbo"].detach().mean() / self.num_dims + self.offset) / math.log(2)
        pl_module.log(
            f"{stage}/bpd",
            bpd,
            on_step=training,
            on_epoch=not training,
            sync_dist=not training,
            batch_size=len(batch[0]),
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.log_this_step = trainer.global_step % trainer.log_every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.log_this_step:
            self.log_bpd(pl_module, "train", outputs, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.log_bpd(pl_module, "val", outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.log_bpd(pl_module, "test", outputs, batch)


class LayerRates(L.Callback):
    """`{stage}/rate_<layer>` (validation and test) for a model with several stochastic layers:
    each layer's Monte-Carlo rate on draws of its own (`model.layer_rates`; their sum estimates
    the rate), a second pass over the batch that only such a model pays for."""

    @torch.no_grad()
    def log_rates(self, pl_module, stage: str, batch) -> None:
        inputs, _, labels = batch
        rates = pl_module.model.given(labels).layer_rates(inputs.to(pl_module.dtype))
        for name, value in rates.items():
            pl_module.log(
                f"{stage}/rate_{name}",
                value.mean(),
                on_epoch=True,
                sync_dist=True,
                batch_size=len(inputs),
            )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.log_rates(pl_module, "val", batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.log_rates(pl_module, "test", batch)


def step_callbacks(model: LatentVariableModel, datamodule: ImageDataModule) -> list[L.Callback]:
    """The observers this model and these data call for."""
    callbacks: list[L.Callback] = []
    offset = model.likelihood.bpd_offset(datamodule.pixel_model)
    if offset is not None:
        callbacks.append(BitsPerDim(datamodule.num_dims, offset))
    if len(model.latent_parts) > 1:
        callbacks.append(LayerRates())
    if model.scheduled:
        callbacks.append(StepSchedule())
    return callbacks


class StepSchedule(L.Callback):
    """Before each training step, the model's step-dependent settings (`set_step`), logged as
    `train/<name>` on the steps the logger writes."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = pl_module.model
        model.set_step(trainer.global_step)
        if trainer.global_step % trainer.log_every_n_steps == 0:
            for name, value in model.schedule_values().items():
                pl_module.log(f"train/{name}", value, on_step=True, on_epoch=False)

"""VAEModule: the training step of a latent-variable model with an objective, and its optimizer.

It receives built objects (Hydra instantiates them): the model, the objective, and optimizer and
scheduler factories (`_partial_: true`). One shared step serves every stage: the objective's
named parts for the model given the batch's labels (`model.given(labels)`), in nats per example,
logged as `{stage}/loss`, `{stage}/elbo`, `{stage}/rate`, ... The step returns its parts; the
callbacks read them (the NaN guard, the progress bar, bits per dimension, per-layer rates:
vaelab.callbacks), so nothing is left on the module for others to find.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vaelab.compiled import CompiledObjective
from vaelab.models import LatentVariableModel
from vaelab.objectives import Objective

Batch = tuple[Tensor, Tensor, Tensor]  # inputs, targets (they differ for denoising), labels
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class VAEModule(L.LightningModule):
    def __init__(
        self,
        model: LatentVariableModel,
        objective: Objective,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        monitor: str = "val/elbo",
        run_config: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        """`monitor`: the metric a plateau scheduler watches (the run's `monitor.metric`).
        `run_config`: the resolved run config, saved as hyper-parameters, so checkpoints carry
        it and TensorBoard's HParams tab shows it. `compile`: the training step's objective
        through torch.compile (vaelab.compiled.CompiledObjective)."""
        super().__init__()
        self.model = model
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.monitor = monitor
        self.compiled_objective = CompiledObjective(objective) if compile else None
        if run_config is not None:
            self.save_hyperparameters(run_config)

    def step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        inputs, targets, labels = batch
        if inputs.dtype != self.dtype:  # trainer.precision=64-true: the data come as float32
            inputs, targets = inputs.to(self.dtype), targets.to(self.dtype)
        model = self.model.given(labels)
        training = stage == "train"
        if training and self.compiled_objective is not None:
            parts = self.compiled_objective(model, inputs, targets, self.global_step)
        else:
            step = self.global_step if training else None
            parts = self.objective(model, inputs, targets, step=step)
        # Training curves are per step, logged only on the steps the logger writes (a self.log
        # call costs more Python than a small VAE's step); validation and test values are means
        # over the split (weighted by batch size, reduced across processes).
        if not training or self.global_step % self.trainer.log_every_n_steps == 0:
            metrics = {
                f"{stage}/{name}": value.detach().mean()
                for name, value in parts.items()
                if training or name != "beta"  # the schedule's value is a training quantity
            }
            self.log_dict(
                metrics,
                on_step=training,
                on_epoch=not training,
                sync_dist=not training,
                batch_size=len(inputs),
            )
        return parts

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        parts = self.step(batch, "train")
        return {name: v if name == "loss" else v.detach() for name, v in parts.items()}

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        return self.step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        return self.step(batch, "test")

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.datamodule is not None:
            self.objective.setup(self.trainer.datamodule.train_size)

    def on_fit_start(self) -> None:
        """A fresh run (no checkpoint restored, Lightning restores before this hook) fits the
        model's data-dependent initialisation to the training split (`model.output_bias`)."""
        datamodule = self.trainer.datamodule
        fresh = self.trainer.ckpt_path is None and self.global_step == 0
        if fresh and datamodule is not None and self.model.output_bias != "none":
            self.model.fit_to_data(datamodule.pixel_means().to(self.device))

    def configure_optimizers(self) -> Any:
        # An objective with modules of its own (FactorVAE's discriminator) adds them as
        # parameter groups with its own settings.
        groups = [{"params": list(self.model.parameters())}, *self.objective.param_groups()]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {
            "scheduler": self.scheduler_factory(optimizer),
            "interval": self.scheduler_interval,
            "monitor": self.monitor,
        }
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

"""VAEModule: the LightningModule that trains a latent-variable model with an objective.

It receives built objects (Hydra instantiates them): the model, the objective, and optimizer and
scheduler factories (`_partial_: true`). One shared step serves every stage and logs
`{stage}/loss`, `{stage}/elbo`, `{stage}/rate`, `{stage}/distortion` in nats per example, and
`{stage}/bpd` (bits per dimension) where the likelihood and the data's pixel model define it,
plus what the objective adds (`train/beta` for KL schedules, `{stage}/iwae` for IWAE), and for
a model with several stochastic layers `val/rate_z1`, `val/rate_z2`, ... (on their own draws;
their sum estimates the rate). An objective without an ELBO (the plain autoencoder) logs only
its loss and distortion.

The module is the step and the optimizer; the NaN guard, the refusal to save non-finite weights
and the random-state bookkeeping of evaluation and resume are callbacks
(vaelab.callbacks.reliability), which train.py and evaluate.py always add.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vaelab.errors import VaelabError
from vaelab.evaluation.metrics import compile_options, warn_compile_failed
from vaelab.models import LatentVariableModel

Objective = Callable[..., dict[str, Tensor]]  # (model, inputs, targets, step) -> named parts
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
#: The terms the NaN guard checks, handed to callbacks with each training step's output.
CHECKED_TERMS = ("loss", "rate", "distortion")


class VAEModule(L.LightningModule):
    def __init__(
        self,
        model: LatentVariableModel,
        objective: Objective,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        monitor: str = "val/elbo",
        bpd_offset: float | None = None,
        run_config: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        """`monitor`: the metric a plateau scheduler watches (the run's `monitor.metric`).
        `bpd_offset`: from the likelihood for the data's pixel model (None: no bits per
        dimension). `run_config`: the resolved run config, saved as hyper-parameters, so
        checkpoints carry it and TensorBoard's HParams tab shows it. `compile`: run the training
        step's objective through torch.compile (`CompiledObjective`)."""
        super().__init__()
        self.model = model
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.monitor = monitor
        self.bpd_offset = bpd_offset
        self.last_terms: dict[str, Tensor] = {}
        self.logged_step: int | None = None  # the last training step whose parts were logged
        self.num_dims = math.prod(model.image_shape)
        self.compiled_objective = CompiledObjective(objective) if compile else None
        if run_config is not None:
            self.save_hyperparameters(run_config)

    #: Set at every training step (Lightning's current hook name, ~20 times a step; the guard's
    #: terms; the last logged step): plain attributes, never parameters, buffers or modules, so
    #: they skip nn.Module.__setattr__'s checks for those (benchmarks/README.md).
    PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "last_terms", "logged_step"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in VAEModule.PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        inputs, targets, labels = batch  # inputs differ from targets for a denoising model
        if inputs.dtype != self.dtype:  # trainer.precision=64-true: the data come as float32
            inputs, targets = inputs.to(self.dtype), targets.to(self.dtype)
        training = stage == "train"
        with self.model.conditioned(labels if self.model.conditional else None):
            if training and self.compiled_objective is not None:
                parts = self.compiled_objective(self.model, inputs, targets, self.global_step)
            else:
                parts = self.objective(
                    self.model, inputs, targets, step=self.global_step if training else None
                )
            if not training and "rate" in parts:  # a hierarchical model: layers with codes
                for name, value in self.model.layer_rates(inputs).items():
                    parts[f"rate_{name}"] = value
        # Training curves are per step, logged only on the steps the logger writes
        # (trainer.log_every_n_steps): a self.log call costs more Python than a small VAE's
        # step. `logged_step` tells the progress bar when there are new values to show.
        # Validation and test values are means over the whole split (weighted by batch size,
        # reduced across processes).
        if not training or self.global_step % self.trainer.log_every_n_steps == 0:
            self.log_parts(parts, stage, len(inputs))
            if training:
                self.logged_step = self.global_step
        return parts

    def log_parts(self, parts: dict[str, Tensor], stage: str, batch_size: int) -> None:
        training = stage == "train"
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
            batch_size=batch_size,
        )

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        parts = self.step(batch, "train")
        # for the NaN guard (vaelab.callbacks.FiniteGuard), which checks them before backward
        self.last_terms = {name: parts[name].detach() for name in CHECKED_TERMS if name in parts}
        return parts["loss"]

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self.step(batch, "test")

    def setup(self, stage: str) -> None:
        """An objective that needs the number of training images (beta-TCVAE's aggregate
        posterior) gets it from the data side."""
        datamodule = self.trainer.datamodule
        if hasattr(self.objective, "uses_dataset_size") and stage == "fit" and datamodule:
            self.objective.uses_dataset_size(datamodule.train_size)

    def configure_optimizers(self) -> Any:
        # An objective with modules of its own (FactorVAE's discriminator) adds them as
        # parameter groups with its own settings.
        groups = [{"params": list(self.model.parameters())}]
        if hasattr(self.objective, "param_groups"):
            groups += self.objective.param_groups()
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.scheduler_interval,
                "monitor": self.monitor,
            },
        }


class CompiledObjective:
    """The training step's objective through `torch.compile` (`compile=true` in train.yaml): the
    model's forward pass (encoder, reparameterised draws, decoder, the likelihood's log-density,
    the KL) and the loss become one graph, its backward pass another (AOTAutograd), so that the
    element-wise work between the matrix products runs as a few fused loops instead of dozens of
    separate kernels and Python calls. Shapes are static: one compilation per training batch
    size (two per run when the last batch of an epoch is smaller), a few seconds each on a CPU.
    The step counter goes in as a 0-d tensor, so the KL schedule's beta changes without
    recompiling. Random draws come from torch's generator as in eager mode
    (`fallback_random`): the same seed gives the same draws, and exact resume holds. Validation
    and test stay eager. If compiling fails (no C++ compiler on a CPU machine, an operation the
    compiler does not support), one warning says so and training goes on eagerly.
    """

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.options = {**compile_options(), "fallback_random": True}
        self.fn: Callable[..., dict[str, Tensor]] | None = None  # built on the first call
        self.failed = False

    def eager(
        self, model: LatentVariableModel, inputs: Tensor, targets: Tensor, step: Tensor
    ) -> dict[str, Tensor]:
        parts = self.objective(model, inputs, targets, step=step)
        # Only the loss is differentiated: the other parts leave the graph as plain values, so
        # the compiled backward takes one incoming gradient instead of one per part.
        return {
            name: v.detach() if name != "loss" and isinstance(v, Tensor) else v
            for name, v in parts.items()
        }

    def __call__(
        self, model: LatentVariableModel, inputs: Tensor, targets: Tensor, step: int
    ) -> dict[str, Tensor]:
        if self.failed:
            return self.objective(model, inputs, targets, step=step)
        if self.fn is None:  # not in __init__: a module holding it stays picklable until fit
            options = dict(self.options)
            if inputs.device.type == "cpu":
                # the graph's calls from generated C++ instead of Python (benchmarks/README.md)
                options.setdefault("cpp_wrapper", True)
            self.fn = torch.compile(self.eager, dynamic=False, options=options)
            # The first step runs eagerly: it fills torch.distributions' cache of which KL
            # function serves which pair of distributions, a lookup the compiler cannot trace
            # (it would split the graph in two at kl_divergence).
            return self.objective(model, inputs, targets, step=step)
        try:  # compilation happens on a call: the first, and any with a new batch shape
            return self.fn(model, inputs, targets, torch.tensor(step, device=inputs.device))
        except VaelabError:
            raise  # the objective's own checks: the same one-line error as eagerly
        except Exception as e:  # any failure of the compiler stack: fall back, do not stop
            warn_compile_failed("compile", e, "training eagerly")
            self.failed = True
            return self.objective(model, inputs, targets, step=step)

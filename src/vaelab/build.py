"""Build the run's objects from a composed config with Hydra's `instantiate`.

Data flows one way: the DataModule knows the image shape and what its pixels are; the model is
the config's `_target_`, built with that shape, the likelihood and the prior factory, and wires
its own sizes; the likelihood must accept the data's pixel model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.profilers import PassThroughProfiler
from omegaconf import DictConfig, OmegaConf

from vaelab import hardware
from vaelab.data import ImageDataModule
from vaelab.errors import (
    ConfigError,
    VaelabError,
    require,
    require_betas,
    require_in_range,
    require_int,
    require_number,
)
from vaelab.models import LatentVariableModel
from vaelab.module import VAEModule
from vaelab.run.trust import OBJECTIVE_META, parameters

log = logging.getLogger(__name__)

INF = math.inf
#: Optimizer and scheduler settings, wherever they appear, and the range in which a run trains
#: at all, (low, high, closed on the left, closed on the right): outside it the learning rate is
#: zero, negative or growing, and the run trains nothing or diverges without an error.
TRAINABLE = {
    "lr": (0, INF, False, False),
    "eps": (0, INF, False, False),
    "weight_decay": (0, INF, True, False),
    "momentum": (0, 1, True, False),
    "dampening": (0, 1, True, True),
    "alpha": (0, 1, True, True),
    "momentum_decay": (0, INF, True, False),
    "gamma": (0, 1, False, True),
    "factor": (0, 1, False, False),
    "eta_min": (0, INF, True, False),
    "min_lr": (0, INF, True, False),
    "T_max": (1, INF, True, False),
    "step_size": (1, INF, True, False),
    "patience": (0, INF, True, False),
}


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The data, told which pixel models the likelihood accepts (`data.dequantize: auto`)."""
    return instantiate(cfg.data, accepts=tuple(instantiate(cfg.likelihood).accepts))


def build_model(cfg: DictConfig, image_shape: Iterable[int]) -> LatentVariableModel:
    """instantiate(cfg.model) with the data's image shape, the likelihood, the prior and, where
    the posterior group puts a flow on the Gaussian posterior (posterior=iaf), that flow."""
    extra = {}
    if cfg.get("posterior"):  # posterior=gaussian is empty: the model's own Gaussian
        flow = str(cfg.posterior.get("_target_", "")).rsplit(".", 1)[-1]
        require(
            "posterior" in parameters(str(cfg.model._target_)),
            f"the posterior flow {flow} needs a model with one Gaussian code (model=mlp, conv, "
            f"resnet), got {cfg.model._target_}; use posterior=gaussian",
        )
        extra["posterior"] = instantiate(cfg.posterior)
    return instantiate(
        cfg.model,
        image_shape=tuple(image_shape),
        likelihood=instantiate(cfg.likelihood),
        prior=instantiate(cfg.prior),
        **extra,
    )


def build_objective(cfg: DictConfig) -> Any:
    objective = OmegaConf.to_container(cfg.objective, resolve=True)  # interpolations in context
    for key in OBJECTIVE_META:
        objective.pop(key, None)
    return instantiate(objective)


def check_optimization(cfg: DictConfig, optimizer, scheduler, model: torch.nn.Module) -> None:
    """Build the optimizer (and the scheduler, with one step) once now on a throwaway copy, so
    a bad argument (optimizer.lr=-1, scheduler.T_max=0) is one line before any work starts, not
    torch's traceback at the first step."""
    settings = cfg.optimizer
    for group in ("optimizer", "scheduler"):
        for key, value in (cfg.get(group) or {}).items():
            if key in TRAINABLE:
                require_in_range(f"{group}.{key}", value, *TRAINABLE[key])
    if "betas" in settings:
        require_betas("optimizer.betas", settings.betas)
    for key in ("eta_min", "min_lr"):
        if key in (cfg.get("scheduler") or {}) and "lr" in settings:
            require(
                cfg.scheduler[key] < settings.lr,
                f"scheduler.{key}={cfg.scheduler[key]} must be below optimizer.lr={settings.lr} "
                "(the schedule would raise the learning rate)",
            )
    try:
        built = optimizer(model.parameters())
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"optimizer ({described(settings)}): {e}") from e
    if scheduler is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            schedule = scheduler(built)
            if not isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
                schedule.step()
    except VaelabError:
        raise  # a schedule's own check (e.g. TimeCosine's budget) already names the value
    except (ValueError, TypeError, ArithmeticError, RuntimeError) as e:
        raise ConfigError(
            f"scheduler ({described(cfg.scheduler)}) fails on its first step: "
            f"{type(e).__name__}: {e}"
        ) from e


def described(node: DictConfig) -> str:
    """`name=value` for the plain settings of a config node, `_target_` by its class name."""
    items = [f"{str(node._target_).rsplit('.', 1)[-1]}"] if "_target_" in node else []
    for key, value in node.items():
        if not str(key).startswith("_") and not OmegaConf.is_config(value):
            items.append(f"{key}={value}")
    return ", ".join(items)


def check_trainer(settings: DictConfig) -> None:
    """The Trainer arguments a user most often sets, checked with their names."""
    for key, minimum in (("max_epochs", -1), ("max_steps", -1), ("log_every_n_steps", 1)):
        if settings.get(key) is not None:
            require_int(f"trainer.{key}", settings[key], minimum)
    for key in ("check_val_every_n_epoch", "accumulate_grad_batches", "num_nodes"):
        if settings.get(key) is not None:
            require_int(f"trainer.{key}", settings[key], 1)
    if settings.get("gradient_clip_val") is not None:
        require_number("trainer.gradient_clip_val", settings.gradient_clip_val, 0)


def build_trainer(cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """instantiate(cfg.trainer); what Lightning refuses (precision=17, devices=0, an accelerator
    this machine lacks) is one line: Lightning's own message, which names the value."""
    check_trainer(cfg.trainer)
    accelerator = cfg.trainer.get("accelerator", "auto")
    device = hardware.training_device(accelerator)
    # another accelerator (TPU, MPS): Lightning's precision plugin for it decides what bf16 is
    native = device is None or hardware.native_bf16(device)
    precision, line = hardware.trainer_precision(
        cfg.trainer.get("precision", "32-true"), native, str(device.type if device else accelerator)
    )
    if line:
        log.warning(line)
    kwargs.setdefault("precision", precision)
    if cfg.trainer.get("profiler") is None and "profiler" not in kwargs:
        kwargs["profiler"] = NoProfiler()
    try:
        return instantiate(cfg.trainer, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if not isinstance(cause, ValueError | TypeError | MisconfigurationException | ImportError):
            raise
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ConfigError(f"trainer: {first_line}") from e


class NoProfiler(PassThroughProfiler):
    """The Trainer's profiler when none is asked for (`trainer.profiler=simple` or `advanced`
    still profile): Lightning's default one enters a new generator-based context manager around
    every hook of every callback, ~140 times per training step, to time nothing; this one returns
    the same reusable null context."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return self._nothing


def compile_choice(value: Any) -> bool:
    require(isinstance(value, bool), f"compile must be true or false, got {value!r}")
    return value


def build_module(
    cfg: DictConfig,
    datamodule: ImageDataModule,
    run_config: dict[str, Any] | None = None,
) -> VAEModule:
    model = build_model(cfg, datamodule.image_shape)
    likelihood = model.likelihood
    pixel_model = datamodule.pixel_model
    if pixel_model not in likelihood.accepts:
        raise ConfigError(
            f"likelihood {likelihood!r} accepts {' or '.join(likelihood.accepts)} pixels, but "
            f"the data supply {pixel_model} pixels (data.binarize={datamodule.binarize}, "
            f"data.dequantize={str(datamodule.dequantize).lower()}); "
            + (
                "use data.binarize=dynamic or static"
                if likelihood.accepts == ("binary",)
                else "change data.binarize / data.dequantize or the likelihood"
            )
            + " (likelihoods for [0, 1] values: gaussian, gaussian_fixed, continuous_bernoulli)"
        )
    objective = build_objective(cfg)
    # a model family and an objective that only work together say so before any work
    objective.check_model(model)
    model.check_objective(objective)
    objective.bind(model)
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    check_optimization(cfg, optimizer, scheduler, model)
    monitor = cfg.get("monitor") or {"metric": "val/elbo"}
    return VAEModule(
        model=model,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        monitor=monitor["metric"],
        run_config=run_config,
        compile=compile_choice(cfg.get("compile", False)),
    )

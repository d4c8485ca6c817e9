"""Build the run's objects from a composed config with Hydra's `instantiate`.

Data flows one way: the DataModule knows the image shape and what its pixels are; the model is
the config's `_target_`, built with that shape, the likelihood and the prior factory, and wires
its own sizes; the likelihood must accept the data's pixel model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab.data import ImageDataModule
from vaelab.errors import ConfigError
from vaelab.models import LatentVariableModel
from vaelab.module import VAEModule

#: Keys of an objective's config that describe how its runs are judged; not constructor args.
OBJECTIVE_META = ("monitor", "report")


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    return instantiate(cfg.data)


def build_model(cfg: DictConfig, image_shape: Iterable[int]) -> LatentVariableModel:
    """instantiate(cfg.model) with the data's image shape, the likelihood and the prior."""
    return instantiate(
        cfg.model,
        image_shape=tuple(image_shape),
        likelihood=instantiate(cfg.likelihood),
        prior=instantiate(cfg.prior),
    )


def build_objective(cfg: DictConfig) -> Any:
    objective = OmegaConf.to_container(cfg.objective, resolve=True)  # interpolations in context
    for key in OBJECTIVE_META:
        objective.pop(key, None)
    return instantiate(objective)


def check_optimizer(optimizer, model: torch.nn.Module) -> None:
    """Build the optimizer once now, so a bad argument (optimizer.lr=-1) is one line before any
    work starts, not torch's traceback at the first step."""
    try:
        optimizer(model.parameters())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer: {e}") from e


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
    optimizer = instantiate(cfg.optimizer)
    check_optimizer(optimizer, model)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    monitor = cfg.get("monitor") or {"metric": "val/elbo"}
    return VAEModule(
        model=model,
        objective=build_objective(cfg),
        optimizer=optimizer,
        scheduler=scheduler,
        monitor=monitor["metric"],
        bpd_offset=likelihood.bpd_offset(pixel_model),
        run_config=run_config,
    )

"""Training: compose -> instantiate -> Trainer.fit; returns the metrics it computed."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab.build import build_datamodule, build_module

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def run(cfg: DictConfig) -> dict[str, float]:
    """Train one model; return the final epoch's metrics (and test metrics if cfg.test)."""
    torch.distributions.Distribution.set_default_validate_args(bool(cfg.get("validate_args")))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config.pop("hydra", None)
    if HydraConfig.initialized():  # which option of each group, for the HParams table
        run_config["choices"] = {
            group: choice
            for group, choice in HydraConfig.get().runtime.choices.items()
            if not group.startswith("hydra") and choice is not None
        }
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule, run_config=run_config)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    log.info("Output dir: %s", cfg.paths.output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if cfg.get("test"):
        ckpt = (
            "best"
            if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path
            else None
        )
        for results in trainer.test(module, datamodule=datamodule, ckpt_path=ckpt):
            metrics.update({name: float(value) for name, value in results.items()})
    return metrics

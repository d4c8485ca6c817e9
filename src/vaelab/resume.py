"""resume=<run dir>: continue a run with its own saved config, in its own dir."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab.errors import CheckpointError, ConfigError
from vaelab.trust import check_targets

#: What resuming may change: how long and how to train, where the files are, what to trust.
RESUMABLE_PREFIXES = (
    "trainer.",
    "paths.",
    "resume=",
    "check_finite=",
    "validate_args=",
    "trusted_targets=",
)


def resume_config(cfg: DictConfig) -> DictConfig:
    """The run's saved config, with this invocation's paths and trainer overrides, starting
    from its checkpoints/last.ckpt."""
    run_dir = Path(cfg.resume).expanduser()
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise CheckpointError(
            f"resume={cfg.resume}: no checkpoints/last.ckpt there, so there is nothing to "
            "resume (is it a run dir of train.py that wrote a checkpoint?)"
        )
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        raise CheckpointError(f"resume={cfg.resume}: no .hydra/config.yaml in that run dir")
    saved = OmegaConf.load(saved_file)
    if "_target_" not in saved.get("model", {}):
        raise CheckpointError(
            f"resume={cfg.resume} was trained by an older vaelab whose model config names no "
            "class (model._target_); it cannot be resumed with this version"
        )
    trusted = list(cfg.get("trusted_targets") or [])
    check_targets(OmegaConf.to_container(saved), str(saved_file), trusted)

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    refused = [o for o in overrides if not o.lstrip("+~").startswith(RESUMABLE_PREFIXES)]
    if refused:
        raise ConfigError(
            f"resume keeps the run's saved config; cannot change {', '.join(refused)} "
            "(allowed with resume: trainer.*, paths.*, check_finite, validate_args, "
            "trusted_targets)"
        )
    with open_dict(saved):
        saved.paths = cfg.paths  # this machine's data, the same run dir
        saved.resume = cfg.resume
        saved.ckpt_path = str(last)
        saved.check_finite = cfg.get("check_finite", True)
        saved.validate_args = cfg.get("validate_args", False)
        saved.trusted_targets = trusted
        for override in overrides:
            key, _, value = override.lstrip("+~").partition("=")
            if key.startswith("trainer."):
                OmegaConf.update(saved, key, yaml.safe_load(value), force_add=True)
    return saved


def checkpoint_step(path: str | Path) -> int:
    """The global step a checkpoint was saved at."""
    return int(torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0))

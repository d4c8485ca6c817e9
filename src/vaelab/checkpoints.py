"""Find and load a run's checkpoint and the config it was trained with, as untrusted input."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vaelab.build import check_targets
from vaelab.errors import CheckpointError

REQUIRED_GROUPS = ("data", "model", "likelihood", "prior", "objective", "optimizer")
#: The groups evaluation instantiates; the rest of the saved config is never instantiated.
BUILT_GROUPS = (*REQUIRED_GROUPS, "scheduler")


def find_checkpoint(run: str | Path, which: str = "best") -> Path:
    """The .ckpt file itself, or the `best` / `last` checkpoint of a run dir."""
    path = Path(run).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"run={run}: no such file or directory")
    folder = path / "checkpoints"
    last = folder / "last.ckpt"
    if not last.is_file():
        raise CheckpointError(
            f"run={run} is neither a .ckpt file nor a run dir with checkpoints/last.ckpt"
        )
    if which == "last":
        return last
    if which != "best":
        raise CheckpointError(f"eval.checkpoint must be best or last, got {which!r}")
    best = best_model_path(load_checkpoint(last))
    # The path was recorded at training time; the run dir may have moved since.
    return folder / best.name if best is not None and (folder / best.name).is_file() else last


def best_model_path(checkpoint: dict[str, Any]) -> Path | None:
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and state.get("best_model_path"):
            return Path(state["best_model_path"])
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint cannot run code when loaded."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a loadable checkpoint ({first_line})") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def checkpoint_config(checkpoint: dict[str, Any], path: Path) -> DictConfig:
    """The run config saved in the checkpoint, checked before anything is instantiated."""
    config = checkpoint.get("hyper_parameters")
    if not isinstance(config, dict) or any(g not in config for g in REQUIRED_GROUPS):
        raise CheckpointError(
            f"{path} was not written by vaelab's train.py (its hyper-parameters lack "
            f"{', '.join(REQUIRED_GROUPS)})"
        )
    config = {key: value for key, value in config.items() if key in BUILT_GROUPS}
    check_targets(config, str(path))
    return OmegaConf.create(config)

"""Find and load a run's checkpoint and the config it was trained with, as untrusted input."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from vaelab.errors import CheckpointError
from vaelab.trust import check_targets

REQUIRED_GROUPS = ("data", "model", "likelihood", "prior", "objective", "optimizer")
#: What evaluation reads; the rest of the saved config is never instantiated.
BUILT_GROUPS = (*REQUIRED_GROUPS, "scheduler", "monitor")


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


def checkpoint_config(
    checkpoint: dict[str, Any], path: Path, trusted: list[str] | tuple[str, ...] = ()
) -> DictConfig:
    """The run config saved in the checkpoint, checked before anything is instantiated: only
    vaelab's own targets and those under `trusted` (the evaluation's `trusted_targets`)."""
    config = checkpoint.get("hyper_parameters")
    if not isinstance(config, dict) or any(g not in config for g in REQUIRED_GROUPS):
        raise CheckpointError(
            f"{path} was not written by vaelab's train.py (its hyper-parameters lack "
            f"{', '.join(REQUIRED_GROUPS)})"
        )
    config = {key: value for key, value in config.items() if key in BUILT_GROUPS}
    if "_target_" not in config["model"]:
        raise CheckpointError(
            f"{path} was written by an older vaelab whose model config names no class "
            "(model._target_); retrain it with this version"
        )
    check_targets(config, str(path), trusted)
    return OmegaConf.create(config)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer (a temporary file renamed into place, so a failed write
    never leaves a half-written checkpoint) with a one-line error for a read-only or full
    output location."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        except OSError as e:
            reason = e.strerror or str(e)
            raise CheckpointError(
                f"cannot write checkpoint {path}: {reason}; the previous checkpoints are "
                "unchanged (free space or choose another paths.log_dir)"
            ) from e

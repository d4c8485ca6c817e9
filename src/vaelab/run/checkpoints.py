"""Checkpoints on disk, read as untrusted data and written atomically.

- `read_checkpoint` / `read_saved`: `torch.load(weights_only=True)` (no code runs), then the run
  config inside checked as data (`vaelab.run.trust`); `newest_saved` falls back past files that
  do not load (a checkpoint cut short by a crash), naming them.
- `RunCheckpointIO`, Lightning's public CheckpointIO for one run dir: a checkpoint is written to
  a temporary file in its own folder, flushed, fsynced and renamed over the old one
  (`os.replace`), so the previous checkpoint stays whole until the new one is, whatever
  filesystem $TMPDIR is on; it writes and deletes only regular files inside its run dir; a
  loaded checkpoint's state is checked before Lightning acts on it (`vaelab.run.state`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from torch import nn

from vaelab.errors import CheckpointError
from vaelab.run.plan import SavedRun
from vaelab.run.state import apply_optimizer_settings, confine_state
from vaelab.run.trust import check_saved, plain_name

log = logging.getLogger(__name__)
#: The suffix of a checkpoint being written (`.last.ckpt.<pid>.<token>.partial`).
PARTIAL = ".partial"
LOAD_ERRORS = (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint cannot run code when loaded."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a loadable checkpoint ({first_line})") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def read_saved(path: Path, trusted: list[str]) -> tuple[SavedRun, dict[str, Any]]:
    """A checkpoint and its run config, checked as data; (SavedRun, the checkpoint itself)."""
    checkpoint = read_checkpoint(path)
    return saved_run(checkpoint, path, trusted), checkpoint


def saved_run(checkpoint: dict[str, Any], path: Path, trusted: list[str]) -> SavedRun:
    config = check_saved(checkpoint.get("hyper_parameters"), str(path), trusted)
    return SavedRun(path, config, int(checkpoint.get("global_step", 0)))


def newest_saved(run_dir: Path, trusted: list[str]) -> SavedRun | None:
    """The newest checkpoint of a run dir that loads (last.ckpt first among equals), with the
    newer ones that did not; None when it has none. A checkpoint that loads but whose config is
    refused stops here: that is not damage to fall back from."""
    folder = run_dir / "checkpoints"
    files = sorted(
        (p for p in folder.glob("*.ckpt") if p.is_file()) if folder.is_dir() else [],
        key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"),
        reverse=True,
    )
    skipped: list[tuple[Path, str]] = []
    for path in files:
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as e:
            skipped.append((path, str(e).removeprefix(f"{path} ")))
            log.warning("%s", e)
            continue
        saved = saved_run(checkpoint, path, trusted)
        return SavedRun(saved.checkpoint, saved.config, saved.step, tuple(skipped))
    if skipped:
        raise CheckpointError(
            f"{run_dir}: none of its checkpoints loads ({skipped[0][0].name}: {skipped[0][1]})"
        )
    return None


def find_checkpoint(run: str | Path, which: str = "best") -> Path:
    """The .ckpt file itself, or the `best` / `last` checkpoint of a run dir."""
    path = Path(run).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"run={run}: no such file or directory")
    if which not in ("best", "last"):
        raise CheckpointError(f"eval.checkpoint must be best or last, got {which!r}")
    folder = path / "checkpoints"
    last = folder / "last.ckpt"
    if not last.is_file():
        raise CheckpointError(
            f"run={run} is neither a .ckpt file nor a run dir with checkpoints/last.ckpt"
        )
    if which == "last":
        return last
    checkpoint = read_checkpoint(last)
    confine_state(checkpoint, last, folder)
    bests = [s.get("best_model_path") for s in checkpoint.get("callbacks", {}).values()]
    best = next((Path(p) for p in bests if isinstance(p, str) and p), None)
    return best if best is not None else last


def checkpoint_step(path: str | Path) -> int:
    return int(read_checkpoint(path).get("global_step", 0))


# --- callback state from a file ----------------------------------------------------------------


class RunCheckpointIO(CheckpointIO):
    """Lightning's checkpoint reader and writer for one run dir (see the module docstring)."""

    def __init__(self, run_dir: str | Path, optimizer: dict[str, Any] | None = None) -> None:
        """`optimizer`: the config's optimizer settings, which a loaded checkpoint's yield to."""
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.optimizer = dict(optimizer or {})

    def inside(self, path: str | Path, action: str) -> Path:
        path = Path(path)
        real = path.parent.resolve() / path.name
        if not real.is_relative_to(self.run_dir.resolve()) or not plain_name(path.name):
            raise CheckpointError(f"refusing to {action} {path}: outside this run's dir")
        return path

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_save(checkpoint, self.inside(path, "write"))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        checkpoint = read_checkpoint(path)
        confine_state(checkpoint, Path(path), self.folder)
        for note in apply_optimizer_settings(checkpoint, self.optimizer):
            log.info("%s", note)
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        try:
            self.inside(path, "delete")
        except CheckpointError as e:
            log.warning("%s", e)
            return
        if path.is_symlink() or not path.is_file():
            log.warning("not deleting %s: not a regular file", path)
            return
        path.unlink()


def atomic_save(checkpoint: dict[str, Any], path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, fsynced, then renamed over it."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # serialising first: only disk errors remain below
    partial = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(3).hex()}{PARTIAL}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "xb") as f:  # exclusive: never through a planted link
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise CheckpointError(write_failure(path, e)) from e
    with contextlib.suppress(OSError):  # the rename itself made durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def write_failure(path: Path, error: OSError) -> str:
    """One line: what failed, on which filesystem, and what is on disk now."""
    reason = error.strerror or str(error)
    where = ""
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(existing_parent(path)).free
        where = f" on the filesystem at {mount_point(path)} ({free / 2**20:.1f} MiB free)"
    if path.is_file():
        info = path.stat()
        kept = (
            f"the previous {path.name} ({info.st_size / 2**20:.1f} MiB, written "
            f"{time.strftime('%H:%M:%S', time.localtime(info.st_mtime))}) is intact"
        )
    else:
        kept = f"no {path.name} was written"
    return f"cannot write checkpoint {path}: {reason}{where}; {kept}"


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    path = existing_parent(path).resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


# --- run dirs ------------------------------------------------------------------------------------


def load_weights(model: nn.Module, path: Path) -> list[str]:
    """A first run's model weights into `model` (a second stage): every tensor of the first
    model must find its place; the parts that only this model has start fresh. Returns those."""
    state = read_checkpoint(path)["state_dict"]
    own = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        missing, unexpected = model.load_state_dict(own, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path} holds another model than this stage builds ({str(e).splitlines()[0]})"
        ) from e
    if unexpected:
        raise CheckpointError(f"{path} has weights this model lacks: {unexpected[:3]}")
    return sorted({key.split(".")[0] for key in missing})

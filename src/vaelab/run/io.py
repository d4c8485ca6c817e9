"""Run dirs and checkpoints on disk: read as untrusted data, written atomically, never escaped.

- `read_checkpoint` / `read_saved`: `torch.load(weights_only=True)` (no code runs), then the run
  config inside checked as data (`vaelab.run.trust`); `newest_saved` falls back past files that
  do not load (a checkpoint cut short by a kill or a full disk), naming them.
- `RunCheckpointIO`, Lightning's public CheckpointIO: a checkpoint is written to a temporary file
  in its own directory, flushed, fsynced and renamed over the old one (`os.replace`), so the
  previous checkpoint stays whole until the new one is; it writes and deletes only regular
  files inside its run dir; on loading, the paths in callback states are confined to this run's
  checkpoints/ (`confine_state`) before Lightning acts on them.
- `claimed`: a run dir holds no symbolic or hard links, a new run starts only in an unused dir,
  and one process at a time trains in it (an advisory lock, released by the kernel on any exit).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import math
import os
import pickle
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins import CheckpointIO
from omegaconf import DictConfig
from torch import nn

from vaelab.errors import CheckpointError
from vaelab.run.plan import SavedRun
from vaelab.run.trust import check_saved, plain_name

log = logging.getLogger(__name__)
PARTIAL = ".partial"
LOCK = ".lock"
#: What a used run dir holds (a new run refuses to start beside them).
RUN_FILES = ("checkpoints", "tensorboard", "csv", "summary.json", "evaluation")
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
def confine_state(checkpoint: dict[str, Any], path: Path, folder: Path) -> list[str]:
    """Paths in the checkpoint's callback states, before Lightning acts on them (ModelCheckpoint
    deletes the files its best-k bookkeeping names). A checkpoint of this run's `folder` keeps
    its bookkeeping, each path mapped by file name to a regular file of `folder` (a moved run dir
    resumes with its own files); anything else is dropped, and "best" is recomputed from what
    remains. Returns one line per dropped path."""
    own = path.resolve().parent == folder.resolve()
    here = os.path.realpath(folder)  # ModelCheckpoint compares its realpath'd dirpath
    monitor = (checkpoint.get("hyper_parameters") or {}).get("monitor") or {}
    dropped: list[str] = []

    def local(value: object) -> str | None:
        if not isinstance(value, str) or not value:
            return None
        name = Path(value).name
        candidate = Path(here) / name
        if own and plain_name(name) and candidate.is_file() and not candidate.is_symlink():
            return str(candidate)
        dropped.append(value)
        return None

    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, dict):
            continue
        for key, value in list(state.items()):
            if key == "dirpath":
                state[key] = here
            elif key.endswith("_path"):
                state[key] = local(value) or ""
            elif key == "best_k_models" and isinstance(value, dict):
                kept = {local(p): s for p, s in value.items()}
                state[key] = {p: s for p, s in kept.items() if p is not None}
        if isinstance(state.get("best_k_models"), dict):
            recompute_best(state, monitor.get("mode"))
    if dropped:
        log.warning(
            "%s: dropped %d path(s) from its callback state that are not files of this run's "
            "checkpoints/ (first: %s)",
            path,
            len(dropped),
            dropped[0],
        )
    return dropped


def recompute_best(state: dict[str, Any], mode: object) -> None:
    models = state["best_k_models"]
    if not models or mode not in ("max", "min"):
        state["best_model_path"], state["best_model_score"] = "", None
        return

    def score(p: str) -> float:
        value = float(models[p])
        return value if math.isfinite(value) else (-math.inf if mode == "max" else math.inf)

    ordered = sorted(models, key=score, reverse=mode == "max")
    state["best_model_path"], state["best_model_score"] = ordered[0], models[ordered[0]]
    state["kth_best_model_path"], state["kth_value"] = ordered[-1], models[ordered[-1]]


# --- writing -------------------------------------------------------------------------------------
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
def refuse_links(run_dir: Path) -> None:
    """A run dir holds no symbolic link and no file with another name elsewhere (a hard link):
    writing into either would change a file outside it."""
    for parent, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            entry = Path(parent) / name
            info = entry.lstat()
            if stat.S_ISLNK(info.st_mode):
                raise CheckpointError(
                    f"{entry} is a symbolic link; refusing to use run dir {run_dir} (a run dir "
                    "holds its own files only)"
                )
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                raise CheckpointError(
                    f"{entry} is hard-linked elsewhere; refusing to use run dir {run_dir}"
                )


def refuse_used(run_dir: Path) -> None:
    used = [name for name in RUN_FILES if (run_dir / name).exists()]
    if used:
        raise CheckpointError(
            f"run dir {run_dir} already holds a run ({used[0]}); continue it with "
            f"resume={run_dir}, or start the new run in a new dir"
        )


@contextlib.contextmanager
def claimed(run_dir: Path, fresh: bool) -> Iterator[None]:
    """Hold `run_dir` for this process (see the module docstring); removes the temporary files a
    killed run left in its checkpoints/."""
    run_dir.mkdir(parents=True, exist_ok=True)
    refuse_links(run_dir)
    if fresh:
        refuse_used(run_dir)
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot use run dir {run_dir}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"cannot lock run dir {run_dir}: {e.strerror}") from e
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CheckpointError(
                f"another process (pid {holder}) is training in run dir {run_dir}; one run, one dir"
            ) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for partial in (run_dir / "checkpoints").glob(f".*{PARTIAL}"):
            if partial.is_file() and not partial.is_symlink():
                log.info("removing %s, left by an interrupted checkpoint write", partial.name)
                partial.unlink()
        yield
    finally:
        os.close(fd)  # releases the lock


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


class RunDirCheck(HydraCallback):
    """A Hydra callback (configs/hydra/default.yaml): before Hydra writes into a run or sweep
    dir (.hydra/, train.log), the dir can be written and holds no link; else one line and exit
    status 1, as for any user error (Hydra turns a callback's exception into a warning and goes
    on, so the callback exits itself)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_unless_usable(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_unless_usable(Path(config.hydra.sweep.dir))


def exit_unless_usable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        refuse_links(path)
        with tempfile.TemporaryFile(dir=path):
            pass
    except CheckpointError as e:
        problem = str(e)
    except OSError as e:
        problem = (
            f"cannot write to run dir {path}: {e.strerror or e}; set paths.log_dir (or "
            "VAELAB_LOG_DIR) to a writable folder"
        )
    else:
        return
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(1)


def apply_optimizer_settings(checkpoint: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The config's optimizer settings over those a checkpoint restores (Lightning would keep
    the checkpoint's: `ckpt_path=... optimizer.lr=...` would train at the old rate). The model's
    parameter group only (an objective's own groups keep theirs); a changed learning rate
    rescales the schedule's place (`lr`, `initial_lr`, the schedulers' `base_lrs` and last rate).
    Returns one line per changed setting."""
    states = checkpoint.get("optimizer_states") or []
    if len(states) != 1 or not states[0].get("param_groups"):
        return []
    group, notes = states[0]["param_groups"][0], []
    for key, value in settings.items():
        if key.startswith("_") or key == "params" or key not in group:
            continue
        old = group.get("initial_lr", group[key]) if key == "lr" else group[key]
        same = list(old) == list(value) if isinstance(old, list | tuple) else old == value
        if same:
            continue
        if key == "lr":
            factor = value / old if old else 1.0
            group["lr"] = value if not old else group["lr"] * factor
            if "initial_lr" in group:
                group["initial_lr"] = value
            for schedule in checkpoint.get("lr_schedulers") or []:
                if schedule.get("base_lrs"):
                    schedule["base_lrs"][0] = value
                if schedule.get("_last_lr"):
                    schedule["_last_lr"][0] = group["lr"]
        else:
            group[key] = tuple(value) if isinstance(old, tuple) else value
        notes.append(f"optimizer.{key}={value} replaces the checkpoint's {old}")
    return notes

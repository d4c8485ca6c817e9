"""Run dirs: no links in them, a new run only in an unused one, one process at a time.

`claimed` holds a run dir for the process that trains in it (an advisory lock that the system
releases on any exit, even kill -9); `RunDirCheck` is a Hydra callback that refuses an unusable
run dir before Hydra writes its own files (.hydra/, train.log) into it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from vaelab import commands
from vaelab.errors import CheckpointError
from vaelab.run.checkpoints import PARTIAL

log = logging.getLogger(__name__)
LOCK = ".lock"
#: What a used run dir holds (a new run refuses to start beside them).
RUN_FILES = ("checkpoints", "tensorboard", "csv", "summary.json", "evaluation")


#: The folder of a run dir in which a tracker keeps links of its own: W&B's `wandb/` (its
#: `latest-run`, `debug.log`, `debug-internal.log` name paths inside its run folders). The run
#: folders in it are the tracker's, written once (each run makes a new one, with a random id) and
#: never by vaelab: they are not searched (W&B links its core's log there from its own cache).
TRACKER_LINK_DIRS = ("wandb",)


def tracker_link(entry: Path, run_dir: Path) -> bool:
    """`entry` is a link directly in a `TRACKER_LINK_DIRS` folder naming, by a relative path
    without `..`, something that exists in that folder with no link on the way; any other link
    (the same names pointing out, or at nothing) is still refused."""
    folder = entry.parent
    if folder.relative_to(run_dir).parts not in [(name,) for name in TRACKER_LINK_DIRS]:
        return False
    target = os.readlink(entry)
    parts = Path(target).parts
    if not parts or Path(target).is_absolute() or ".." in parts:
        return False
    lexical = os.path.normpath(os.path.join(os.path.realpath(folder), target))
    return os.path.exists(lexical) and os.path.realpath(lexical) == lexical


def refuse_links(run_dir: Path) -> None:
    """A run dir holds no symbolic link (but a tracker's own, `tracker_link`, and what is inside
    the tracker's run folders) and no file with another name elsewhere (a hard link): writing
    into either would change a file outside it."""
    tracker_dirs = {run_dir / name for name in TRACKER_LINK_DIRS}
    for parent, dirs, files in os.walk(run_dir):
        entries = dirs + files
        if Path(parent) in tracker_dirs:
            dirs[:] = []  # its run folders: checked as entries (no link), not searched
        for name in entries:
            entry = Path(parent) / name
            info = entry.lstat()
            if stat.S_ISLNK(info.st_mode) and not tracker_link(entry, run_dir):
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
            f"{commands.override('resume', run_dir)}, or start the new run in a new dir"
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

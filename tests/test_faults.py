"""Checkpoints on a filesystem other than $TMPDIR, the usual cluster layout (local /tmp, run dirs
on NFS, Lustre or another disk): kill -9 during checkpoint writes, again and again, and a full
disk leave every checkpoint loadable, and resume= goes on from them.

The run dir is on a small tmpfs the test mounts, $TMPDIR on another one that is full (a write
staged there would fail). Needs root for `mount`; where it is refused, the tests are skipped
with the reason. About a minute: each kill needs a new process, and `kill -9` is the point.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.runs import REPO, assert_one_line_error, run_script, tiny

from vaelab.errors import CheckpointError
from vaelab.run.checkpoints import PARTIAL, read_checkpoint

pytestmark = pytest.mark.slow
KILLS = 5


def mount_tmpfs(path: Path, size: str, options: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
        print(f"skipped: cannot mount a tmpfs here ({reason})")
        pytest.skip(f"cannot mount a tmpfs here ({reason})")


@pytest.fixture
def filesystems(tmp_path):
    """(run filesystem, full $TMPDIR filesystem), both mounted for the test."""
    runs, staging = tmp_path / "runs_fs", tmp_path / "tmp_fs"
    mount_tmpfs(runs, "32m")
    try:
        mount_tmpfs(staging, "1m")
        try:
            fill(staging, leave=0)
            yield runs, staging
        finally:
            subprocess.run(["umount", "-l", str(staging)], check=False)
    finally:
        subprocess.run(["umount", "-l", str(runs)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on folder's filesystem."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave:
                free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
                f.write(b"\0" * max(4096, min(1 << 20, free - leave)))
                f.flush()
        except OSError:
            pass  # full
    return filler


def launch(args: list[str], staging: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(staging), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=staging.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_a_new_checkpoint(last: Path, after: float, process: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while not (last.is_file() and last.stat().st_mtime > after):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.02)


def wait_for_a_write(folder: Path, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if any(entry.name.endswith(PARTIAL) for entry in os.scandir(folder)):
            return


def checkpoints_all_load(folder: Path) -> list[int]:
    """The global step of every checkpoint left in folder (each must load)."""
    return [read_checkpoint(path)["global_step"] for path in sorted(folder.glob("*.ckpt"))]


def test_kill_9_and_a_full_disk_leave_loadable_checkpoints(filesystems, data_dir):
    """About 40 s: a new process for each kill -9 (the kill of a whole process is the point),
    then a full disk and a run to the end."""
    runs, staging = filesystems
    assert os.stat(runs).st_dev != os.stat(staging).st_dev
    base = [
        *tiny(data_dir),
        "model.encoder.hidden_dims=[256]",  # ~5 MB checkpoints: writes that take a while
        "callbacks.last_checkpoint.every_n_train_steps=1",  # a write at every step
        "callbacks.images.every_n_epochs=1000",
        "trainer.max_epochs=1000",
    ]
    rng = random.Random(0)
    run_dir, steps, partials = None, [], 0
    for kill in range(KILLS):
        args = [*base, f"paths.log_dir={runs}"] if run_dir is None else [f"resume={run_dir}"]
        args += [f"paths.data_dir={data_dir}"] if run_dir is not None else []
        started = time.time()
        process = launch(args, staging)
        if run_dir is None:
            while not list((runs / "train" / "runs").glob("*/checkpoints")):
                assert process.poll() is None, process.stderr.read()[-3000:]
                time.sleep(0.02)
            (run_dir,) = (runs / "train" / "runs").iterdir()
        folder = run_dir / "checkpoints"
        wait_for_a_new_checkpoint(folder / "last.ckpt", started, process)
        if kill % 2:
            time.sleep(rng.uniform(0.0, 0.3))  # anywhere in a step
        else:
            wait_for_a_write(folder)  # while a checkpoint is being written
        process.send_signal(signal.SIGKILL)
        process.wait()
        partials += len(list(folder.glob(f".*{PARTIAL}")))  # killed in the middle of a write
        loaded = checkpoints_all_load(folder)
        assert loaded, f"kill {kill}: no checkpoint left"
        steps.append(max(loaded))
    assert steps == sorted(steps) and steps[-1] > steps[0]  # each resume went on

    # The disk fills up: the write fails with one line saying so, the last checkpoint stays.
    filler = fill(runs, leave=64 * 1024)
    before = (folder / "last.ckpt").read_bytes()
    process = launch([f"resume={run_dir}", f"paths.data_dir={data_dir}"], staging)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "No space left on device" in errors[0] and str(runs) in errors[0], errors[0]
    # the first write after the resume fails: last.ckpt (kept whole), or, when the kill left
    # last.ckpt at an epoch's end, that epoch's checkpoint (not written at all)
    intact = "previous last.ckpt" in errors[0] and "is intact" in errors[0]
    assert intact or re.search(r"no epoch_\d+\.ckpt was written", errors[0]), errors[0]
    assert (folder / "last.ckpt").read_bytes() == before
    assert not list(folder.glob(f".*{PARTIAL}"))
    checkpoints_all_load(folder)

    # Space again: the run goes on from where it was and finishes.
    filler.unlink()
    epoch = read_checkpoint(folder / "last.ckpt")["epoch"]
    args = [f"resume={run_dir}", f"paths.data_dir={data_dir}", f"trainer.max_epochs={epoch + 2}"]
    process = launch(args, staging)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert read_checkpoint(folder / "last.ckpt")["global_step"] > steps[-1]
    print(
        f"{KILLS} kills, {partials} of them during a write; steps {steps}; every checkpoint loaded"
    )


def test_a_truncated_last_checkpoint_resumes_from_the_newest_that_loads(tmp_path, data_dir, caplog):
    """What a copy over the previous file left behind (the old staging through $TMPDIR):
    resume= names the file it skips and goes on from the newest one that loads."""
    from helpers.runs import compose_train

    from vaelab import train as train_module

    run_dir = tmp_path / "run"
    args = [*tiny(data_dir), "model.encoder.hidden_dims=[16]", f"paths.log_dir={tmp_path}"]
    train_module.run(compose_train(args, output_dir=run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        read_checkpoint(last)
    resume = [f"resume={run_dir}", f"paths.data_dir={data_dir}", "trainer.max_epochs=3"]
    with caplog.at_level("INFO"):
        metrics = train_module.run(compose_train(resume, output_dir=run_dir))
    assert "last.ckpt did not load (is not a loadable checkpoint" in caplog.text
    assert "resuming from " + str(run_dir / "checkpoints" / "epoch_001.ckpt") in caplog.text
    assert metrics["val/elbo"] > -600
    assert read_checkpoint(last)["global_step"] == 24  # 3 epochs of 8 steps


def test_a_read_only_log_dir_is_one_line(tmp_path, data_dir):
    read_only = tmp_path / "ro"
    mount_tmpfs(read_only, "1m", ",ro")
    try:
        args = [*tiny(data_dir), f"paths.log_dir={read_only}"]
        result = run_script("train.py", args, cwd=tmp_path)
        assert_one_line_error(result, f"cannot write to run dir {read_only}", "Read-only")
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)

"""Reliability: a killed run resumes to exactly the parameters of an uninterrupted one, SIGTERM
saves a checkpoint, NaNs stop training without touching the last good checkpoint, same seed gives
the same run, and bad resume / checkpoint / output input gives one-line errors."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.models import binary_batch, small_vae
from helpers.runs import (
    REPO,
    assert_fragments,
    assert_one_line_error,
    compose_train,
    run_script,
    tiny,
    train_error,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vaelab import train as train_module
from vaelab.callbacks import FiniteGuard
from vaelab.errors import CheckpointError, ConfigError, NonFiniteError
from vaelab.objectives import ELBO
from vaelab.run.checkpoints import RunCheckpointIO

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


def train_args(data_dir: Path, log_dir: Path, *extra: str) -> list[str]:
    return [
        *tiny(data_dir),
        f"paths.log_dir={log_dir}",
        "trainer.max_epochs=4",
        "callbacks.last_checkpoint.every_n_train_steps=3",  # 8 steps per epoch: mid-epoch saves
        *extra,
    ]


def only_run_dir(log_dir: Path) -> Path:
    (run_dir,) = (log_dir / "train" / "runs").iterdir()
    return run_dir


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path_glob: str, root: Path, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(path_glob))
        if found:
            return found[0]
        time.sleep(0.05)
    raise TimeoutError(f"{path_glob} never appeared under {root}")


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    """The run dir of a 4-epoch run, never interrupted."""
    logs = tmp_path_factory.mktemp("uninterrupted")
    full = run_script("train.py", train_args(data_dir, logs), cwd=logs)
    assert full.returncode == 0, full.stderr[-3000:]
    return only_run_dir(logs)


def assert_same_weights(got: dict, expected: dict, context: str) -> None:
    assert got["global_step"] == expected["global_step"]
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), f"{name} differs {context}"


def test_killed_run_resumes_to_the_uninterrupted_result(data_dir, tmp_path, uninterrupted):
    reference = uninterrupted

    # Kill -9 mid-epoch, after a checkpoint
    process = start(train_args(data_dir, tmp_path / "part"), tmp_path)
    last = wait_for("train/runs/*/checkpoints/last.ckpt", tmp_path / "part")
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load(last)
    steps_per_epoch = 8
    assert 0 < killed_at["global_step"] < 4 * steps_per_epoch, "killed too late to test resume"

    run_dir = only_run_dir(tmp_path / "part")
    on_disk_at_kill = {step for step, _ in scalars(run_dir, "train/loss")}
    resumed = run_script(
        "train.py",
        [f"resume={run_dir}", f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'part'}"],
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = load(reference / "checkpoints" / "last.ckpt"), load(last)
    assert expected["global_step"] == 4 * steps_per_epoch
    assert_same_weights(
        got,
        expected,
        f"after resuming from step {killed_at['global_step']} (epoch {killed_at['epoch']})",
    )
    # Same run dir, same TensorBoard run: the curves match, with no duplicated step. The one
    # point a kill -9 may cost is the training metrics of the batch whose end wrote last.ckpt
    # (global step S, metrics at step S - 1): Lightning logs and flushes them a moment after
    # the callbacks run, so a kill in between loses them (see LastCheckpoint). Only a point
    # that was not on disk when the run was killed may be missing.
    lost_in_the_kill = {killed_at["global_step"] - 1} - on_disk_at_kill
    for tag in ("train/loss", "val/elbo"):
        resumed, reference_curve = scalars(run_dir, tag), dict(scalars(reference, tag))
        resumed_steps = [step for step, _ in resumed]
        assert resumed_steps == sorted(set(resumed_steps)), "a step is duplicated"
        may_miss = lost_in_the_kill if tag.startswith("train/") else set()
        assert set(reference_curve) - set(resumed_steps) <= may_miss, "a step is missing"
        assert set(resumed_steps) <= set(reference_curve)
        for step, value in resumed:
            assert value == pytest.approx(reference_curve[step]), f"{tag} differs at {step}"
    assert (run_dir / ".hydra" / "config.yaml").read_text() == (
        reference / ".hydra" / "config.yaml"
    ).read_text().replace(str(reference.parents[2]), str(tmp_path / "part"))


def test_a_finished_run_continued_matches_the_longer_run(data_dir, tmp_path, uninterrupted):
    """resume from the checkpoint of an epoch's end (the kill above lands there now and then):
    3 epochs, then resume=<run dir> trainer.max_epochs=4, is the 4-epoch run bit for bit."""
    short = run_script(
        "train.py", train_args(data_dir, tmp_path, "trainer.max_epochs=3"), cwd=tmp_path
    )
    assert short.returncode == 0, short.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3 * 8
    continued = run_script(
        "train.py",
        [
            f"resume={run_dir}",
            "trainer.max_epochs=4",
            f"paths.data_dir={data_dir}",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert_same_weights(
        load(run_dir / "checkpoints" / "last.ckpt"),
        load(uninterrupted / "checkpoints" / "last.ckpt"),
        "after continuing from the end of epoch 3",
    )


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stop_signal_saves_a_checkpoint(stop, data_dir, tmp_path):
    args = train_args(
        data_dir,
        tmp_path / "logs",
        "trainer.max_epochs=1000",
        "callbacks.last_checkpoint.every_n_train_steps=null",
    )
    process = start(args, tmp_path)
    epoch_end = wait_for("train/runs/*/checkpoints/last.ckpt", tmp_path / "logs")
    first = load(epoch_end)["global_step"]
    time.sleep(1.0)
    process.send_signal(stop)
    process.wait(timeout=60)
    saved = load(epoch_end)
    assert saved["global_step"] > first  # written at the stop, not only at the epoch end
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    args = train_args(
        data_dir,
        tmp_path / "logs",
        "+callbacks.poison._target_=helpers.nan_injection.PoisonWeights",
        "+callbacks.poison.step=10",
    )
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = run_script("train.py", args, cwd=tmp_path, env=env)
    assert_one_line_error(
        result, "non-finite", "at step 10", "distortion", "batch min=", "last good checkpoint"
    )
    run_dir = only_run_dir(tmp_path / "logs")
    last = load(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 9  # the save every 3 steps before the NaN, untouched
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert not list((run_dir / "checkpoints").glob("*.tmp*"))


def test_same_seed_same_run(data_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        args = train_args(data_dir, tmp_path / name, "trainer.max_epochs=2")
        assert run_script("train.py", args, cwd=tmp_path).returncode == 0
        runs.append(only_run_dir(tmp_path / name))
    assert scalars(runs[0], "val/elbo") == scalars(runs[1], "val/elbo")
    assert scalars(runs[0], "train/loss") == scalars(runs[1], "train/loss")
    a, b = (load(r / "checkpoints" / "last.ckpt")["state_dict"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_errors(data_dir, tmp_path):
    """In-process: the one-line printing of the CLI is test_errors'."""
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    message = train_error([f"resume={empty}", f"paths.data_dir={data_dir}"], tmp_path / "x")
    assert "no loadable checkpoint" in message

    run_dir = tmp_path / "a"
    args = train_args(data_dir, tmp_path, "trainer.max_epochs=1")
    train_module.run(compose_train(args, output_dir=run_dir))
    resume = [f"resume={run_dir}", f"paths.data_dir={data_dir}", "model=conv"]
    cfg = compose_train(resume, output_dir=run_dir)
    with pytest.raises(ConfigError, match="resume keeps the run's saved config.*model=conv"):
        train_module.run(cfg)
    # a checkpoint of another architecture
    args = [*tiny(data_dir), "model.latent_dim=7", f"ckpt_path={run_dir / 'checkpoints/last.ckpt'}"]
    message = train_error(args, tmp_path / "b")
    assert "holds another model than this config builds" in message


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("data.batch_size=abc", ["data.batch_size must be an integer", "'abc'"]),
        ("objective.beta=abc", ["objective.beta must be a number", "'abc'"]),
        ("model.latent_dim=2.5", ["model.latent_dim must be an integer", "2.5"]),
    ],
)
def test_wrong_types_are_one_line_errors(override, fragments, data_dir, tmp_path):
    assert_fragments(train_error([*tiny(data_dir), override], tmp_path), *fragments)


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = RunCheckpointIO(tmp_path)
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(CheckpointError, match="No space left on device.*previous last.ckpt"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    assert torch.equal(load(path)["state_dict"]["w"], torch.ones(2))  # not half-written
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp left


def test_the_nan_guard_stops_before_the_backward_pass():
    """FiniteGuard checks the step's terms in on_before_backward: a NaN loss never reaches the
    weights or the optimizer state (found in review: the check had moved after the step)."""
    torch.distributions.Distribution.set_default_validate_args(False)  # as in a run
    guard = FiniteGuard()
    vae = small_vae()
    module = SimpleNamespace(model=vae, objective=ELBO(), dtype=torch.float32)
    trainer = SimpleNamespace(global_step=7, current_epoch=0, checkpoint_callback=None)
    x = binary_batch(4)
    guard.on_train_batch_start(trainer, module, (x, x, torch.zeros(4, dtype=torch.long)), 0)
    guard.on_before_backward(trainer, module, torch.tensor(1.0))  # finite: no error
    with torch.no_grad():
        next(vae.decoder.parameters()).view(-1)[0] = float("nan")  # a diverged decoder
    match = "non-finite loss at step 7 .*loss=nan; not finite on this batch: elbo and distortion"
    with pytest.raises(NonFiniteError, match=match):
        guard.on_before_backward(trainer, module, torch.tensor(float("nan")))

"""DDP on CPU processes (gloo): one run is one dir, metrics are synced over the processes, two
processes with batch B match one process with batch 2B, and DDP works inside a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.runs import run_script, tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow


def train(data_dir: Path, log_dir: Path, *extra: str):
    args = [*tiny(data_dir), f"paths.log_dir={log_dir}", *extra]
    result = run_script("train.py", args, cwd=log_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def only(path: Path) -> Path:
    (child,) = path.iterdir()
    return child


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_ddp_run_writes_one_dir_with_synced_metrics(data_dir, tmp_path):
    log_dir = tmp_path / "logs"
    train(data_dir, log_dir, "trainer=ddp_cpu", "trainer.devices=2", "data.eval_batch_size=16")
    assert sorted(p.name for p in (log_dir / "train").iterdir()) == ["runs"]
    run_dir = only(log_dir / "train" / "runs")  # one run, one dir, for both processes
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[0].startswith("epoch_")  # best, and last
    assert checkpoints[1] == "last.ckpt"
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    logged = {tag: accumulator.Scalars(tag)[-1].value for tag in ("val/rate", "val/elbo")}

    # The same checkpoint, evaluated on the whole validation split by one process
    result = run_script(
        "evaluate.py",
        [
            f"run={run_dir}",
            "eval.checkpoint=last",
            "eval.split=val",
            "eval.k=2",
            f"paths.data_dir={data_dir}",
            f"paths.log_dir={log_dir}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((only(log_dir / "evaluate" / "runs") / "metrics.json").read_text())
    single = report["metrics"]
    # rate (closed-form KL) is deterministic: the synced value is the mean over all 64 images,
    # not one process's half; the ELBO differs only by Monte-Carlo noise
    assert logged["val/rate"] == pytest.approx(single["val/rate"], rel=1e-4)
    assert logged["val/elbo"] == pytest.approx(single["val/elbo"], rel=0.02)


def test_two_processes_with_batch_b_match_one_with_batch_2b(data_dir, tmp_path):
    """Deterministic objective and data (plain autoencoder, static binarisation), same seed and
    data order: DDP's averaged gradients equal the big batch's, so the weights agree."""
    common = ["objective=ae", "data.binarize=static", "data.shuffle_seed=0", "trainer.max_epochs=1"]
    train(data_dir, tmp_path / "one", *common, "data.batch_size=32", "trainer=cpu")
    train(
        data_dir,
        tmp_path / "two",
        *common,
        "data.batch_size=16",
        "trainer=ddp_cpu",
        "trainer.devices=2",
    )
    one = last_weights(only(tmp_path / "one" / "train" / "runs"))
    two = last_weights(only(tmp_path / "two" / "train" / "runs"))
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_inside_a_multirun(data_dir, tmp_path):
    log_dir = tmp_path / "logs"
    args = [
        "-m",
        *tiny(data_dir),
        f"paths.log_dir={log_dir}",
        "trainer.max_epochs=1",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "objective.beta=0.5,1",
    ]
    result = run_script("train.py", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (log_dir / "train").iterdir()) == ["multiruns"]
    sweep = only(log_dir / "train" / "multiruns")
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
        assert (run / ".hydra" / "config.yaml").is_file()

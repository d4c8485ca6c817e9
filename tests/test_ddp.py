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


#: Deterministic objective and data (plain autoencoder, static binarisation, one data order), in
#: float64 with plain SGD. In float32 with Adam the claim depended on the CPU: gradients of pixels
#: that are almost always 0 are float rounding noise of either sign, summed in another order by
#: one process than by two, and Adam normalises them to full-size updates of either sign. In
#: float64 the noise is ~1e-16 relative and SGD passes it on unamplified, so the weights of the
#: two layouts agree to ~1e-12 on any CPU while a sharding error moves them by ~1e-3.
EQUIVALENCE = [
    "objective=ae",
    "data.binarize=static",
    "data.shuffle_seed=0",
    "trainer.max_epochs=1",
    "trainer.precision=64-true",
    "optimizer._target_=torch.optim.SGD",
    "~optimizer.fused",
    "optimizer.lr=1e-3",
]
#: Float64 rounding over the few steps of one epoch, with a margin; far below a sharding error.
TOLERANCE = dict(rtol=1e-9, atol=1e-11)


def two_process_weights(data_dir: Path, tmp_path: Path, *extra: str, env=None):
    tmp_path.mkdir(exist_ok=True)
    args = [*tiny(data_dir), f"paths.log_dir={tmp_path / 'two'}", *EQUIVALENCE]
    args += ["data.batch_size=16", "trainer=ddp_cpu", "trainer.devices=2", *extra]
    result = run_script("train.py", args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return last_weights(only(tmp_path / "two" / "train" / "runs"))


def test_two_processes_with_batch_b_match_one_with_batch_2b(data_dir, tmp_path):
    """DDP's averaged gradients equal the big batch's, so the weights agree; a wrong shard
    (every process on rank 0's examples) is caught by the same comparison."""
    train(data_dir, tmp_path / "one", *EQUIVALENCE, "data.batch_size=32", "trainer=cpu")
    one = last_weights(only(tmp_path / "one" / "train" / "runs"))
    assert all(t.dtype == torch.float64 for t in one.values())
    two = two_process_weights(data_dir, tmp_path)
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, **TOLERANCE, msg=name)

    wrong = two_process_weights(
        data_dir,
        tmp_path / "wrong",
        "data._target_=helpers.wrong_shard.SameShardEverywhere",
        env={"PYTHONPATH": str(Path(__file__).parent)},
    )
    differences = [(wrong[name] - tensor).abs().max().item() for name, tensor in one.items()]
    assert max(differences) > 1e3 * TOLERANCE["atol"], differences
    with pytest.raises(AssertionError):
        for name, tensor in one.items():
            torch.testing.assert_close(wrong[name], tensor, **TOLERANCE)


def test_vqvae_codebook_updates_agree_across_processes(data_dir, tmp_path):
    """The EMA codebook statistics are all-reduced: two processes with batch B end with the
    codebook (and weights) of one process with batch 2B."""
    args = [o for o in EQUIVALENCE if o != "objective=ae"]
    args += ["model=vqvae", "objective=vq", "model.n_codes=16", "model.hidden_channels=8"]
    args += ["model.residual_channels=4", "model.code_dim=4"]
    runs = {}
    for name, extra in (
        ("one", ["data.batch_size=32", "trainer=cpu"]),
        ("two", ["data.batch_size=16", "trainer=ddp_cpu", "trainer.devices=2"]),
    ):
        overrides = [o for o in tiny(data_dir) if not o.startswith("model.latent_dim")]
        overrides += [f"paths.log_dir={tmp_path / name}", *args, *extra]
        result = run_script("train.py", overrides, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = last_weights(only(tmp_path / name / "train" / "runs"))
    assert runs["one"]["model.quantizer.embedding"].dtype == torch.float64
    for name, tensor in runs["one"].items():
        torch.testing.assert_close(runs["two"][name], tensor, **TOLERANCE, msg=name)


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

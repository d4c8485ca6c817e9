"""The SLURM path on a live scheduler: `hydra/launcher=slurm` submits real jobs to the
single-node cluster of scripts/local_slurm.sh (CI starts it; `SLURM_CONF` points at it).

A sweep of two jobs, a sweep with a failing job, one job of two DDP tasks that matches the
single process with the doubled batch, and a job signalled for pre-emption that is requeued and
ends with the weights of an uninterrupted one. Skipped, with the reason, where no cluster runs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.runs import REPO, tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_ddp import EQUIVALENCE, TOLERANCE

pytestmark = pytest.mark.slow


def cluster_problem() -> str | None:
    """Why no live SLURM cluster can be used here, or None."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (apt-get install slurm-wlm munge)"
    if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").is_file():
        return "no cluster: start one with scripts/local_slurm.sh start and export SLURM_CONF"
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        return f"sinfo finds no cluster ({(result.stderr or result.stdout).strip()[:200]})"
    return None


PROBLEM = cluster_problem()
needs_cluster = pytest.mark.skipif(PROBLEM is not None, reason=f"no live SLURM: {PROBLEM}")

#: Sized for a small CPU node: one CPU and 1 GB per task, CPU trainers.
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=cpu",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    # submitit counts a signal in the last 10 minutes (or 20%) of the limit as a time-out
    "hydra.launcher.timeout_min=30",
]


def launch(tmp_path: Path, *args: str, wait: bool = True):
    """`python train.py -m <launcher> ...` as a user types it; returns the finished process (or
    the running one with wait=False) and the log dir."""
    log_dir = tmp_path / "logs"
    command = [sys.executable, str(REPO / "train.py"), "-m", *LAUNCHER]
    command += [*tiny(tmp_path.parent / "data"), f"paths.log_dir={log_dir}", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not wait:
        return subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ), log_dir
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    ), log_dir


@pytest.fixture
def work(data_dir, tmp_path) -> Path:
    """A folder beside a copy of the fake data (the jobs read it from the shared disk)."""
    shutil.copytree(data_dir, tmp_path / "data")
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def sweep_dir(log_dir: Path) -> Path:
    (path,) = (log_dir / "train" / "multiruns").iterdir()
    return path


def runs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if (p / ".hydra").is_dir()), key=lambda p: p.name)


def job_results(path: Path) -> list:
    """What each job returned (submitit's result pickles: ("success", JobReturn) each)."""
    results = []
    for file in sorted((path / ".submitit").glob("*/*_result.pkl")):
        with open(file, "rb") as f:
            results.append(pickle.load(f))
    return results


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@needs_cluster
def test_a_sweep_runs_as_slurm_jobs(work):
    result, log_dir = launch(work, "trainer=cpu", "model.latent_dim=2,8")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    path = sweep_dir(log_dir)
    run_dirs = runs(path)
    assert [r.name.split("_")[0] for r in run_dirs] == ["0", "1"]
    assert not (path / "failures.jsonl").exists()
    for run in run_dirs:
        assert (run / ".hydra" / "config.yaml").is_file()
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    # the launcher's logs: <sweep dir>/.submitit/<job id>/<job id>_<task>_log.{out,err}
    logs = sorted((path / ".submitit").glob("*/*_0_log.err"))
    assert len(logs) == 2, sorted(p.name for p in (path / ".submitit").rglob("*"))
    # each job returned train.py's metric (optimized_metric: the last val/elbo)
    returned = sorted(
        float(ret.return_value) for status, ret in job_results(path) if status == "success"
    )
    summaries = sorted(
        json.loads((run / "summary.json").read_text())["last"]["metrics"]["val/elbo"]
        for run in run_dirs
    )
    assert returned == pytest.approx(summaries, abs=1e-4)
    assert "Sweep finished: 2 runs, 0 without a result" in result.stdout


@needs_cluster
def test_a_failed_job_is_reported_and_the_other_finishes(work):
    result, log_dir = launch(work, "trainer=cpu", "model.latent_dim=2,0")
    assert result.returncode != 0
    path = sweep_dir(log_dir)
    (failure,) = [json.loads(line) for line in (path / "failures.jsonl").read_text().splitlines()]
    assert failure["job"] == 1 and "model.latent_dim=0" in failure["overrides"]
    assert "latent_dim must be an integer >= 1, got 0" in failure["error"]
    assert failure["slurm_job_id"].endswith("_1")
    log = Path(failure["log"])
    assert log.is_file() and log.parent.parent == path / ".submitit", log
    finished = [r for r in runs(path) if (r / "checkpoints" / "last.ckpt").is_file()]
    assert [r.name.split("_")[0] for r in finished] == ["0"]
    assert "failed: ConfigError: model.latent_dim must be" in result.stdout


@needs_cluster
def test_one_job_of_two_ddp_tasks_matches_one_process_with_the_doubled_batch(work, data_dir):
    """Lightning's SLURM environment gives the two tasks their ranks; the result is one run dir
    whose weights equal the single process's with batch 2B (the check of tests/test_ddp.py)."""
    result, log_dir = launch(
        work, *EQUIVALENCE, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=16", "seed=0"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run,) = runs(sweep_dir(log_dir))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    two = last_weights(run)

    single = work / "single"
    single.mkdir()
    args = [*tiny(work.parent / "data"), f"paths.log_dir={single}", *EQUIVALENCE]
    args += ["trainer=cpu", "data.batch_size=32", "seed=0"]
    subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=single, check=True, capture_output=True
    )
    (one_run,) = (single / "train" / "runs").iterdir()
    one = last_weights(one_run)
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, **TOLERANCE, msg=name)


def signal_and_wait(process: subprocess.Popen, log_dir: Path) -> str:
    """Send the requeue signal to job 0 once it has validated three epochs; wait for the sweep."""
    deadline = time.monotonic() + 300
    target = None
    while target is None:
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the jobs did not start training"
        for log in (log_dir / "train" / "multiruns").glob("*/0_*/train.log"):
            if "epoch 2 (step" in log.read_text():
                target = log.parent
        time.sleep(0.2)
    job_id = next((sweep_dir(log_dir) / ".submitit").glob("*_0")).name
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output.decode()[-3000:]
    return output.decode()


@needs_cluster
def test_a_preempted_job_is_requeued_and_resumes_to_the_uninterrupted_result(work):
    """Two identical jobs; one gets SIGUSR2 (what SLURM sends `signal_delay_s` before the time
    limit for submitit) while it trains: it writes last.ckpt at the next batch boundary, is
    requeued, continues in the same run dir and ends with exactly the other job's weights and the
    same curves, each step once. Over 30 s: two jobs through a live scheduler and a requeue are
    what is tested."""
    args = [
        "trainer=cpu",
        "trainer.max_epochs=12",
        "seed=0,0",
        "callbacks.images.every_n_epochs=100",
    ]
    process, log_dir = launch(work, *args, wait=False)
    try:
        output = signal_and_wait(process, log_dir)
        assert "Sweep finished: 2 runs, 0 without a result" in output
    finally:
        process.kill()  # only if it is still running: a test failure must not leave it behind
    target = next(r for r in runs(sweep_dir(log_dir)) if r.name.startswith("0_"))
    log = (target / "train.log").read_text()
    assert "requeue signal: checkpoint saved at step" in log
    assert "requeued job (SLURM_RESTART_COUNT=1): continuing from" in log
    (other,) = [r for r in runs(sweep_dir(log_dir)) if r != target]
    interrupted, uninterrupted = last_weights(target), last_weights(other)
    for name, tensor in uninterrupted.items():
        assert torch.equal(interrupted[name], tensor), name
    curves = {}
    for run in (target, other):
        accumulator = EventAccumulator(str(run / "tensorboard"))
        accumulator.Reload()
        curves[run] = {
            tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in ("train/loss", "val/elbo")
        }
    steps = [step for step, _ in curves[target]["train/loss"]]
    assert steps == sorted(set(steps))  # no step twice, none missing against the other run
    assert curves[target] == curves[other]

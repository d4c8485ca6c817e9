"""Sweep bookkeeping: Hydra callbacks that record which runs of a multirun failed and why, and
print one line per run when the sweep ends.

Hydra's launchers run every job of a sweep even when one fails, then re-raise the first failure
at the end. `RecordFailures` writes one JSON line per failed job to `<sweep dir>/failures.jsonl`
(job number, overrides, run dir, error), so the finished runs' results and the reason for each
failure stay on disk; evaluate.py's sweep report reads it. `SweepSummary` prints, when the sweep
ends (also when a run failed: Hydra then raises before its end-of-sweep hook, so the summary
comes at exit), each run's monitored metric from its `summary.json`, the best run marked.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vaelab import commands
from vaelab.evaluation.sweep import FAILURES_FILE, read_failures, run_dirs
from vaelab.loggers import DEFAULT_LOGGERS, logger_settings, viewers

log = logging.getLogger(__name__)


class RecordFailures(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or config.hydra.mode.name != "MULTIRUN":
            return
        error = job_error(job_return)
        entry = {
            "job": config.hydra.job.num,
            "overrides": list(job_return.overrides or []),
            "run_dir": str(Path(config.hydra.runtime.output_dir).name),
            "error": f"{type(error).__name__}: {error}".splitlines()[0],
            **slurm_job(),
        }
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(sweep_dir / FAILURES_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")
        log.error(
            "run %s (%s) failed: %s", entry["job"], " ".join(entry["overrides"]), entry["error"]
        )


def job_error(job_return: JobReturn) -> BaseException | None:
    """What a failed job raised: its `return_value` raises it (and writes a line to stderr that
    Hydra writes again at the end of the sweep, silenced here)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _ = job_return.return_value
    except Exception as e:  # the job's own exception, whatever it is
        return e
    return None


def slurm_job() -> dict[str, str]:
    """The SLURM job id and the job's log file, when this job runs under SLURM (submitit)."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    entry = {"slurm_job_id": os.environ["SLURM_JOB_ID"]}
    try:
        import submitit

        environment = submitit.JobEnvironment()
    except (ImportError, RuntimeError):  # not started by submitit: the id alone
        return entry
    entry["slurm_job_id"] = environment.job_id  # <array job>_<task> for a sweep
    entry["log"] = str(environment.paths.stdout).replace("%t", str(environment.global_rank))
    return entry


def format_sweep_summary(sweep_dir: Path, loggers: Mapping | None = DEFAULT_LOGGERS) -> str:
    """One line per run: its best monitored value (epoch) and last value, or why it has none;
    the best run marked with *; then the commands that show the sweep in each of `loggers` (the
    sweep's logger group, `logger_settings`)."""
    from vaelab.summary import better, next_lines, read_summary  # it imports the callbacks

    failures = read_failures(sweep_dir)
    rows = []
    for run_dir in run_dirs(sweep_dir):
        summary = read_summary(run_dir)
        rows.append((run_dir.name, summary))
    finished = [(name, s) for name, s in rows if s and s.get("best")]
    best_name, best_value = None, math.nan
    for name, summary in finished:
        value, mode = (
            summary["best"]["metrics"][summary["monitor"]["metric"]],
            summary["monitor"]["mode"],
        )
        if not math.isfinite(value):
            continue
        if best_name is None or better(value, best_value, mode):
            best_name, best_value = name, value
    failed = sum(1 for name, s in rows if name in failures or not s)
    lines = [f"Sweep finished: {len(rows)} runs, {failed} without a result, in {sweep_dir}"]
    width = max((len(name) for name, _ in rows), default=0)
    for name, summary in rows:
        mark = "*" if name == best_name else " "
        if name in failures:
            text = f"failed: {failures[name]}"
        elif not summary:
            text = "no summary.json (failed or unfinished)"
        elif not summary.get("best"):
            text = "finished without a validation result"
        else:
            metric = summary["monitor"]["metric"]
            best, last = summary["best"], summary["last"]
            text = (
                f"{metric} best {best['metrics'][metric]:.4f} (epoch {best['epoch']}), "
                f"last {last['metrics'][metric]:.4f}, {summary['epochs']} epochs"
            )
        lines.append(f" {mark} {name:<{width}}  {text}")
    if best_name:
        lines.append("   (* the best run on its monitored metric)")
    following = viewers(loggers, sweep_dir, sweep=True)
    following.append(f"python evaluate.py {commands.override('run', sweep_dir)}")
    return "\n".join(lines + next_lines(following))


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.loggers: Mapping | None = DEFAULT_LOGGERS

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.loggers = logger_settings(config.get("logger"))
        atexit.register(self.report)  # a failed run makes Hydra raise before on_multirun_end

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.report()

    def report(self) -> None:
        if self.sweep_dir is None:
            return
        sweep_dir, self.sweep_dir = self.sweep_dir, None
        atexit.unregister(self.report)
        # printed, not logged: after the jobs, the root logger may still write to the last run's
        # train.log
        print(format_sweep_summary(sweep_dir, self.loggers), flush=True)

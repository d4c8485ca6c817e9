"""Sweep bookkeeping: a Hydra callback that records which runs of a multirun failed and why.

Hydra's launchers run every job of a sweep even when one fails, then re-raise the first failure
at the end. This callback writes one JSON line per failed job to `<sweep dir>/failures.jsonl`
(job number, overrides, run dir, error), so the finished runs' results and the reason for each
failure stay on disk; evaluate.py's sweep report reads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
FAILURES_FILE = "failures.jsonl"


class RecordFailures(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or config.hydra.mode.name != "MULTIRUN":
            return
        error = job_return._return_value  # the exception (JobReturn keeps it private)
        entry = {
            "job": config.hydra.job.num,
            "overrides": list(job_return.overrides or []),
            "run_dir": str(Path(config.hydra.runtime.output_dir).name),
            "error": f"{type(error).__name__}: {error}".splitlines()[0],
        }
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(sweep_dir / FAILURES_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")
        log.error(
            "run %s (%s) failed: %s", entry["job"], " ".join(entry["overrides"]), entry["error"]
        )


def read_failures(sweep_dir: Path) -> dict[str, str]:
    """Run dir name -> error, from failures.jsonl (empty when no run failed)."""
    file = sweep_dir / FAILURES_FILE
    if not file.is_file():
        return {}
    entries = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return {entry["run_dir"]: entry["error"] for entry in entries}

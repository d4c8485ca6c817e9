"""The end of a run: what it reached, where it is, and what to run next.

`run_summary` gathers it from the trainer (the validation history of
`vaelab.callbacks.MetricsHistory`, the best and last checkpoints) and the metrics the run
returns; `format_run_summary` is the text the terminal and `train.log` show; `summary.json` in
the run dir holds the same for scripts and for the sweep summary (`vaelab.sweeps`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L

from vaelab import commands
from vaelab.callbacks.checkpointing import LastCheckpoint
from vaelab.callbacks.reporting import MetricsHistory
from vaelab.loggers import viewers

SUMMARY_FILE = "summary.json"
NATS = (
    "loss",
    "elbo",
    "rate",
    "distortion",
    "iwae",
    "nll_is",
    "nll_is_sem",
    "elbo_is",
    "mi",  # beta-TCVAE's decomposition of the rate, FactorVAE's discriminator estimate
    "tc",
    "dim_kl",
)


def metric_unit(name: str, squared_error: bool = False) -> str:
    """The unit of a logged metric (`val/elbo` -> nats per example)."""
    base = name.split("/")[-1]
    if base in ("bpd", "bpd_elbo"):
        return "bits/dim"
    if base == "mse":
        return "squared error per pixel"
    if base == "active_units":
        return "latent dims"
    if (base == "loss" and squared_error) or base == "squared_error":
        return "squared error per example"
    if base == "code_penalty":
        return "|z|^2 / 2 per example"
    if base in NATS or base.startswith("rate_"):  # rate_z1, rate_z2: per stochastic layer
        return "nats per example"
    if base == "commitment":
        return "squared distance per example"
    if base == "perplexity":
        return "codes"
    if base == "usage":
        return "fraction of codes"
    if base == "discriminator_accuracy":
        return "fraction"
    if name.startswith("disentanglement/"):
        return "score in [0, 1]"
    return ""


def better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def run_summary(
    trainer: L.Trainer, cfg, metrics: dict[str, float], seconds: float
) -> dict[str, Any]:
    """What the run reached, as plain data (written to summary.json)."""
    monitor = cfg.get("monitor") or {"metric": "val/elbo", "mode": "max"}
    metric, mode = monitor["metric"], monitor.get("mode", "max")
    history = next((c for c in trainer.callbacks if isinstance(c, MetricsHistory)), None)
    entries = history.history if history else []
    last = entries[-1] if entries else None
    scored = [e for e in entries if math.isfinite(e["metrics"].get(metric, math.nan))]
    best = None
    for entry in scored:
        if best is None or better(entry["metrics"][metric], best["metrics"][metric], mode):
            best = entry
    checkpoints = {}
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "best_model_path", ""):
        checkpoints["best"] = str(callback.best_model_path)
    last_ckpt = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    if last_ckpt is not None and last_ckpt.path.is_file():
        checkpoints["last"] = str(last_ckpt.path)
    objective = cfg.get("objective") or {}
    return {
        "run_dir": str(cfg.paths.output_dir),
        "interrupted": bool(trainer.interrupted),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "seconds": round(seconds, 1),
        "monitor": {"metric": metric, "mode": mode},
        "last": last,
        "best": best,
        "final": {
            name: value
            for name, value in metrics.items()
            if name.startswith("test/") and isinstance(value, float)
        },
        "final_k": (cfg.get("final_evaluation") or {}).get("k"),
        "squared_error": objective.get("reconstruction") == "mse",
        "checkpoints": checkpoints,
        "viewers": viewers(cfg.get("logger"), Path(str(cfg.paths.output_dir))),
    }


def write_summary(summary: dict[str, Any]) -> Path:
    path = Path(summary["run_dir"]) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def format_run_summary(summary: dict[str, Any]) -> str:
    """The end-of-run text: metrics at the last and the best epoch with their units, the
    checkpoints, the run dir and the commands to look at it."""
    squared = summary.get("squared_error", False)
    state = "stopped early" if summary.get("interrupted") else "finished"
    run_dir = summary["run_dir"]
    if not summary["steps"]:
        return (
            f"Run {state}: nothing was trained (0 steps: trainer.max_epochs, max_steps or "
            f"max_time allowed none), so there is no checkpoint to evaluate\nRun dir: {run_dir}"
        )
    lines = [
        f"Run {state}: {summary['epochs']} epochs, {summary['steps']} steps in "
        f"{duration(summary['seconds'])}",
    ]
    last, best = summary.get("last"), summary.get("best")
    final = summary.get("final") or {}
    names = list(last["metrics"]) if last else []
    width = max((len(name) for name in [*names, *final, "validation"]), default=0)
    if last:
        head_last = f"last (epoch {last['epoch']})"
        head_best = f"best (epoch {best['epoch']})" if best else ""
        lines.append(f"  {'validation':<{width}}  {head_last:>16}  {head_best:>16}  unit")
        for name in names:
            best_value = best["metrics"].get(name) if best else None
            best_text = f"{best_value:16.4f}" if best_value is not None else " " * 16
            lines.append(
                f"  {name:<{width}}  {last['metrics'][name]:16.4f}  {best_text}  "
                f"{metric_unit(name, squared)}"
            )
        monitor = summary["monitor"]
        lines.append(f"  (best: the epoch with the {monitor['mode']} {monitor['metric']})")
    if final:
        k = summary.get("final_k")
        lines.append(f"  {'test':<{width}}  " + (f"importance sampling, k={k}" if k else ""))
        for name, value in sorted(final.items()):
            lines.append(f"  {name:<{width}}  {value:16.4f}  {metric_unit(name, squared)}")
    checkpoints = summary.get("checkpoints") or {}
    for kind in ("best", "last"):
        if kind in checkpoints:
            lines.append(f"Checkpoint ({kind}): {checkpoints[kind]}")
    lines.append(f"Run dir: {run_dir}")
    following = list(summary.get("viewers", []))
    if summary.get("interrupted"):
        following.append(f"python train.py {commands.override('resume', run_dir)}")
    following.append(f"python evaluate.py {commands.override('run', run_dir)}")
    return "\n".join(lines + next_lines(following))


def next_lines(commands_to_run: list[str]) -> list[str]:
    """`Next: <first>` and the others aligned under it."""
    return [("Next: " if i == 0 else "      ") + line for i, line in enumerate(commands_to_run)]

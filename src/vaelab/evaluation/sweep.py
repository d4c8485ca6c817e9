"""Reports over a Hydra multirun dir: one row per run, a table and comparison plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from vaelab.errors import CheckpointError  # noqa: E402

#: one JSON line per failed run of a sweep (vaelab.sweeps.RecordFailures writes it)
FAILURES_FILE = "failures.jsonl"
COLUMNS = ["elbo", "nll_is", "rate", "distortion", "active_units", "mse"]
#: disentanglement metrics, columns only when some run has them (data with factors)
FACTOR_COLUMNS = ["mig", "dci_disentanglement"]


def is_sweep_dir(path: Path) -> bool:
    """A Hydra multirun dir: it has multirun.yaml, or run subdirs (with .hydra) but no
    checkpoints of its own."""
    if (path / "multirun.yaml").is_file():
        return True
    return not (path / "checkpoints").exists() and any(
        (child / ".hydra").is_dir() for child in path.iterdir() if child.is_dir()
    )


def sweep_runs(path: Path) -> list[Path]:
    runs = run_dirs(path)
    if not runs:
        raise CheckpointError(f"run={path} is a sweep dir with no runs in it")
    return runs


def read_failures(sweep_dir: Path) -> dict[str, str]:
    """Run dir name -> error, from failures.jsonl (empty when no run failed)."""
    file = sweep_dir / FAILURES_FILE
    if not file.is_file():
        return {}
    entries = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return {entry["run_dir"]: entry["error"] for entry in entries}


def run_dirs(sweep_dir: Path) -> list[Path]:
    """The run subdirs of a sweep dir (those with .hydra/), in job order."""

    def number(child: Path) -> tuple[int, str]:
        head = child.name.split("_")[0]
        return (int(head) if head.isdigit() else 1 << 30, child.name)

    children = (
        [c for c in sweep_dir.iterdir() if (c / ".hydra").is_dir()] if sweep_dir.is_dir() else []
    )
    return sorted(children, key=number)


def overrides(run_dir: Path) -> dict[str, str]:
    """The swept values of one run, from Hydra's .hydra/overrides.yaml."""
    file = run_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(file.read_text()) if file.is_file() else []
    return dict(item.split("=", 1) for item in items or [] if "=" in item)


def evaluate_sweep(
    path: Path, out_dir: Path, evaluate_run: Callable[[Path, Path], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Evaluate every run of the sweep (`evaluate_run(run_dir, out_dir)`); failures are rows."""
    rows = []
    failures = read_failures(path)
    for run_dir in sweep_runs(path):
        row: dict[str, Any] = {"run": run_dir.name, **overrides(run_dir)}
        if run_dir.name in failures:
            row["status"] = f"failed: {failures[run_dir.name]}"
        elif not (run_dir / "checkpoints" / "last.ckpt").is_file():
            row["status"] = "no checkpoint (failed or unfinished)"
        else:
            try:
                row.update(evaluate_run(run_dir, out_dir / run_dir.name))
                row["status"] = "ok"
            except CheckpointError as e:
                row["status"] = f"error: {e}"
        rows.append(row)
    write_tables(rows, out_dir)
    plot_sweep(rows, out_dir)
    return rows


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> None:
    keys = ["run"]
    for row in rows:
        keys += [
            k
            for k in row
            if k not in keys
            and k not in (*COLUMNS, *FACTOR_COLUMNS, "status", "model_info", "samples", "metrics")
        ]
    factor_columns = [k for k in FACTOR_COLUMNS if any(row.get(k) is not None for row in rows)]
    keys += [*COLUMNS, *factor_columns, "status"]
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join([*keys, "samples"]) + " |", "|" + "---|" * (len(keys) + 1)]
    for row in rows:
        samples = f"![samples]({row['run']}/samples.png)" if row.get("samples") else "—"
        lines.append("| " + " | ".join([*(cell(row.get(k)) for k in keys), samples]) + " |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def cell(value: Any) -> str:
    """A table cell; a metric that is undefined for the run (e.g. an autoencoder's NLL) is —."""
    if value is None:
        return "—"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def plot_sweep(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """rate vs distortion (Alemi et al. 2018); NLL vs latent_dim; NLL vs beta (VAE runs)."""
    done = [r for r in rows if r.get("status") == "ok" and r.get("rate") is not None]
    if not done:  # nothing evaluated, or only plain autoencoders (no rate, no likelihood)
        return
    figure, axes = plt.subplots(figsize=(6, 5))
    for row in done:
        axes.scatter(row["rate"], row["distortion"])
        axes.annotate(
            point_label(row, done),
            (row["rate"], row["distortion"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    axes.margins(0.15)
    axes.set(xlabel="rate (nats)", ylabel="distortion (nats)", title="rate vs distortion")
    figure.tight_layout()
    figure.savefig(out_dir / "rate_distortion.png", dpi=120)
    plt.close(figure)
    for x_key, name in (("latent_dim", "latent_dim"), ("beta", "beta")):
        plot_metric_against(done, x_key, out_dir / f"nll_vs_{name}.png")
    plot_disentanglement(done, out_dir / "mig_vs_beta.png")


def plot_disentanglement(rows: list[dict[str, Any]], path: Path) -> None:
    """MIG and DCI disentanglement against beta (runs on data with ground-truth factors), one
    line per objective (beta-VAE, beta-TCVAE, ...)."""
    rows = [r for r in rows if r.get("mig") is not None]
    if not rows:
        return
    figure, axes = plt.subplots(figsize=(6, 4.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["model_info"].get("objective", "")), []).append(row)
    for objective, group in sorted(groups.items()):
        group = sorted(group, key=lambda r: float(r["model_info"]["beta"]))
        betas = [float(r["model_info"]["beta"]) for r in group]
        label = f" ({objective})" if len(groups) > 1 else ""
        axes.plot(betas, [r["mig"] for r in group], marker="o", label=f"MIG{label}")
        if all(r.get("dci_disentanglement") is not None for r in group):
            dci = [r["dci_disentanglement"] for r in group]
            axes.plot(betas, dci, marker="s", linestyle="--", label=f"DCI disentanglement{label}")
    axes.set_xscale("log", base=2)
    axes.set(xlabel="beta", ylabel="score", title="disentanglement vs beta", ylim=(0, 1))
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def point_label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The swept values that tell this run apart (`objective.beta=4`), else the run's name."""
    keys = [
        key
        for key in row
        if key
        not in ("run", "status", "model_info", "samples", "metrics", *COLUMNS, *FACTOR_COLUMNS)
        and len({str(other.get(key)) for other in rows}) > 1
    ]
    return ", ".join(f"{key}={row[key]}" for key in keys) or row["run"]


def plot_metric_against(rows: list[dict[str, Any]], x_key: str, path: Path) -> None:
    """NLL (or the ELBO's bound where NLL is undefined) against one hyper-parameter, one line per
    value of the other."""
    other = "beta" if x_key == "latent_dim" else "latent_dim"
    figure, axes = plt.subplots(figsize=(6, 4.5))
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["model_info"][other], []).append(row)
    for value, group in sorted(groups.items(), key=lambda item: float(item[0])):
        group = sorted(group, key=lambda r: r["model_info"][x_key])
        ys = [r["nll_is"] if r.get("nll_is") is not None else -r["elbo"] for r in group]
        axes.plot([r["model_info"][x_key] for r in group], ys, marker="o", label=f"{other}={value}")
    axes.set(xlabel=x_key, ylabel="test NLL (nats, IS)", title=f"NLL vs {x_key}")
    if x_key == "latent_dim":
        axes.set_xscale("log", base=2)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

"""Evaluation of a trained run, or of every run of a sweep.

For one run: restore its config and checkpoint, run the split through the same step as training
(`{split}/elbo`, `rate`, `distortion`), then one more pass for the importance-sampled
log-likelihood and posterior diagnostics (see vaelab.evaluation.metrics), pictures, and
`metrics.json`. Metrics and pictures also go to the run's own TensorBoard.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from vaelab import quiet
from vaelab.build import build_datamodule, build_module
from vaelab.callbacks import RandomState, step_callbacks
from vaelab.errors import CheckpointError, require
from vaelab.evaluation.code_density import code_density
from vaelab.evaluation.disentanglement import protocol_from
from vaelab.evaluation.disentanglement import report as factor_report
from vaelab.evaluation.disentanglement import scalars as disentanglement_scalars
from vaelab.evaluation.metrics import check_compile_choice, evaluate_split, summarise
from vaelab.evaluation.report import bpd_protocol, draw, format_table
from vaelab.evaluation.sweep import evaluate_sweep, is_sweep_dir
from vaelab.run import plan
from vaelab.run.checkpoints import find_checkpoint, read_saved
from vaelab.run.dirs import refuse_links
from vaelab.run.trust import Site

log = logging.getLogger(__name__)
SPLITS = ("test", "val")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.run`: a run dir, a .ckpt file, or a multirun (sweep) dir."""
    quiet.install()  # again: a caller's warnings.catch_warnings() may have reset the filters
    check_eval_config(cfg)
    torch.distributions.Distribution.set_default_validate_args(bool(cfg.get("validate_args")))
    path = Path(cfg.run).expanduser()
    out_dir = Path(cfg.paths.output_dir)
    if path.is_dir() and is_sweep_dir(path):
        refuse_links(path)  # each run's TensorBoard gets its results
        rows = evaluate_sweep(
            path, out_dir, lambda run_dir, sub: evaluate_run(cfg, run_dir, sub, run_dir.name)
        )
        print((out_dir / "summary.md").read_text())
        print(f"sweep report written to {out_dir}")
        return {"runs": rows}
    return evaluate_run(cfg, path, out_dir)


def check_eval_config(cfg: DictConfig) -> None:
    e = cfg.eval
    require(e.split in SPLITS, f"eval.split must be one of {', '.join(SPLITS)}, got {e.split!r}")
    require(
        isinstance(e.k, int) and not isinstance(e.k, bool) and e.k >= 1,
        f"eval.k must be an integer >= 1, got {e.k!r}",
    )
    require(
        e.max_codes == "auto"
        or (
            isinstance(e.max_codes, int) and not isinstance(e.max_codes, bool) and e.max_codes >= 1
        ),
        f"eval.max_codes must be auto or an integer >= 1, got {e.max_codes!r}",
    )
    check_compile_choice(e.get("compile", "auto"))
    require(
        e.get("disentanglement", "auto") in ("auto", True, False),
        f"eval.disentanglement must be auto, true or false, got {e.get('disentanglement')!r}",
    )
    require(
        e.limit is None or (isinstance(e.limit, int) and e.limit >= 1),
        f"eval.limit must be null or an integer >= 1, got {e.limit!r}",
    )


def evaluate_run(
    cfg: DictConfig, run: Path, out_dir: Path, label: str | None = None
) -> dict[str, Any]:
    """Evaluate one run dir or checkpoint into out_dir; return its summary row. `label` names
    the run on the progress bars (a sweep's run dir)."""
    run = Path(run).expanduser()
    run_dir = run if run.is_dir() else None
    if run.is_file() and run.parent.name == "checkpoints":
        run_dir = run.parent.parent  # a checkpoint of a run dir: its TensorBoard gets the results
    if run_dir is not None:
        refuse_links(run_dir)  # the evaluation writes into its tensorboard/
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = find_checkpoint(run, cfg.eval.checkpoint)
    saved, checkpoint = read_saved(ckpt_path, list(cfg.get("trusted_targets") or []))
    data = cfg.get("data") or {}
    site = Site(
        out_dir,
        cfg.paths.data_dir,
        data.get("root"),
        bool(data.get("download")),
        str(ckpt_path),
        verify=bool(data.get("verify", True)),
    )
    train_cfg = OmegaConf.create(plan.evaluation(saved, site, cfg.eval.batch_size))
    datamodule = build_datamodule(train_cfg)
    module = build_module(train_cfg, datamodule)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(
            f"{ckpt_path}: weights do not match the model its config describes ({detail[:300]})"
        ) from e

    split = cfg.eval.split
    show_progress = bool(cfg.eval.get("progress_bar", True))
    metrics = step_metrics(cfg, module, datamodule, split, show_progress)
    device = pick_device(cfg.eval.accelerator)
    model = module.model.to(device).eval()
    torch.manual_seed(cfg.seed)
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    probabilistic = module.objective.probabilistic
    start = time.perf_counter()
    results = evaluate_split(
        model,
        loader,
        datamodule,
        cfg.eval.k,
        cfg.eval.max_codes,
        device,
        limit=cfg.eval.limit,
        probabilistic=probabilistic,
        compile=cfg.eval.get("compile", "auto"),
        progress=(
            f"{label + ': ' if label else ''}importance sampling, k={cfg.eval.k}"
            if show_progress
            else None
        ),
    )
    seconds = time.perf_counter() - start
    bpd_offset = model.likelihood.bpd_offset(datamodule.pixel_model)
    is_metrics, per_dim = summarise(results, split, datamodule.num_dims, bpd_offset)
    metrics.update(is_metrics)

    report = {
        "checkpoint": str(ckpt_path),
        "global_step": checkpoint.get("global_step"),
        "split": split,
        "k": cfg.eval.k,
        "max_codes": results.max_codes,
        "examples_importance_sampled": sum(len(t) for t in results.log_likelihood),
        # examples behind the posterior diagnostics (all of the split unless eval.limit)
        "examples_evaluated": len(results.cat("posterior_mean")),
        # wall time of the pass over the split (importance sampling, posterior diagnostics)
        "seconds": round(seconds, 3),
        "device": str(device),
        "objective": repr(module.objective),
        "denoising": datamodule.noise if datamodule.noise != "none" else None,
        "pixel_model": (
            f"{datamodule.pixel_description}; {bpd_protocol(bpd_offset, datamodule.pixel_model)}"
        ),
        "units": "nats per example; bpd in bits per dimension (from nll_is); mse per pixel",
        "metrics": metrics,
        **per_dim,
    }
    if model.evaluation_note:
        report["note"] = model.evaluation_note  # what the figures mean for this model family
    factor_pictures = disentanglement_report(cfg, model, datamodule, device, report, metrics)
    density = None
    if not probabilistic:
        report["nll_is"] = (
            f"undefined: {module.objective!r} is a deterministic autoencoder with no density "
            "over its codes, so log p(x) cannot be estimated"
        )
        if model.flat_code_dim is not None:  # sampled through the codes' ex-post density
            density, n_codes = code_density(model, datamodule, device, seed=cfg.seed)
            report["samples"] = (
                f"decoded z ~ a {density.mixture_distribution.probs.numel()}-component "
                f"Gaussian mixture fitted on {n_codes} training codes (Ghosh et al. 2020's "
                "ex-post density), not the prior"
            )
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    subset = ""  # eval.limit: what the pass computed from a subset is kept apart in TensorBoard
    if report["examples_evaluated"] < len(loader.dataset):
        subset = f"_first{report['examples_evaluated']}"
    renamed = {key: key.replace(f"{split}/", f"{split}{subset}/", 1) for key in is_metrics}
    tensorboard_metrics = {renamed.get(key, key): value for key, value in metrics.items()}
    kl_order = per_dim["kl_dim_order"]
    draw(
        model,
        results,
        kl_order,
        out_dir,
        run_dir,
        report,
        cfg.seed,
        tensorboard_metrics,
        subset,
        factor_pictures,
        density,
    )
    print(format_table(report))
    print(f"metrics and pictures written to {out_dir}")
    return {
        **{
            name: metrics.get(f"{split}/{name}")
            for name in ("elbo", "nll_is", "rate", "distortion", "active_units", "mse")
        },
        **{
            name: metrics.get(f"disentanglement/{name}")
            for name in ("mig", "dci_disentanglement")
            if f"disentanglement/{name}" in metrics
        },
        "metrics": metrics,
        "samples": str(out_dir / "samples.png"),
        "model_info": {
            "latent_dim": train_cfg.model.get("latent_dim"),
            "beta": train_cfg.objective.get("beta", 1.0),
            "objective": str(train_cfg.objective.get("_target_", "")).rsplit(".", 1)[-1],
        },
    }


def disentanglement_report(cfg, model, datamodule, device, report, metrics) -> dict | None:
    """Disentanglement metrics (into `metrics` and the report) and pictures, for data with
    ground-truth factors (eval.disentanglement); None when not computed."""
    choice = cfg.eval.get("disentanglement", "auto")
    if choice is False or (choice == "auto" and datamodule.factors is None):
        return None
    require(
        datamodule.factors is not None,
        f"eval.disentanglement=true needs data with ground-truth factors (dsprites, "
        f"dsprites_like); {datamodule.name} has none",
    )
    flat = model.flat_code_dim is not None
    if choice == "auto" and not flat:
        log.info(
            "eval.disentanglement: %s has no flat latent vector; skipped", type(model).__name__
        )
        return None
    require(
        flat,
        f"eval.disentanglement needs one flat latent vector; {type(model).__name__} has none",
    )
    protocol = protocol_from(
        cfg.eval.get("disentanglement_protocol"), "eval.disentanglement_protocol"
    )
    start = time.perf_counter()
    results, figures = factor_report(model, datamodule, device, protocol, progress=log.info)
    metrics.update(disentanglement_scalars(results))
    report["disentanglement"] = {
        "grid_images": len(datamodule.factors),
        "factors": dict(zip(datamodule.factors.names, datamodule.factors.sizes, strict=True)),
        "protocol": asdict(protocol),
        "seconds": round(time.perf_counter() - start, 3),
        "seconds_per_metric": results["seconds"],
        **{name: value.tolist() for name, value in results.items() if name.endswith("_matrix")},
    }
    return figures


def step_metrics(
    cfg: DictConfig, module, datamodule, split: str, progress_bar: bool = True
) -> dict[str, float]:
    """The training step's metrics on the split, through Lightning's test/validate loop."""
    trainer = L.Trainer(
        accelerator=cfg.eval.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        default_root_dir=cfg.paths.output_dir,
        callbacks=[
            *step_callbacks(module.model, datamodule),
            RandomState(eval_seed=0),
            *([TQDMProgressBar()] if progress_bar else []),
        ],
    )
    loop = trainer.test if split == "test" else trainer.validate
    (results,) = loop(module, datamodule=datamodule, verbose=False)
    metrics = {name: float(value) for name, value in results.items()}
    # The step's bpd comes from the ELBO; `{split}/bpd` is reserved for the tighter IS estimate.
    if f"{split}/bpd" in metrics:
        metrics[f"{split}/bpd_elbo"] = metrics.pop(f"{split}/bpd")
    return metrics


def pick_device(accelerator: str) -> torch.device:
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")

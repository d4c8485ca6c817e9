"""Evaluation of a trained run: restore its config and checkpoint, run a split through the same
step as training, print and save the metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, open_dict

from vaelab.build import build_datamodule, build_module
from vaelab.checkpoints import checkpoint_config, find_checkpoint, load_checkpoint
from vaelab.errors import CheckpointError, require

log = logging.getLogger(__name__)
SPLITS = ("test", "val")


def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate `cfg.run` (run dir or .ckpt) on `cfg.eval.split`; write metrics.json."""
    require(
        cfg.eval.split in SPLITS,
        f"eval.split must be one of {', '.join(SPLITS)}, got {cfg.eval.split!r}",
    )
    ckpt_path = find_checkpoint(cfg.run, cfg.eval.checkpoint)
    checkpoint = load_checkpoint(ckpt_path)
    train_cfg = checkpoint_config(checkpoint, ckpt_path)
    with open_dict(train_cfg):
        # Data live where this machine keeps them, not where the training machine did.
        train_cfg.data.data_dir = cfg.paths.data_dir
        if cfg.eval.batch_size is not None:
            train_cfg.data.eval_batch_size = cfg.eval.batch_size
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(train_cfg)
    module = build_module(train_cfg, datamodule)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(
            f"{ckpt_path}: weights do not match the model its config describes ({detail[:300]})"
        ) from e

    trainer = L.Trainer(
        accelerator=cfg.eval.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=cfg.paths.output_dir,
    )
    loop = trainer.test if cfg.eval.split == "test" else trainer.validate
    (results,) = loop(module, datamodule=datamodule, verbose=False)
    metrics = {name: float(value) for name, value in results.items()}

    report = {
        "checkpoint": str(ckpt_path),
        "split": cfg.eval.split,
        "pixel_model": datamodule.pixel_model,
        "units": "nats per example; bpd in bits per dimension",
        "metrics": metrics,
    }
    out = Path(cfg.paths.output_dir) / "metrics.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(metrics, ckpt_path, datamodule.pixel_model))
    print(f"metrics written to {out}")
    return metrics


def format_table(metrics: dict[str, float], ckpt_path: Path, pixel_model: str) -> str:
    width = max(len(name) for name in metrics)
    lines = [f"checkpoint: {ckpt_path}", f"data: {pixel_model}"]
    lines += [f"  {name:<{width}}  {value:12.4f}" for name, value in sorted(metrics.items())]
    return "\n".join(lines)

"""Training: compose -> instantiate -> Trainer.fit; returns the metrics it computed."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab import evaluate, quiet
from vaelab.build import build_datamodule, build_module, build_trainer
from vaelab.callbacks import reliability_callbacks
from vaelab.ddp import use_hydra_child_command
from vaelab.errors import CheckpointError, require_int
from vaelab.resume import checkpoint_step, resume_config
from vaelab.stages import load_autoencoder, second_stage_config
from vaelab.summary import format_run_summary, run_summary, write_summary

log = logging.getLogger(__name__)
TENSORBOARD_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


def instantiate_group(group: DictConfig | None, **kwargs_by_target: dict) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers); entries whose
    `_target_` is a key of `kwargs_by_target` get those extra arguments."""
    if not group:
        return []
    return [
        instantiate(entry, **kwargs_by_target.get(entry._target_, {}))
        for entry in group.values()
        if entry and "_target_" in entry
    ]


def run(cfg: DictConfig) -> dict[str, float]:
    """Train one model; return the final epoch's metrics (and test metrics if cfg.test)."""
    environment = dict(os.environ)
    try:
        return train(cfg)
    finally:
        # A DDP run leaves its process group and Lightning's MASTER_PORT, LOCAL_RANK, ... in
        # this process; the next run of a sweep must start clean.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


def train(cfg: DictConfig) -> dict[str, float]:
    quiet.install()  # again: a caller's warnings.catch_warnings() may have reset the filters
    if cfg.get("resume"):
        cfg = resume_config(cfg)
    elif requeued_checkpoint(cfg) is not None:
        with open_dict(cfg):  # a requeued SLURM job: continue where it was stopped
            cfg.ckpt_path = str(requeued_checkpoint(cfg))
        log.info(
            "requeued job (SLURM_RESTART_COUNT=%s): continuing from %s",
            os.environ["SLURM_RESTART_COUNT"],
            cfg.ckpt_path,
        )
    if "autoencoder_run" in cfg.keys() and not cfg.get("resume"):  # (keys(): also when ???)
        cfg = second_stage_config(cfg)  # a code prior on a trained VQ-VAE (its model, data)
    use_hydra_child_command()  # DDP processes join this run's dir, in a sweep too
    torch.distributions.Distribution.set_default_validate_args(bool(cfg.get("validate_args")))
    if cfg.get("seed") is not None:
        require_int("seed", cfg.seed, 0)
        L.seed_everything(cfg.seed, workers=True)
    # The task config (a composed config may carry Hydra's own node, which is not the run's).
    task_keys = [key for key in cfg if key != "hydra"]
    run_config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, task_keys), resolve=True)
    if HydraConfig.initialized():  # which option of each group, for the HParams table
        run_config["choices"] = {
            group: choice
            for group, choice in HydraConfig.get().runtime.choices.items()
            if not group.startswith("hydra") and choice is not None
        }
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule, run_config=run_config)
    if cfg.get("autoencoder_checkpoint") and not cfg.get("ckpt_path"):
        load_autoencoder(module.model, cfg.autoencoder_checkpoint)  # (frozen by the model)
    logger_kwargs = {}
    if cfg.get("ckpt_path"):
        # Continuing: TensorBoard drops the events the interrupted run logged after this
        # checkpoint (the SummaryWriter's purge_step), so the curves have no duplicated steps.
        purge = {"purge_step": checkpoint_step(cfg.ckpt_path)}
        logger_kwargs = {TENSORBOARD_LOGGER: purge}
    loggers = instantiate_group(cfg.get("logger"), **logger_kwargs)
    trainer = build_trainer(cfg, callbacks=training_callbacks(cfg), logger=loggers or False)
    log.info("Output dir: %s", cfg.paths.output_dir)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{cfg.ckpt_path} holds another model than this config builds ({detail})"
        ) from e
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if cfg.get("test"):
        ckpt = (
            "best"
            if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path
            else None
        )
        for results in trainer.test(module, datamodule=datamodule, ckpt_path=ckpt):
            metrics.update({name: float(value) for name, value in results.items()})
    if cfg.get("final_evaluation") and trainer.is_global_zero:
        metrics.update(final_evaluation(cfg))
    if trainer.is_global_zero:
        summary = run_summary(trainer, cfg, metrics, time.perf_counter() - start)
        write_summary(summary)
        log.info("\n%s", format_run_summary(summary))
    return metrics


def training_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The config's callbacks, then the weight averaging, then the reliability callbacks (the NaN
    guard, the random-state bookkeeping), which go last."""
    callbacks = instantiate_group(cfg.get("callbacks"))
    if cfg.get("averaging"):  # after the others: they see the averaged weights at validation
        callbacks.append(instantiate(cfg.averaging))
    return callbacks + reliability_callbacks(check_finite=bool(cfg.get("check_finite", True)))


def requeued_checkpoint(cfg: DictConfig) -> Path | None:
    """This run dir's last.ckpt when the job is a SLURM requeue of itself (SLURM_RESTART_COUNT
    > 0, the same config in the same run dir) and no checkpoint was named; else None."""
    if cfg.get("ckpt_path") or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def final_evaluation(cfg: DictConfig) -> dict[str, float]:
    """Evaluate the run's checkpoint (best, unless `final_evaluation.checkpoint` says last) as
    `evaluate.py run=<run dir>` would, with the `final_evaluation` settings (e.g. k) as eval.*
    overrides, into <run dir>/evaluation."""
    run_dir = Path(cfg.paths.output_dir)
    settings = [f"eval.{key}={value}" for key, value in cfg.final_evaluation.items()]
    trusted = list(cfg.get("trusted_targets") or [])
    eval_cfg = compose(
        "evaluate",
        overrides=[
            f"run={run_dir}",
            f"paths.data_dir={cfg.paths.data_dir}",
            f"trusted_targets={trusted}",
            *settings,
        ],
    )
    with open_dict(eval_cfg):
        eval_cfg.paths.output_dir = str(run_dir / "evaluation")
    row = evaluate.evaluate_run(eval_cfg, run_dir, run_dir / "evaluation")
    return dict(row["metrics"])

"""Training as one straight line: plan -> seed -> instantiate -> fit -> test -> summarise.

`vaelab.run.plan` decides the run's config from the command (and the saved run it names, read
as data); everything after that instantiates and runs what the plan says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from vaelab import evaluate, quiet
from vaelab.build import build_datamodule, build_module, build_trainer
from vaelab.callbacks import reliability_callbacks, step_callbacks
from vaelab.callbacks.nvml import NoFailingNvmlCheck
from vaelab.ddp import use_hydra_child_command
from vaelab.errors import CheckpointError, ConfigError, require_int
from vaelab.run.checkpoints import RunCheckpointIO, checkpoint_step, load_weights, newest_saved
from vaelab.run.dirs import claimed, refuse_links
from vaelab.run.plan import Invocation, Plan, plan, source
from vaelab.run.trust import CONFIG_DIR
from vaelab.summary import format_run_summary, run_summary, write_summary

log = logging.getLogger(__name__)
TENSORBOARD_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
#: Set in the processes a DDP or multi-task launcher starts beside the first one of a run.
WORKER_RANKS = ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def run(cfg: DictConfig) -> dict[str, float]:
    """Train one model; return the final epoch's metrics (and test metrics if cfg.test)."""
    environment = dict(os.environ)
    try:
        metrics, _ = train(cfg)
        return metrics
    finally:
        # A DDP run leaves its process group and Lightning's MASTER_PORT, LOCAL_RANK, ... in
        # this process; the next run of a sweep must start clean.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train what the command asks for; (metrics, the objects built)."""
    quiet.install()  # again: a caller's warnings.catch_warnings() may have reset the filters
    invocation = invocation_of(cfg)
    the_plan = plan(invocation, read_source(invocation))
    config = OmegaConf.create(the_plan.config)
    for note in the_plan.notes:
        log.info("%s", note)
    worker = any(int(os.environ.get(name, "0") or 0) > 0 for name in WORKER_RANKS)
    claim = contextlib.nullcontext() if worker else claimed(invocation.run_dir, the_plan.fresh)
    with claim:
        return fit(config, the_plan, invocation.run_dir)


def fit(config: DictConfig, the_plan: Plan, run_dir: Path) -> tuple[dict[str, float], dict]:
    use_hydra_child_command()  # DDP processes join this run's dir, in a sweep too
    torch.distributions.Distribution.set_default_validate_args(bool(config.get("validate_args")))
    if config.get("seed") is not None:
        require_int("seed", config.seed, 0)
        L.seed_everything(config.seed, workers=True)
    datamodule = build_datamodule(config)
    module = build_module(config, datamodule, run_config=the_plan.config)
    if the_plan.init_from is not None:
        new = load_weights(module.model, the_plan.init_from)
        log.info("weights from %s; new: %s", the_plan.init_from, ", ".join(new) or "none")
    logger_kwargs = {}
    if the_plan.ckpt_path is not None:
        # Continuing: TensorBoard drops the events the interrupted run logged after this
        # checkpoint (the SummaryWriter's purge_step), so the curves have no duplicated steps.
        logger_kwargs = {TENSORBOARD_LOGGER: {"purge_step": checkpoint_step(the_plan.ckpt_path)}}
    loggers = instantiate_group(config.get("logger"), **logger_kwargs)
    optimizer_settings = OmegaConf.to_container(config.optimizer)
    trainer = build_trainer(
        config,
        callbacks=training_callbacks(config, module, datamodule),
        logger=loggers or False,
        plugins=[RunCheckpointIO(run_dir, optimizer_settings)],
    )
    log.info("Output dir: %s", run_dir)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=the_plan.ckpt_path)
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{the_plan.ckpt_path} holds another model than this config builds ({detail})"
        ) from e
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if config.get("test"):
        best = trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path
        for results in trainer.test(
            module, datamodule=datamodule, ckpt_path="best" if best else None
        ):
            metrics.update({name: float(value) for name, value in results.items()})
    if config.get("final_evaluation") and trainer.is_global_zero:
        metrics.update(final_evaluation(config, run_dir))
    if trainer.is_global_zero:
        summary = run_summary(trainer, config, metrics, time.perf_counter() - start)
        write_summary(summary)
        log.info("\n%s", format_run_summary(summary))
    objects = {"config": config, "datamodule": datamodule, "module": module, "trainer": trainer}
    return metrics, objects


def invocation_of(cfg: DictConfig) -> Invocation:
    """This command as plain data: its config resolved (a required `???` value is one line),
    the keys its command line set, its run dir, the SLURM restart count."""
    task = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    missing = missing_keys(task)
    if missing:
        raise ConfigError(f"{missing[0]} is required: set {missing[0]}=<value> on the command line")
    config = OmegaConf.to_container(task, resolve=True)
    overrides: list[str] = []
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        overrides = list(hydra.overrides.task)
        # which option of each group, for the HParams table (a resumed run keeps its own)
        config["choices"] = {
            group: choice
            for group, choice in hydra.runtime.choices.items()
            if not group.startswith("hydra") and choice is not None
        }
    return Invocation(
        config=config,
        overrides=tuple(overrides),
        run_dir=Path(cfg.paths.output_dir),
        restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    )


def missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """The `???` values, without resolving interpolations (one may point at a `???`)."""
    found = []
    for key in node:
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            found += missing_keys(node[key], f"{prefix}{key}.")
    return found


def read_source(invocation: Invocation):
    """The saved run the command names (resume, requeue, second stage), read as data."""
    found = source(invocation)
    if found is None:
        return None
    kind, run_dir = found
    if not run_dir.is_dir():
        raise CheckpointError(f"{kind}: {run_dir} is not a run dir")
    refuse_links(run_dir)
    trusted = list(invocation.config.get("trusted_targets") or [])
    return newest_saved(run_dir, trusted)


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


def training_callbacks(config: DictConfig, module, datamodule) -> list[L.Callback]:
    """The step's observers (bits per dimension, per-layer rates), the config's callbacks, then
    the weight averaging, then the reliability callbacks (the NaN guard, the random-state
    bookkeeping), which go last."""
    callbacks = step_callbacks(module.model, datamodule) + instantiate_group(
        config.get("callbacks")
    )
    if not config.get("logger"):  # ~logger: nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if config.get("averaging"):  # after the others: they see the averaged weights at validation
        callbacks.append(instantiate(config.averaging))
    callbacks.append(NoFailingNvmlCheck())
    return callbacks + reliability_callbacks(check_finite=bool(config.get("check_finite", True)))


def final_evaluation(config: DictConfig, run_dir: Path) -> dict[str, float]:
    """Evaluate the run's checkpoint as `evaluate.py run=<run dir>` would, with the
    `final_evaluation` settings as `eval.*`, into <run dir>/evaluation."""
    eval_cfg = OmegaConf.load(CONFIG_DIR / "evaluate.yaml")
    del eval_cfg["defaults"]
    unknown = sorted(set(config.final_evaluation) - set(eval_cfg.eval))
    if unknown:
        raise ConfigError(
            f"final_evaluation.{unknown[0]} is not an evaluation setting (one of "
            f"{', '.join(eval_cfg.eval)})"
        )
    data = config.data
    eval_cfg = OmegaConf.merge(
        eval_cfg,
        {
            "run": str(run_dir),
            "paths": {"data_dir": data.data_dir, "output_dir": str(run_dir / "evaluation")},
            "data": {
                "root": data.get("root"),
                "download": data.get("download", False),
                "verify": (data.get("source") or {}).get("verify", True),
            },
            "eval": OmegaConf.to_container(config.final_evaluation),
            "trusted_targets": list(config.get("trusted_targets") or []),
            "validate_args": bool(config.get("validate_args")),
        },
    )
    row = evaluate.evaluate_run(eval_cfg, run_dir, run_dir / "evaluation")
    return dict(row["metrics"])

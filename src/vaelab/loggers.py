"""Experiment trackers besides TensorBoard: MLflow and Weights & Biases, as Lightning's loggers
with what a vaelab run adds (configs/logger/: mlflow, wandb, many).

- `MLflowLogger`: one MLflow run per run dir, named after it and tagged with it, in a store
  shared by all runs (`paths.mlflow_uri`: a SQLite file in the log root unless
  MLFLOW_TRACKING_URI names another store), so `mlflow ui` shows every run side by side; a
  resumed run continues its MLflow run (found by the tag). Parameters (the run's config, flattened
  by Lightning), metrics, and the image grids as MLflow images.
- `WandbLogger`: a W&B run in `<run dir>/wandb/`, offline by default (no account, no network;
  `wandb sync` uploads it later), named after the run dir; image grids as W&B images.

Both take the grids through `log_image_grid`; `log_image_grids` sends them to every logger of a
trainer that takes images (TensorBoard's writer included). `viewers` says, for the end-of-run
and sweep summaries, the command that opens each logger's record of a run dir or sweep dir.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vaelab import commands
from vaelab.errors import ConfigError

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
MLFLOW = "vaelab.loggers.MLflowLogger"
WANDB = "vaelab.loggers.WandbLogger"
#: train.yaml's logger group (logger=tensorboard), for a summary told nothing else
DEFAULT_LOGGERS = {"tensorboard": {"_target_": TENSORBOARD}}
#: the tag that ties an MLflow run to its run dir
RUN_DIR_TAG = "vaelab.run_dir"
SQLITE = "sqlite:///"


class ImageTracker:
    """A logger that takes image grids (C, H, W) in [0, 1]."""

    def log_image_grid(self, name: str, image: Tensor, step: int) -> None:
        raise NotImplementedError


def require_library(module: str, logger: str) -> None:
    """One line, not an ImportError's traceback, when a tracker's library is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"logger={logger} needs the {module} package, which is not installed: "
            f'pip install -e ".[trackers]"'
        )


def hwc_uint8(image: Tensor):
    """(C, H, W) in [0, 1] -> a (H, W, C) uint8 array (C = 1 or 3)."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


class MLflowLogger(ImageTracker, MLFlowLogger):
    """Lightning's MLFlowLogger, one MLflow run per vaelab run dir (`run_dir`), in the store at
    `tracking_uri`; a SQLite store's folder is created, and its artifacts (the images) go to
    `artifacts/` beside the database file."""

    def __init__(
        self,
        run_dir: str,
        tracking_uri: str,
        experiment_name: str = "vaelab",
        log_model: bool = False,
        prefix: str = "",
    ) -> None:
        require_library("mlflow", "mlflow")
        run_dir_path = Path(run_dir).resolve()
        artifacts = None
        if tracking_uri.startswith(SQLITE):
            database = Path(tracking_uri[len(SQLITE) :])
            if rank_zero_only.rank == 0:
                database.parent.mkdir(parents=True, exist_ok=True)
            artifacts = (database.parent / "artifacts").resolve().as_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_dir_path.name,
            tracking_uri=tracking_uri,
            tags={RUN_DIR_TAG: str(run_dir_path)},
            artifact_location=artifacts,
            run_id=existing_run(tracking_uri, experiment_name, run_dir_path),
            log_model=log_model,
            prefix=prefix,
        )

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """The run's config as MLflow parameters (`model/latent_dim`); MLflow's parameters
        never change, so a resumed run logs the new keys, and each value its command changed
        (`trainer/max_epochs`) as a tag `resumed/<key>`."""
        flat = flatten(dict(params) if isinstance(params, Mapping) else vars(params))
        logged = self.experiment.get_run(self.run_id).data.params
        for key, value in flat.items():
            if key in logged and logged[key] != str(value)[:6000]:
                self.experiment.set_tag(self.run_id, f"resumed/{key}", str(value)[:5000])
        super().log_hyperparams({k: v for k, v in flat.items() if k not in logged})

    @rank_zero_only
    def log_image_grid(self, name: str, image: Tensor, step: int) -> None:
        self.experiment.log_image(self.run_id, hwc_uint8(image), key=name, step=step)


def flatten(params: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"model": {"latent_dim": 4}} -> {"model/latent_dim": 4}, as Lightning's loggers name
    nested parameters."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def existing_run(tracking_uri: str, experiment_name: str, run_dir: Path) -> str | None:
    """The id of the MLflow run that logged `run_dir` before (a resumed run continues it)."""
    if rank_zero_only.rank != 0:
        return None
    if tracking_uri.startswith(SQLITE) and not Path(tracking_uri[len(SQLITE) :]).is_file():
        return None  # a new store: no run yet (and no database to create just to ask)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{RUN_DIR_TAG}` = '{quoted}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class WandbLogger(ImageTracker, LightningWandbLogger):
    """Lightning's WandbLogger writing into `<run_dir>/wandb/`, named after the run dir,
    offline unless `offline=false`."""

    def __init__(
        self,
        run_dir: str,
        project: str = "vaelab",
        offline: bool = True,
        group: str | None = None,
        log_model: bool = False,
        prefix: str = "",
    ) -> None:
        require_library("wandb", "wandb")
        run_dir_path = Path(run_dir)
        super().__init__(
            name=run_dir_path.resolve().name,
            save_dir=str(run_dir_path),
            project=project,
            offline=offline,
            group=group,
            log_model=log_model,
            prefix=prefix,
            # a sweep's runs in one process (Hydra's basic launcher): each its own W&B run
            reinit="finish_previous",
        )

    @rank_zero_only
    def log_image_grid(self, name: str, image: Tensor, step: int) -> None:
        self.log_image(key=name, images=[hwc_uint8(image)], step=step)


def image_loggers(trainer: L.Trainer) -> list:
    """The trainer's loggers that take images (TensorBoard's writer, `ImageTracker`s)."""
    return [x for x in trainer.loggers if isinstance(x, TensorBoardLogger | ImageTracker)]


def log_image_grids(trainer: L.Trainer, grids: Mapping[str, Tensor], step: int) -> None:
    """Each grid (C, H, W) to every logger of the trainer that takes images."""
    for logger in image_loggers(trainer):
        for name, image in grids.items():
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(name, image, step)
            else:
                logger.log_image_grid(name, image, step)


def viewers(logger_group: Mapping | None, place: Path, sweep: bool = False) -> list[str]:
    """The commands that show the runs of `place` (a run dir, or a sweep dir when `sweep`) in
    each configured logger, in the group's order; none for loggers without a viewer (CSV's
    `csv/metrics.csv` is read directly)."""
    lines: list[str] = []
    for entry in (logger_group or {}).values():
        target = (entry or {}).get("_target_")
        if target == TENSORBOARD:
            lines.append(f"tensorboard --logdir {commands.path(place)}")
        elif target == MLFLOW:
            lines.append(f"mlflow ui --backend-store-uri {commands.path(entry['tracking_uri'])}")
        elif target == WANDB and entry.get("offline", True):
            runs = "/*/wandb/offline-run-*" if sweep else "/wandb/offline-run-*"
            lines.append(f"wandb sync {commands.path(place)}{runs}")
    return lines


def logger_settings(group: DictConfig | None) -> dict[str, dict]:
    """What `viewers` reads of a composed logger group, resolvable outside a run (a sweep's
    config, before its runs have dirs)."""
    keys = ("_target_", "tracking_uri", "offline")
    if group is not None and not isinstance(group, DictConfig):
        group = OmegaConf.create(dict(group))
    return {
        str(name): {key: OmegaConf.select(entry, key, default=None) for key in keys}
        for name, entry in (group or {}).items()
        if entry
    }

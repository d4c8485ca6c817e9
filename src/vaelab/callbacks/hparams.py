"""The run's config and final metrics in TensorBoard's HParams dashboard.

Lightning writes the HParams summary only together with metric *values* (which would add a fake
point to every curve); this callback writes the config and the *names* of the metrics to compare
(`val/elbo`, `val/rate`, ...). TensorBoard then takes each metric's latest value from the run's
scalars, so the table and parallel-coordinates views compare every run of a sweep. It also logs
`val/elbo_best`, the best validation ELBO so far.

TensorBoard lists the hyperparameters it is told differ first, then the rest by name. The keys a
sweep varies (its sweep overrides, `hydra.sweeper.params`, e.g. Optuna's search space) are
marked so, and for a single run the keys set on its command line; so opening HPARAMS on a sweep
shows `model.latent_dim` and `objective.beta` against the metrics, not `check_finite` and 100
other constant keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard.summary import hparams

from vaelab.callbacks.images import tensorboard_writer
from vaelab.swept import recorded_sweep, swept_keys

#: Config subtrees that say how a run was executed, not what was trained.
EXCLUDED = ("paths/", "callbacks/", "logger/", "hydra/")


class HParamsLogger(L.Callback):
    def __init__(
        self,
        metrics: Sequence[str] = ("val/elbo", "val/elbo_best", "val/rate", "val/distortion"),
    ) -> None:
        self.metrics = list(metrics)
        self.best_elbo: float | None = None

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)  # TensorBoard's view (other loggers: their own)
        if writer is None or not pl_module.hparams:
            return
        flat = flatten(dict(pl_module.hparams))
        params = {
            key: value
            for key, value in flat.items()
            if not key.startswith(EXCLUDED) and not key.endswith(("/_target_", "/_partial_"))
        }
        # SummaryWriter.add_hparams would write into a sub-run of its own: the summaries go to
        # the run's own event file instead.
        file_writer = writer.file_writer
        experiment, start, end = hparams(params, {name: 0.0 for name in self.metrics})
        mark_varying(experiment, hparam_names(varying_keys(), params))
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        writer.flush()

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elbo = trainer.callback_metrics.get("val/elbo")
        if trainer.sanity_checking or elbo is None:
            return
        self.best_elbo = float(elbo) if self.best_elbo is None else max(self.best_elbo, float(elbo))
        pl_module.log("val/elbo_best", self.best_elbo, rank_zero_only=True)

    def state_dict(self) -> dict[str, float | None]:
        return {"best_elbo": self.best_elbo}

    def load_state_dict(self, state_dict: dict[str, float | None]) -> None:
        self.best_elbo = state_dict["best_elbo"]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}, lists and other values as HParams can show them (numbers,
    strings, booleans; anything else as its string)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def varying_keys() -> list[str]:
    """The config keys (and group names) this run's sweep varies; outside a sweep, the keys set
    on the command line. Empty without Hydra (a run built in Python)."""
    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    params = {str(k): str(v) for k, v in (hydra_cfg.sweeper.get("params") or {}).items()}
    keys = list(params)
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        overrides, recorded_params = recorded_sweep(hydra_cfg.sweep.dir)
        keys += swept_keys(overrides or [], recorded_params)
    else:
        parser = OverridesParser.create()
        keys += [o.key_or_group for o in parser.parse_overrides(list(hydra_cfg.overrides.task))]
    keys = list(dict.fromkeys(keys))
    return [key.lstrip("+~") for key in keys if key not in ("resume", "experiment")]


def hparam_names(keys: Sequence[str], params: Mapping[str, Any]) -> set[str]:
    """HParams names for config keys: `objective.beta` -> `objective/beta`, a group (`model`) ->
    `choices/model`, a subtree (`model.encoder`) -> every key under it."""
    names: set[str] = set()
    for key in keys:
        name = key.replace(".", "/")
        if f"choices/{name}" in params:  # a group option: its choice, not all its keys
            names.add(f"choices/{name}")
        else:
            names |= {p for p in params if p == name or p.startswith(f"{name}/")}
    return names


def mark_varying(experiment, names: set[str]) -> None:
    """Set `differs` on those hyperparameters of an HParams experiment summary (in place)."""
    metadata = experiment.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(metadata.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in names
    metadata.content = data.SerializeToString()

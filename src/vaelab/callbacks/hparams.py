"""The run's config and final metrics in TensorBoard's HParams dashboard.

Lightning writes the HParams summary only together with metric *values* (which would add a fake
point to every curve); this callback writes the config and the *names* of the metrics to compare
(`val/elbo`, `val/rate`, ...). TensorBoard then takes each metric's latest value from the run's
scalars, so the table and parallel-coordinates views compare every run of a sweep. It also logs
`val/elbo_best`, the best validation ELBO so far.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams

from vaelab.callbacks.images import tensorboard_writer
from vaelab.errors import private_api

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
        writer = tensorboard_writer(trainer)
        if writer is None or not pl_module.hparams:
            return
        flat = flatten(dict(pl_module.hparams))
        params = {
            key: value
            for key, value in flat.items()
            if not key.startswith(EXCLUDED) and not key.endswith(("/_target_", "/_partial_"))
        }
        # SummaryWriter.add_hparams would write into a sub-run of its own; the run's own file
        # writer has no public accessor.
        file_writer = private_api(writer, "_get_file_writer", "torch.utils.tensorboard")()
        for summary in hparams(params, {name: 0.0 for name in self.metrics}):
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

"""What the terminal and `train.log` show while a run trains.

- `ProgressBar`: Lightning's tqdm bar with the training loss and the last validation value of
  the monitored metric. The values are read when the module logs (every
  `trainer.log_every_n_steps` steps), so the bar adds no device synchronisation of its own.
- `ModelSummary`: the parameter counts of the model and its parts, as a few log lines (in
  `train.log` too), without Lightning's FLOPs column, which reads 0 unless the module defines an
  example input.
- `MetricsHistory`: one log line per validation epoch (`epoch 3 (step 1720): val/elbo -95.12,
  ...`) and the history of the validation metrics, from which the end-of-run summary takes the
  values at the best epoch. Kept in checkpoints, so a resumed run's summary covers all epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger("vaelab.train")


class ProgressBar(TQDMProgressBar):
    def __init__(
        self, refresh_rate: int = 20, metrics: Sequence[str] = ("train/loss", "val/elbo")
    ) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.metrics = list(metrics)
        self.values: dict[str, float] = {}

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {name: f"{value:.5g}" for name, value in self.values.items()}

    def _read(self, trainer: L.Trainer, prefix: str) -> None:
        logged = trainer.callback_metrics
        for name in self.metrics:
            if name.startswith(prefix) and name in logged:
                self.values[name] = float(logged[name])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.refresh_rate and (batch_idx + 1) % self.refresh_rate == 0:  # as the bar redraws
            for name in self.metrics:  # the step's own outputs: train/loss -> outputs["loss"]
                part = name.removeprefix("train/")
                if name.startswith("train/") and part in outputs:
                    self.values[name] = float(outputs[part].detach().float().mean())
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._read(trainer, "val/")
        super().on_validation_end(trainer, pl_module)


class ModelSummary(LightningModelSummary):
    """Parameter counts per module down to `max_depth`, logged (no FLOPs column)."""

    def __init__(self, max_depth: int = 2) -> None:
        super().__init__(max_depth=max_depth)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        names, types, params = columns["Name"], columns["Type"], columns["Params"]
        width = max((len(name) for name in names), default=0)
        type_width = max((len(t) for t in types), default=0)
        lines = [
            f"Model: {get_human_readable_count(trainable_parameters)} trainable parameters "
            f"of {get_human_readable_count(total_parameters)} ({model_size:.1f} MB)"
        ]
        lines += [
            f"  {name:<{width}}  {kind:<{type_width}}  {count:>7}"
            for name, kind, count in zip(names, types, params, strict=True)
        ]
        log.info("\n".join(lines))


class MetricsHistory(L.Callback):
    """Validation metrics per epoch: logged as one line each, kept for the end-of-run summary."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("val/") and not name.endswith("_best")
        }
        if not metrics:
            return
        entry = {"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics}
        self.history = [e for e in self.history if e["step"] < entry["step"]] + [entry]
        train = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name in ("train/loss", "train/elbo")
        }
        values = ", ".join(f"{name} {value:.4f}" for name, value in {**metrics, **train}.items())
        log.info("epoch %d (step %d): %s", entry["epoch"], entry["step"], values)

    def at_epoch(self, epoch: int) -> dict[str, float]:
        """The validation metrics of `epoch` (empty if it was not validated)."""
        return next((e["metrics"] for e in self.history if e["epoch"] == epoch), {})

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

"""A callback for the reliability tests: puts a NaN into the decoder's weights at one step, as a
diverging run would. Imported by train.py through `+callbacks.poison._target_=...` with this
folder on PYTHONPATH."""

import lightning as L
import torch


class PoisonWeights(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.decoder.parameters()).view(-1)[0] = float("nan")

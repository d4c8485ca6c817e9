"""What keeps a run trustworthy, outside the LightningModule (always on; train.py and evaluate.py
add them to every Trainer):

- FiniteGuard: stops training with a NonFiniteError naming the step, the terms and the batch
  when the loss is NaN or infinite (one host sync per step, before the backward pass, so neither
  the weights nor the optimizer state ever take a NaN step; a non-finite term makes the loss
  non-finite, 0 * NaN included), and refuses to save a checkpoint with non-finite weights, so a
  NaN never replaces the last good checkpoint.
- RandomState: validation and test draw their Monte-Carlo samples from `eval_seed` (then the
  training random state is restored), so the same checkpoint always gets the same numbers and
  successive validation epochs compare on common random numbers; checkpoints carry the Python,
  NumPy and torch random states, so a resumed run draws the same numbers as an uninterrupted
  one; under DDP each process gets its own stream, derived from the shared seed.
"""

from __future__ import annotations

import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from vaelab.errors import NonFiniteError


class FiniteGuard(L.Callback):
    def __init__(self, check_steps: bool = True) -> None:
        """`check_steps`: check each training step's loss (`check_finite` in train.yaml);
        non-finite weights are never saved either way."""
        self.check_steps = check_steps
        self.batch: tuple[Tensor, ...] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        if not self.check_steps or bool(torch.isfinite(loss.detach()).all()):  # the host sync
            return
        inputs, targets, labels = self.batch
        stats = (
            f"min={inputs.min().item():.3g} max={inputs.max().item():.3g} "
            f"mean={inputs.float().mean().item():.3g}, {len(inputs)} images"
        )
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        raise NonFiniteError(
            f"non-finite loss at step {trainer.global_step} (epoch {trainer.current_epoch}): "
            f"loss={loss.detach().float().mean().item():.4g}; "
            f"{recomputed_parts(pl_module, self.batch, trainer.global_step)}; batch {stats}; "
            f"the last good checkpoint is kept: {last}"
        )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(
                f"refusing to save a checkpoint at step {trainer.global_step}: non-finite "
                f"weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
            )


@torch.no_grad()
def recomputed_parts(pl_module, batch: tuple[Tensor, ...], step: int) -> str:
    """The objective's parts on the batch once more (eagerly, with fresh draws), to say which
    terms are not finite."""
    inputs, targets, labels = batch
    inputs, targets = inputs.to(pl_module.dtype), targets.to(pl_module.dtype)
    try:
        model = pl_module.model.given(labels)
        parts = pl_module.objective(model, inputs, targets, step=step)
    except (ValueError, RuntimeError) as e:  # e.g. a distribution refusing NaN parameters
        return f"its parts could not be recomputed ({type(e).__name__})"
    values = {n: v.float().mean().item() for n, v in parts.items() if n not in ("loss", "beta")}
    bad = [n for n, v in values.items() if not math.isfinite(v)]
    summary = ", ".join(f"{n}={v:.4g}" for n, v in values.items())
    return f"not finite on this batch: {' and '.join(bad) or 'no part when recomputed'} ({summary})"


class RandomState(L.Callback):
    """See the module docstring. Goes last among the callbacks, so that the other callbacks'
    validation-end work (the image logger's prior draws) still runs under the evaluation seed."""

    def __init__(self, eval_seed: int | None = 0) -> None:
        self.eval_seed = eval_seed
        self._saved: tuple[Tensor, list[Tensor]] | None = None
        self._resumed: dict[str, Any] | None = None

    # --- resume ---------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._resumed = checkpoint.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        # Restored here, after everything that runs between loading and the first step.
        if self._resumed is not None:
            set_rng_states(self._resumed)
            self._resumed = None
        if trainer.world_size > 1:
            # Every process was seeded alike; give each its own stream for dynamic binarisation
            # and the reparameterisation noise (derived from the shared state: reproducible).
            base = int(torch.randint(2**62, (1,)))
            torch.manual_seed(base + trainer.global_rank)

    # --- evaluation seeding ------------------------------------------------------------------
    def _seed(self, trainer) -> None:
        if self.eval_seed is None:
            return
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        self._saved = (torch.get_rng_state(), cuda)
        torch.manual_seed(self.eval_seed + trainer.global_rank)

    def _restore(self) -> None:
        if self._saved is not None:
            cpu, cuda = self._saved
            torch.set_rng_state(cpu)
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
            self._saved = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._seed(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._seed(trainer)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._restore()


def collect_rng_states() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) random states as tensors and plain values, so that a
    checkpoint holding them still loads with torch.load(weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(states["python"])


def reliability_callbacks(check_finite: bool = True, eval_seed: int | None = 0) -> list:
    """The callbacks every vaelab Trainer carries, in the order they must run."""
    return [FiniteGuard(check_finite), RandomState(eval_seed)]

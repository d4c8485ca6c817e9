"""What keeps a run trustworthy, outside the LightningModule (always on; train.py and evaluate.py
add them to every Trainer):

- FiniteGuard: stops training with a NonFiniteError naming the step, the term and the batch when
  the loss, rate or distortion is NaN or infinite (one host sync per step, before the backward
  pass, so neither the weights nor the optimizer state ever take a NaN step), and refuses to save
  a checkpoint with non-finite weights, so a NaN never replaces the last good checkpoint.
- RandomState: validation and test draw their Monte-Carlo samples from `eval_seed` (then the
  training random state is restored), so the same checkpoint always gets the same numbers and
  successive validation epochs compare on common random numbers; checkpoints carry the Python,
  NumPy and torch random states, so a resumed run draws the same numbers as an uninterrupted
  one; under DDP each process gets its own stream, derived from the shared seed.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from vaelab.errors import NonFiniteError


class FiniteGuard(L.Callback):
    def __init__(self, check_steps: bool = True) -> None:
        """`check_steps`: check each training step's terms (`check_finite` in train.yaml);
        non-finite weights are never saved either way."""
        self.check_steps = check_steps
        self._inputs: Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._inputs = batch[0]

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        if not self.check_steps:
            return
        terms: dict[str, Tensor] = getattr(pl_module, "last_terms", None) or {"loss": loss}
        values = torch.stack([value.detach().sum() for value in terms.values()])
        if bool(torch.isfinite(values).all()):  # the one host sync of the check
            return
        inputs = self._inputs
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
        summary = ", ".join(f"{n}={v.float().mean().item():.4g}" for n, v in terms.items())
        stats = (
            f"min={inputs.min().item():.3g} max={inputs.max().item():.3g} "
            f"mean={inputs.float().mean().item():.3g}, {len(inputs)} images"
        )
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") or "none written yet"
        raise NonFiniteError(
            f"non-finite {' and '.join(bad)} at step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}): {summary}; batch {stats}; the last good checkpoint is "
            f"kept: {last}"
        )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(
                f"refusing to save a checkpoint at step {trainer.global_step}: non-finite "
                f"weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
            )


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

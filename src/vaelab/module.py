"""VAEModule: the LightningModule that trains a VAE with an objective.

It receives built objects (Hydra instantiates them): the VAE, the objective, and optimizer and
scheduler factories (`_partial_: true`). One shared step serves every stage and logs
`{stage}/loss`, `{stage}/elbo`, `{stage}/rate`, `{stage}/distortion` in nats per example, and
`{stage}/bpd` (bits per dimension) where the data's pixel model defines it, plus what the
objective adds (`train/beta` for KL schedules, `{stage}/iwae` for IWAE). An objective without an
ELBO (the plain autoencoder) logs only its loss and distortion.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from vaelab.errors import NonFiniteError
from vaelab.vae import VAE

Objective = Callable[..., dict[str, Tensor]]  # (vae, inputs, targets, step) -> named parts
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class VAEModule(L.LightningModule):
    def __init__(
        self,
        vae: VAE,
        objective: Objective,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        bpd_offset: float | None = None,
        run_config: dict[str, Any] | None = None,
        eval_seed: int | None = 0,
        check_finite: bool = True,
    ) -> None:
        """`bpd_offset`: from the DataModule (None: no bits per dimension for these data).
        `eval_seed`: validation and test draw their Monte-Carlo samples from this seed (then the
        training random state is restored), so the same checkpoint always gets the same numbers
        and successive validation epochs compare on common random numbers.
        `check_finite`: stop training with a NonFiniteError naming the step, the term and the
        batch when the loss, rate or distortion is NaN or infinite (one host sync per step).
        `run_config`: the resolved run config, saved as hyper-parameters, so checkpoints carry
        it and TensorBoard's HParams tab shows it."""
        super().__init__()
        self.vae = vae
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.bpd_offset = bpd_offset
        self.num_dims = math.prod(vae.image_shape)
        self.eval_seed = eval_seed
        self.check_finite = check_finite
        self._saved_rng: tuple[Tensor, list[Tensor]] | None = None
        if run_config is not None:
            self.save_hyperparameters(run_config)

    def step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> Tensor:
        inputs, targets, _ = batch  # inputs differ from targets for a denoising autoencoder
        training = stage == "train"
        parts = self.objective(
            self.vae, inputs, targets, step=self.global_step if training else None
        )
        if training and self.check_finite:
            self._check_finite(parts, inputs)
        # Training curves are per step, logged only on the steps the logger writes
        # (trainer.log_every_n_steps): each self.log call costs ~0.5 ms of Python, more than a
        # small VAE's step. Validation and test values are means over the whole split (weighted
        # by batch size, reduced across processes).
        if training and self.global_step % self.trainer.log_every_n_steps:
            return parts["loss"]
        metrics = {name: value.mean() for name, value in parts.items()}
        if "beta" in metrics and not training:
            del metrics["beta"]  # the schedule's value is a training quantity (train/beta)
        if self.bpd_offset is not None and "elbo" in metrics:
            nll_per_dim = -metrics["elbo"] / self.num_dims
            metrics["bpd"] = (nll_per_dim + self.bpd_offset) / math.log(2)
        self.log_dict(
            {f"{stage}/{name}": value.detach() for name, value in metrics.items()},
            on_step=training,
            on_epoch=not training,
            sync_dist=not training,
            batch_size=len(inputs),
        )
        return parts["loss"]

    def _check_finite(self, parts: dict[str, Tensor], inputs: Tensor) -> None:
        terms = {name: parts[name] for name in ("loss", "rate", "distortion") if name in parts}
        values = torch.stack([value.detach().sum() for value in terms.values()])
        if bool(torch.isfinite(values).all()):  # the one host sync of the check
            return
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
        summary = ", ".join(f"{n}={v.detach().float().mean().item():.4g}" for n, v in terms.items())
        stats = (
            f"min={inputs.min().item():.3g} max={inputs.max().item():.3g} "
            f"mean={inputs.float().mean().item():.3g}, {len(inputs)} images"
        )
        checkpoint = self.trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") or "none written yet"
        raise NonFiniteError(
            f"non-finite {' and '.join(bad)} at step {self.global_step} (epoch "
            f"{self.current_epoch}): {summary}; batch {stats}; the last good checkpoint is "
            f"kept: {last}"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to save non-finite weights (so a NaN never replaces the last good checkpoint),
        and store the random states, so a resumed run draws the same numbers."""
        bad = [n for n, p in self.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(
                f"refusing to save a checkpoint at step {self.global_step}: non-finite weights "
                f"in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
            )
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            self._resumed_rng = checkpoint["rng_states"]

    def on_train_start(self) -> None:
        # Restored here, after everything that runs between loading and the first step.
        if getattr(self, "_resumed_rng", None) is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None
        if self.trainer.world_size > 1:
            # Every process was seeded alike; give each its own stream for dynamic binarisation
            # and the reparameterisation noise (derived from the shared state: reproducible).
            base = int(torch.randint(2**62, (1,)))
            torch.manual_seed(base + self.global_rank)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "test")

    def _seed_evaluation(self) -> None:
        if self.eval_seed is None:
            return
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        self._saved_rng = (torch.get_rng_state(), cuda)
        torch.manual_seed(self.eval_seed + self.global_rank)

    def _restore_training_rng(self) -> None:
        if self._saved_rng is not None:
            cpu, cuda = self._saved_rng
            torch.set_rng_state(cpu)
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
            self._saved_rng = None

    def on_validation_epoch_start(self) -> None:
        self._seed_evaluation()

    def on_validation_epoch_end(self) -> None:
        self._restore_training_rng()

    def on_test_epoch_start(self) -> None:
        self._seed_evaluation()

    def on_test_epoch_end(self) -> None:
        self._restore_training_rng()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.scheduler_interval,
                "monitor": "val/elbo",
            },
        }


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

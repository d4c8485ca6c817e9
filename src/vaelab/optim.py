"""Optimizers the papers' presets use that torch does not ship."""

from __future__ import annotations

from collections.abc import Callable

import torch


class AdamNormGrad(torch.optim.Adam):
    """Adam on gradients first scaled to unit norm, tensor by tensor: g / (||g||_2 + 1e-7).

    The VampPrior paper's optimizer (Tomczak & Welling 2018; `AdamNormGrad` in its code,
    `optimizer.py`): each parameter tensor's step no longer depends on its gradient's scale
    across the batch, only on its direction and Adam's moment estimates. Any torch Adam argument
    (lr, betas, eps, weight_decay, fused, ...) applies as in torch.optim.Adam."""

    EPS = 1e-7

    @torch.no_grad()
    def normalise_gradients(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(torch.linalg.vector_norm(p.grad) + self.EPS)

    def step(self, closure: Callable[[], float] | None = None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.normalise_gradients()
        super().step()
        return loss

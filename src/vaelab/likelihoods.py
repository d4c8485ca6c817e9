"""Likelihoods p(x|z): decoder output (N, P*C, H, W) -> a torch.distributions object.

Each likelihood says how many parameters per pixel value it needs (`params_per_pixel`, P) and
returns an `Independent` distribution whose event is one whole image (C, H, W), so `log_prob(x)`
is one number per example, in nats.

- Bernoulli: logits; for binary pixels.
- Gaussian: per-pixel mean and log-variance, as in Kingma & Welling (2013), Appendix C.2.
- GaussianFixed: per-pixel mean, one fixed standard deviation `sigma`.
- ContinuousBernoulli: Loaiza-Ganem & Cunningham (2019), a normalised density on [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from vaelab.errors import require

IMAGE_EVENT_DIMS = 3  # (C, H, W) form one event


class Likelihood:
    """Base class: `params_per_pixel` parameters per pixel value; `__call__` builds p(x|z)."""

    params_per_pixel: int = 1
    #: True when the likelihood is a probability mass on {0, 1}: data must be binarised.
    binary_data: bool = False

    def __call__(self, params: Tensor) -> Distribution:  # (N, P*C, H, W) -> event (C, H, W)
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Bernoulli(Likelihood):
    binary_data = True

    def __call__(self, params: Tensor) -> Distribution:
        return Independent(torch.distributions.Bernoulli(logits=params), IMAGE_EVENT_DIMS)


class Gaussian(Likelihood):
    """Learned per-pixel variance; the log-variance is softly clamped into
    (min_log_var, max_log_var), so a pixel cannot reach zero variance and an infinite density."""

    params_per_pixel = 2

    def __init__(self, min_log_var: float = -9.0, max_log_var: float = 4.0) -> None:
        require(
            min_log_var < max_log_var,
            f"likelihood.min_log_var ({min_log_var}) must be below max_log_var ({max_log_var})",
        )
        self.min_log_var = min_log_var
        self.max_log_var = max_log_var

    def __call__(self, params: Tensor) -> Distribution:
        mean, log_var = params.chunk(2, dim=-3)  # each (N, C, H, W)
        log_var = bounded(log_var, self.min_log_var, self.max_log_var)
        return Independent(Normal(mean, torch.exp(0.5 * log_var)), IMAGE_EVENT_DIMS)

    def __repr__(self) -> str:
        return f"Gaussian(min_log_var={self.min_log_var}, max_log_var={self.max_log_var})"


class GaussianFixed(Likelihood):
    """Mean from the decoder, one fixed `sigma` for every pixel (sigma=1 makes −log p an MSE/2
    plus a constant; smaller sigma weighs reconstruction more)."""

    def __init__(self, sigma: float = 0.1) -> None:
        require(sigma > 0, f"likelihood.sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def __call__(self, params: Tensor) -> Distribution:
        return Independent(Normal(params, self.sigma), IMAGE_EVENT_DIMS)

    def __repr__(self) -> str:
        return f"GaussianFixed(sigma={self.sigma})"


class ContinuousBernoulli(Likelihood):
    def __call__(self, params: Tensor) -> Distribution:
        return Independent(torch.distributions.ContinuousBernoulli(logits=params), IMAGE_EVENT_DIMS)


def bounded(x: Tensor, low: float, high: float) -> Tensor:
    """Soft clamp into (low, high): close to the identity away from the bounds, smooth, with
    non-zero gradients everywhere (a hard clamp would stop learning at the bound)."""
    softplus = torch.nn.functional.softplus
    # Two algebraically equal forms, each numerically exact at the bound it is used near.
    upper = high + softplus(low - x) - softplus(high - x)
    lower = low + softplus(x - low) - softplus(x - high)
    return torch.where(x > 0.5 * (low + high), upper, lower)


def soft_floor(x: Tensor, low: float) -> Tensor:
    """low + softplus(x - low): above `low`, close to x once x is a few units above it."""
    return low + torch.nn.functional.softplus(x - low)

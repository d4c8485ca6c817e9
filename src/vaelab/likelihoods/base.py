"""The likelihood protocol and the numerics the likelihoods share."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution

from vaelab.errors import ConfigError

IMAGE_EVENT_DIMS = 3  # (C, H, W) form one event
#: What the data side supplies (the DataModule's `pixel_model`): binary pixels in {0, 1};
#: 8-bit values dequantised to (k + u) / 256, u ~ U(0, 1); 8-bit values k / 255 as they are.
PIXEL_MODELS = ("binary", "dequantized", "discrete")
LN_256 = math.log(256)


class Likelihood:
    """Base class: `params_per_pixel` parameters per pixel value; `__call__` builds p(x|z).

    The default is a density on [0, 1]: it accepts every pixel model, and its bits per dimension
    are those of the 8-bit image only on dequantised data (Theis et al. 2016: -log p(x) / D + ln
    256, the bin width 1/256); on binary or discrete values a density is not a probability, so
    bits per dimension are undefined there."""

    params_per_pixel: int = 1
    accepts: tuple[str, ...] = PIXEL_MODELS

    def out_channels(self, channels: int) -> int:
        """Decoder output channels for images of `channels` channels."""
        return self.params_per_pixel * channels

    def bpd_offset(self, pixel_model: str) -> float | None:
        """Nats per dimension added to -log p(x) / D before dividing by ln 2 (None: no bits per
        dimension for this pair)."""
        return LN_256 if pixel_model == "dequantized" else None

    def __call__(self, params: Tensor) -> Distribution:  # (N, out_channels, H, W) -> (C, H, W)
        raise NotImplementedError

    def output_bias(self, pixel_means: Tensor) -> Tensor:
        """The decoder output (out_channels, H, W) whose distribution has the pixels' means
        (C, H, W) in [0, 1] (`model.output_bias=data_mean`)."""
        raise ConfigError(
            f"model.output_bias=data_mean: {self!r} has no parameters set from pixel means; "
            "use it with likelihood=bernoulli, gaussian or gaussian_fixed"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def at_least_float32(t: Tensor) -> Tensor:
    """Network outputs in float16 / bfloat16 (mixed-precision training: autocast runs the matrix
    products in the lower precision) in float32, so that the distributions' densities, the KL and
    the importance weights are computed in float32; float32 and float64 pass through."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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


# --- the bins of 8-bit values ---------------------------------------------------------------
#: The 256 values of an 8-bit pixel, k / 255 on the [0, 1] scale the DataModule supplies
#: (`discrete` pixel model); a bin is k / 255 +- HALF_BIN.
LEVELS = 256
HALF_BIN = 0.5 / (LEVELS - 1)


def log_diff_sigmoid(upper: Tensor, lower: Tensor) -> Tensor:
    """log(sigmoid(upper) - sigmoid(lower)) for upper > lower, exactly and without cancellation
    at either tail: sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(b - a))."""
    log_sigmoid = torch.nn.functional.logsigmoid
    return log_sigmoid(upper) + log_sigmoid(-lower) + log1mexp(upper - lower)


def log_diff_ndtr(upper: Tensor, lower: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower; computed in the left tail (Phi(a) -
    Phi(b) = Phi(-b) - Phi(-a)), where log_ndtr is accurate, so neither tail cancels."""
    flip = lower > 0
    a = torch.where(flip, -lower, upper)
    b = torch.where(flip, -upper, lower)
    log_a, log_b = log_ndtr(a), log_ndtr(b)
    return log_a + log1mexp(log_a - log_b)


#: Below this, log Phi(x) is its asymptotic series (torch's log_ndtr is exact there, but its
#: gradient is not: it drifts from -x beyond |x| ~ 1e3 in float32 and then collapses).
NDTR_TAIL = -20.0


def log_ndtr(x: Tensor) -> Tensor:
    """log Phi(x) with a gradient that stays right far into the left tail: there
    log Phi(x) = -x^2/2 - log(-x) - log(2 pi)/2 + log(1 - 1/x^2 + 3/x^4 - 15/x^6), exact to
    float precision below NDTR_TAIL (the omitted term is 105/x^8 < 1e-8)."""
    tail = x < NDTR_TAIL
    inner = torch.special.log_ndtr(torch.where(tail, 0.0, x))  # no NaN gradient through where
    t = torch.where(tail, x, NDTR_TAIL)
    r = 1 / (t * t)
    series = -0.5 * t * t - torch.log(-t) - 0.5 * math.log(2 * math.pi)
    series = series + torch.log1p(r * (-1 + r * (3 - 15 * r)))
    return torch.where(tail, series, inner)


def log1mexp(d: Tensor) -> Tensor:
    """log(1 - exp(-d)) for d > 0 (Maechler 2012: log(-expm1(-d)) for small d, log1p(-exp(-d))
    for large d)."""
    d = d.clamp(min=torch.finfo(d.dtype).tiny)
    return torch.where(d < math.log(2), torch.log(-torch.expm1(-d)), torch.log1p(-torch.exp(-d)))


def bin_log_prob(kind: str, x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """log P(pixel = k) for x = k / 255 under a logistic or Gaussian (loc, exp(log_scale))
    discretised to the 256 bins, the first and last bins extended to -inf and +inf: the 256
    probabilities of a pixel sum to 1 and no dequantisation is needed."""
    inv_scale = torch.exp(-log_scale)
    upper = (x + HALF_BIN - loc) * inv_scale
    lower = (x - HALF_BIN - loc) * inv_scale
    if kind == "logistic":
        log_cdf_upper = torch.nn.functional.logsigmoid(upper)
        log_sf_lower = torch.nn.functional.logsigmoid(-lower)
        middle = log_diff_sigmoid(upper, lower)
    else:
        log_cdf_upper = log_ndtr(upper)
        log_sf_lower = log_ndtr(-lower)
        middle = log_diff_ndtr(upper, lower)
    # the edge bins by value: x is k / 255 exactly, up to float rounding
    first, last = x < HALF_BIN, x > 1 - HALF_BIN
    return torch.where(first, log_cdf_upper, torch.where(last, log_sf_lower, middle))


def to_levels(x: Tensor) -> Tensor:
    """Continuous values on the [0, 1] scale -> the nearest of the 256 values k / 255."""
    return torch.round(x.clamp(0, 1) * (LEVELS - 1)) / (LEVELS - 1)

"""Likelihoods of binary or [0, 1] pixels: Bernoulli (with its summed log-density), Gaussian,
GaussianFixed, ContinuousBernoulli."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from vaelab.errors import require
from vaelab.likelihoods.base import IMAGE_EVENT_DIMS, Likelihood, at_least_float32, bounded

#: The clip of the pixel means whose logits start a Bernoulli decoder's output bias.
MEAN_CLIP = 0.001


class Bernoulli(Likelihood):
    """A probability mass on {0, 1} per pixel: binary data only, its -log p(x) / (D ln 2) is
    already bits per dimension."""

    accepts = ("binary",)

    def bpd_offset(self, pixel_model: str) -> float | None:
        return 0.0 if pixel_model == "binary" else None

    def __call__(self, params: Tensor) -> Distribution:
        return BernoulliImages(params)

    def output_bias(self, pixel_means: Tensor) -> Tensor:
        """logit(m), m clipped to [0.001, 0.999] as in Burda et al. (2015)'s code (a pixel
        that is always black would otherwise start at an infinite logit)."""
        return torch.logit(pixel_means.clamp(MEAN_CLIP, 1 - MEAN_CLIP))


#: Pixels whose factors 1 + exp(-|logit|) (each in (1, 2]) are multiplied before one log is taken
#: in `bernoulli_log_prob_sum`: the product stays below 2^16, far from float32 overflow.
LOG_GROUP = 16


def bernoulli_log_prob_sum(logits: Tensor, x: Tensor) -> Tensor:
    """sum_d log Bernoulli(x_d | logits_d) over the last dim (x broadcasts against logits): what
    `Independent(Bernoulli(logits=...), 1).log_prob(x)` computes, in fewer and cheaper passes.
    log p = x l - softplus(l), softplus(l) = max(l, 0) + log(1 + exp(-|l|)); the factors
    1 + exp(-|l|) of groups of LOG_GROUP pixels are multiplied and one log is taken per group,
    instead of one log1p per pixel (the transcendental that dominates the per-pixel cost on a
    CPU, eagerly and compiled). Each product is below 2^LOG_GROUP and exact to a few float32 ulps;
    x l - max(l, 0) is formed per pixel before summing, so huge, confident logits do not cancel
    in the sum: it agrees with torch.distributions to about 1e-5 nats. A last dim that LOG_GROUP
    does not divide is grouped by the largest power of two up to 16 that divides it. Takes float32
    or float64 (a product of 16 factors can exceed float16's range)."""
    group = math.gcd(logits.shape[-1], LOG_GROUP)
    factors = logits.abs().neg_().exp_().add_(1.0).unflatten(-1, (-1, group)).prod(-1)
    linear = torch.addcmul(logits.clamp(min=0).neg_(), logits, x)  # x l - max(l, 0)
    return linear.sum(-1) - factors.log_().sum(-1)


class _BernoulliLogProbSum(torch.autograd.Function):
    """`bernoulli_log_prob_sum` with its gradient in one pass: d/dl = x - sigmoid(l), d/dx = l
    (torch's own backward of the per-pixel form takes several). Forward and context are
    separate (`setup_context`), with a generated vmap rule, so the reverse-mode `torch.func`
    transforms (grad, vjp, jacrev) and vmap work through it, per-example gradients included;
    forward mode (jvp, jacfwd, hessian) does not, as there is no jvp rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, x: Tensor) -> Tensor:
        return bernoulli_log_prob_sum(logits, x)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        logits, x = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_logits = grad_x = None
        if ctx.needs_input_grad[0]:  # out of place: x may broadcast logits; double backward
            grad_logits = ((x - torch.sigmoid(logits)) * grad).sum_to_size(logits.shape)
        if ctx.needs_input_grad[1]:
            grad_x = (grad * logits).sum_to_size(x.shape)
        return grad_logits, grad_x


class BernoulliImages(Independent):
    """`Independent(Bernoulli(logits), 3)`: pixels independent given z, one image per event, with
    `log_prob` summed over the pixels by `bernoulli_log_prob_sum` (one `log` per 16 pixels
    instead of one per pixel, forward and backward; the same numbers to float rounding)."""

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        base = torch.distributions.Bernoulli(logits=logits, validate_args=validate_args)
        super().__init__(base, IMAGE_EVENT_DIMS, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> BernoulliImages:
        shape = torch.Size(batch_shape) + self.event_shape
        return BernoulliImages(self.base_dist.logits.expand(shape), self._validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        # float16 cannot hold a product of 16 factors (VAE.decode hands over float32 already)
        logits = at_least_float32(self.base_dist.logits).flatten(-IMAGE_EVENT_DIMS)
        value = value.flatten(-IMAGE_EVENT_DIMS).to(logits.dtype)
        if torch.is_grad_enabled() and (logits.requires_grad or value.requires_grad):
            return _BernoulliLogProbSum.apply(logits, value)
        return bernoulli_log_prob_sum(logits, value)


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

    def output_bias(self, pixel_means: Tensor) -> Tensor:
        """The means, and log-variance 0 (the decoder's default output there)."""
        return torch.cat([pixel_means, torch.zeros_like(pixel_means)], dim=-3)

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

    def output_bias(self, pixel_means: Tensor) -> Tensor:
        return pixel_means.clone()

    def __repr__(self) -> str:
        return f"GaussianFixed(sigma={self.sigma})"


class ContinuousBernoulli(Likelihood):
    def __call__(self, params: Tensor) -> Distribution:
        return Independent(torch.distributions.ContinuousBernoulli(logits=params), IMAGE_EVENT_DIMS)

"""Likelihoods p(x|z): decoder output (N, P*C, H, W) -> a torch.distributions object.

Each likelihood declares what it needs and accepts, and returns an `Independent` distribution
whose event is one whole image (C, H, W), so `log_prob(x)` is one number per example, in nats:

- `out_channels(c)`: the decoder's output channels for images of c channels (P * c for P
  parameters per pixel value; a likelihood that couples channels may need another count);
- `accepts`: the pixel models of the data it is a distribution over (`PIXEL_MODELS`: binary
  pixels, uniformly dequantised 8-bit values, discrete 8-bit values k/255);
- `bpd_offset(pixel_model)`: what turns its -log p(x) / D into bits per dimension on those data.

- Bernoulli: logits; for binary pixels. Its `log_prob` is torch's, summed over the image by a
  shorter route (`BernoulliImages`, one `log` per 16 pixels): the likelihood is a large part of
  a small VAE's step on a CPU (benchmarks/README.md has the figures).
- Gaussian: per-pixel mean and log-variance, as in Kingma & Welling (2013), Appendix C.2.
- GaussianFixed: per-pixel mean, one fixed standard deviation `sigma`.
- ContinuousBernoulli: Loaiza-Ganem & Cunningham (2019), a normalised density on [0, 1].
- DiscretizedLogistic / DiscretizedGaussian / DiscretizedLogisticMixture: probabilities of the
  256 values of 8-bit data (Salimans et al. 2017), bits per dimension without dequantisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from vaelab.errors import require

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Bernoulli(Likelihood):
    """A probability mass on {0, 1} per pixel: binary data only, its -log p(x) / (D ln 2) is
    already bits per dimension."""

    accepts = ("binary",)

    def bpd_offset(self, pixel_model: str) -> float | None:
        return 0.0 if pixel_model == "binary" else None

    def __call__(self, params: Tensor) -> Distribution:
        return BernoulliImages(params)


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


# --- discretised likelihoods for 8-bit data ------------------------------------------------------
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


class DiscretizedImages(Distribution):
    """p(x|z) over 8-bit images (values k / 255), pixels independent given z, the channels of a
    pixel coupled autoregressively when `coupling` is given (Salimans et al. 2017): a mixture of
    K discretised logistic (or Gaussian) components per pixel, shared by the pixel's channels,

        p(x_ij) = sum_k pi_k prod_c P(x_ijc | mu_kc + sum_{d<c} a_kcd x_ijd, s_kc),

    with the component's per-channel bin probabilities P from `bin_log_prob`. Event: one image
    (C, H, W); `log_prob` is one number per image, in nats (a log-probability: <= 0).

    `mean`: the mixture's mean of the continuous components, each channel's coupling applied to
    the means of the channels before it, clamped to [0, 1]: the pixel mean up to the probability
    the edge bins add (what pictures and reconstructions show). `sample()`: exact draws (a
    component per pixel, then the channels in order, each conditioned on the drawn values),
    returned as k / 255."""

    arg_constraints: dict = {}
    support = torch.distributions.constraints.unit_interval
    has_rsample = False

    def __init__(
        self,
        logits: Tensor,  # (*batch, K, H, W): mixture weights (K = 1: no mixture)
        loc: Tensor,  # (*batch, K, C, H, W)
        log_scale: Tensor,  # (*batch, K, C, H, W)
        coupling: Tensor | None,  # (*batch, K, C(C-1)/2, H, W) in (-1, 1), or None
        kind: str = "logistic",
        validate_args: bool | None = None,
    ) -> None:
        self.logits, self.loc, self.log_scale, self.coupling = logits, loc, log_scale, coupling
        self.kind = kind
        batch_shape = loc.shape[:-4]
        super().__init__(batch_shape, loc.shape[-3:], validate_args=validate_args)

    def _coupled_loc(self, x: Tensor) -> Tensor:
        """Component means with each channel's coupling to the channels before it, given the
        values x (*, C, H, W) of those channels: (*, K, C, H, W)."""
        if self.coupling is None:
            return self.loc
        x = x.unsqueeze(-4)  # (*, 1, C, H, W)
        channels = [self.loc[..., 0, :, :]]
        index = 0
        for c in range(1, self.loc.shape[-3]):
            shift = 0
            for d in range(c):
                shift = shift + self.coupling[..., index, :, :] * x[..., d, :, :]
                index += 1
            channels.append(self.loc[..., c, :, :] + shift)
        return torch.stack(torch.broadcast_tensors(*channels), dim=-3)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = value.to(self.loc.dtype)
        loc = self._coupled_loc(value)
        per_channel = bin_log_prob(self.kind, value.unsqueeze(-4), loc, self.log_scale)
        per_component = per_channel.sum(-3)  # (*, K, H, W): the channels of a pixel jointly
        log_weights = torch.log_softmax(self.logits, dim=-3)
        return torch.logsumexp(log_weights + per_component, dim=-3).sum((-2, -1))

    @property
    def mean(self) -> Tensor:
        weights = torch.softmax(self.logits, dim=-3).unsqueeze(-3)  # (*, K, 1, H, W)
        if self.coupling is None:
            return (weights * self.loc).sum(-4).clamp(0, 1)
        # the channels' means in order, each component's coupling applied to the earlier ones
        means: list[Tensor] = []
        index = 0
        for c in range(self.loc.shape[-3]):
            loc = self.loc[..., c, :, :]
            for d in range(c):
                loc = loc + self.coupling[..., index, :, :] * means[d].unsqueeze(-3)
                index += 1
            means.append((weights[..., 0, :, :] * loc).sum(-3).clamp(0, 1))
        return torch.stack(means, dim=-3)

    @torch.no_grad()
    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = torch.Size(sample_shape)
        logits = self.logits.expand(shape + self.logits.shape)
        component = torch.distributions.Categorical(logits=logits.movedim(-3, -1)).sample()

        def pick(t: Tensor) -> Tensor:  # (*, K, ch, H, W) -> (*, ch, H, W) at the component
            t = t.expand(shape + t.shape)
            index = component[..., None, None, :, :].expand(*t.shape[:-4], 1, *t.shape[-3:])
            return t.gather(-4, index).squeeze(-4)

        loc, log_scale = pick(self.loc), pick(self.log_scale)
        coupling = pick(self.coupling) if self.coupling is not None else None
        scale = torch.exp(log_scale)
        if self.kind == "logistic":
            u = torch.rand_like(loc).clamp(1e-6, 1 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)
        else:
            noise = torch.randn_like(loc)
        values: list[Tensor] = []
        index = 0
        for c in range(loc.shape[-3]):
            mu = loc[..., c, :, :]
            for d in range(c if coupling is not None else 0):
                mu = mu + coupling[..., index, :, :] * values[d]
                index += 1
            values.append(to_levels(mu + scale[..., c, :, :] * noise[..., c, :, :]))
        return torch.stack(values, dim=-3)

    def expand(self, batch_shape, _instance=None) -> DiscretizedImages:
        shape = torch.Size(batch_shape)

        def grow(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.expand(shape + t.shape[len(self.batch_shape) :])

        return DiscretizedImages(
            grow(self.logits),
            grow(self.loc),
            grow(self.log_scale),
            grow(self.coupling),
            self.kind,
            self._validate_args,
        )


class Discretized(Likelihood):
    """Base of the likelihoods for 8-bit values (the `discrete` pixel model, x = k / 255): a
    probability for each of the 256 values, so -log p(x) / (D ln 2) is bits per dimension as it
    is, with no dequantisation. The log-scale is softly bounded to (min_log_scale,
    max_log_scale) on the [0, 1] pixel scale."""

    accepts = ("discrete",)
    kind = "logistic"

    def __init__(self, min_log_scale: float = -8.0, max_log_scale: float = 2.0) -> None:
        require(
            min_log_scale < max_log_scale,
            f"likelihood.min_log_scale ({min_log_scale}) must be below max_log_scale "
            f"({max_log_scale})",
        )
        self.min_log_scale = min_log_scale
        self.max_log_scale = max_log_scale

    def bpd_offset(self, pixel_model: str) -> float | None:
        return 0.0 if pixel_model == "discrete" else None

    def _log_scale(self, raw: Tensor) -> Tensor:
        return bounded(raw, self.min_log_scale, self.max_log_scale)


class DiscretizedLogistic(Discretized):
    """One discretised logistic per pixel value (mean, log-scale): Kingma et al. (2016), IAF."""

    params_per_pixel = 2

    def __call__(self, params: Tensor) -> Distribution:
        loc, raw_scale = at_least_float32(params).chunk(2, dim=-3)  # (*, C, H, W) each
        logits = torch.zeros_like(loc[..., :1, :, :])  # one component
        return DiscretizedImages(
            logits,
            (loc + 0.5).unsqueeze(-4),  # the decoder's zero is mid-grey
            self._log_scale(raw_scale).unsqueeze(-4),
            None,
            self.kind,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(min_log_scale={self.min_log_scale}, "
            f"max_log_scale={self.max_log_scale})"
        )


class DiscretizedGaussian(DiscretizedLogistic):
    """One discretised Gaussian per pixel value (mean, log-standard deviation)."""

    kind = "gaussian"


class DiscretizedLogisticMixture(Discretized):
    """A mixture of K discretised logistics per pixel, shared by its channels, each channel's
    mean shifted linearly by the values of the channels before it (R -> G -> B for colour;
    Salimans et al. 2017, PixelCNN++, eq. 3, on the [0, 1] scale). Decoder outputs per pixel:
    K mixture logits, then per component C means, C log-scales and C(C-1)/2 coupling
    coefficients (tanh): K (1 + 2C + C(C-1)/2), 10K for RGB, 3K for grey."""

    def __init__(
        self, components: int = 10, min_log_scale: float = -8.0, max_log_scale: float = 2.0
    ) -> None:
        super().__init__(min_log_scale, max_log_scale)
        require(
            isinstance(components, int) and not isinstance(components, bool) and components >= 1,
            f"likelihood.components must be an integer >= 1, got {components!r}",
        )
        self.components = components

    @staticmethod
    def couplings(channels: int) -> int:
        return channels * (channels - 1) // 2

    def out_channels(self, channels: int) -> int:
        return self.components * (1 + 2 * channels + self.couplings(channels))

    def channels(self, per_component: int) -> int:
        """C from the parameters per component, 2C + C(C-1)/2."""
        for c in range(1, per_component + 1):
            if 2 * c + self.couplings(c) == per_component:
                return c
        raise ValueError(f"{per_component} parameters per component fit no channel count")

    def __call__(self, params: Tensor) -> Distribution:
        params = at_least_float32(params)
        k = self.components
        per_component = params.shape[-3] // k - 1  # 2C + C(C-1)/2
        channels = self.channels(per_component)
        logits, rest = params[..., :k, :, :], params[..., k:, :, :]
        rest = rest.unflatten(-3, (k, per_component))  # (*, K, 2C + C(C-1)/2, H, W)
        loc = rest[..., :channels, :, :] + 0.5
        log_scale = self._log_scale(rest[..., channels : 2 * channels, :, :])
        coupling = torch.tanh(rest[..., 2 * channels :, :, :]) if channels > 1 else None
        return DiscretizedImages(logits, loc, log_scale, coupling, "logistic")

    def __repr__(self) -> str:
        return (
            f"DiscretizedLogisticMixture(components={self.components}, "
            f"min_log_scale={self.min_log_scale}, max_log_scale={self.max_log_scale})"
        )

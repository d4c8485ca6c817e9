"""Discretised likelihoods for 8-bit data (Salimans et al. 2017): probabilities of the 256
values of each pixel, so bits per dimension need no dequantisation."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution

from vaelab.errors import require
from vaelab.likelihoods.base import (
    Likelihood,
    at_least_float32,
    bin_log_prob,
    bounded,
    to_levels,
)


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

"""The variational autoencoder of Kingma & Welling (2013): model and inference network only.

p(x, z) = p(x|z) p(z), with the prior p(z) and the likelihood p(x|z) from `prior` and
`likelihood`; the amortised posterior q(z|x) = N(mu(x), diag sigma^2(x)) from `encoder`.
The model wires its own sizes: the encoder emits 2 * latent_dim numbers (mean and
log-variance), the decoder as many channels as the likelihood needs for the data's channels.
No training logic lives here: objectives take a model and a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from vaelab.errors import require, require_int
from vaelab.likelihoods import Likelihood, at_least_float32, soft_floor
from vaelab.models.base import LatentVariableModel
from vaelab.nets.init import initialise

#: (in_shape=(C, H, W), out_dim=F) -> encoder (B, C, H, W) -> (B, F)
EncoderFactory = Callable[..., nn.Module]
#: (latent_dim=D, out_shape=(P, H, W)) -> decoder (N, D) -> (N, P, H, W)
DecoderFactory = Callable[..., nn.Module]
#: (latent_dim=D, image_shape=(C, H, W)) -> prior module; called with the model, gives p(z)
PriorFactory = Callable[..., nn.Module]
#: (latent_dim=D) -> the posterior's flow (vaelab.models.flows): called with the base Gaussian
#: and the encoder's `context_dim` further outputs, gives q(z|x)
PosteriorFactory = Callable[..., nn.Module]


#: Posterior log-variance bounds (`model.log_var_bounds`): exp(-12) ~ 6e-6 and exp(8) ~ 3e3 cover
#: every sane scale and keep sigma and KL finite when an encoder output runs away.
LOG_VAR_BOUNDS = (-12.0, 8.0)
#: How the bounds hold (`model.log_var_clamp`): `soft`, a soft floor (the gradient never stops
#: below it) and a hard ceiling; `hard`, a hard clamp at both (the VampPrior code's Hardtanh).
LOG_VAR_CLAMPS = ("soft", "hard")


def bound_log_var(
    log_var: Tensor, bounds: Sequence[float] = LOG_VAR_BOUNDS, clamp: str = "soft"
) -> Tensor:
    """The posterior's log-variance within `bounds` (see LOG_VAR_CLAMPS); two cheap ops on the
    hot path."""
    low, high = bounds
    if clamp == "hard":
        return log_var.clamp(low, high)
    return soft_floor(log_var, low).clamp(max=high)


def gaussian(
    params: Tensor, bounds: Sequence[float] = LOG_VAR_BOUNDS, clamp: str = "soft"
) -> Distribution:
    """(..., 2 D) mean and log-variance -> a diagonal Gaussian, event (D,), the log-variance
    bounded (`bound_log_var`)."""
    mean, log_var = at_least_float32(params).chunk(2, dim=-1)
    return Independent(Normal(mean, torch.exp(0.5 * bound_log_var(log_var, bounds, clamp))), 1)


def check_log_var_bounds(bounds: object, clamp: object) -> tuple[float, float]:
    ok = (
        isinstance(bounds, Sequence)
        and len(bounds) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        and -30 <= bounds[0] < bounds[1] <= 30
    )
    require(
        ok,
        f"model.log_var_bounds must be [low, high] with -30 <= low < high <= 30 (nats of "
        f"log-variance), got {bounds!r}",
    )
    require(
        clamp in LOG_VAR_CLAMPS,
        f"model.log_var_clamp must be one of {', '.join(LOG_VAR_CLAMPS)}, got {clamp!r}",
    )
    return float(bounds[0]), float(bounds[1])


class VAE(LatentVariableModel):
    """One Gaussian latent of `latent_dim` dimensions; encoder (B, C, H, W) -> (B, 2*latent_dim),
    decoder (N, latent_dim) -> (N, likelihood.out_channels(C), H, W).

    The papers' choices, as options: `init` (vaelab.nets.init: default, glorot_uniform,
    glorot_normal, he_uniform, he_normal) and `init_bias` (`zero`, or `default`: PyTorch's) for
    the encoder's and decoder's layers; `log_var_bounds` and `log_var_clamp` for the posterior's
    log-variance; `output_bias` (`data_mean`: the decoder's output bias starts at the
    likelihood's parameters for the training pixels' means, `LatentVariableModel.fit_to_data`);
    `posterior`: a flow on the Gaussian posterior (vaelab.models.flows; None: none)."""

    #: the posterior's log-variance bounds and how they hold (instances set their own)
    log_var_bounds: tuple[float, float] = LOG_VAR_BOUNDS
    log_var_clamp: str = "soft"

    def __init__(
        self,
        image_shape: Sequence[int],
        likelihood: Likelihood,
        prior: PriorFactory,
        encoder: EncoderFactory,
        decoder: DecoderFactory,
        latent_dim: int = 32,
        init: str = "default",
        init_bias: str = "zero",
        log_var_bounds: Sequence[float] = LOG_VAR_BOUNDS,
        log_var_clamp: str = "soft",
        output_bias: str = "none",
        posterior: PosteriorFactory | None = None,
    ) -> None:
        super().__init__()
        require_int("model.latent_dim", latent_dim, 1)
        self.log_var_bounds = check_log_var_bounds(log_var_bounds, log_var_clamp)
        self.log_var_clamp = log_var_clamp
        c, h, w = (int(s) for s in image_shape)
        self.image_shape = (c, h, w)
        self.latent_parts = {"z": (latent_dim,)}
        self.likelihood = likelihood
        # posterior=iaf / planar: a flow on the Gaussian, fed by further encoder outputs
        self.flow = posterior(latent_dim=latent_dim) if posterior is not None else None
        context_dim = self.flow.context_dim if self.flow is not None else 0
        self.encoder = encoder(in_shape=self.image_shape, out_dim=2 * latent_dim + context_dim)
        self.decoder = decoder(latent_dim=latent_dim, out_shape=(likelihood.out_channels(c), h, w))
        initialise(self.encoder, init, init_bias)
        initialise(self.decoder, init, init_bias)
        self.use_output_bias(output_bias)
        self.latent_prior = prior(latent_dim=latent_dim, image_shape=self.image_shape)

    def gaussian(self, params: Tensor) -> Distribution:
        """(..., 2 D) mean and log-variance -> a diagonal Gaussian, event (D,), the
        log-variance within the model's bounds."""
        return gaussian(params, self.log_var_bounds, self.log_var_clamp)

    def posterior(self, x: Tensor) -> Distribution:
        """q(z|x), event shape (latent_dim,), batch shape (B,): a diagonal Gaussian, or that
        Gaussian through the model's flow (`posterior=iaf`, `planar`)."""
        params = self.encoder(x)
        if self.flow is None:
            return self.gaussian(params)
        (latent_dim,) = self.latent_parts["z"]
        base = self.gaussian(params[..., : 2 * latent_dim])
        return self.flow(base, params[..., 2 * latent_dim :])

    def prior(self) -> Distribution:
        """p(z), event shape (latent_dim,)."""
        return self.latent_prior(self)

    def decode(self, z: Tensor) -> Distribution:
        """p(x|z) for codes z of shape (*S, latent_dim): batch shape S, event (C, H, W)."""
        (latent_dim,) = self.latent_parts["z"]
        params = at_least_float32(self.decoder(z.reshape(-1, latent_dim)))  # (N, P, H, W)
        return self.likelihood(params.view(*z.shape[:-1], *params.shape[1:]))

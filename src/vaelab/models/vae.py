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

from vaelab.errors import require_int
from vaelab.likelihoods import Likelihood, at_least_float32, soft_floor
from vaelab.models.base import LatentVariableModel

#: (in_shape=(C, H, W), out_dim=F) -> encoder (B, C, H, W) -> (B, F)
EncoderFactory = Callable[..., nn.Module]
#: (latent_dim=D, out_shape=(P, H, W)) -> decoder (N, D) -> (N, P, H, W)
DecoderFactory = Callable[..., nn.Module]
#: (latent_dim=D, image_shape=(C, H, W)) -> prior module; called with the model, gives p(z)
PriorFactory = Callable[..., nn.Module]


class VAE(LatentVariableModel):
    """One Gaussian latent of `latent_dim` dimensions; encoder (B, C, H, W) -> (B, 2*latent_dim),
    decoder (N, latent_dim) -> (N, likelihood.out_channels(C), H, W)."""

    #: Posterior log-variance bounds: exp(-12) ~ 6e-6 and exp(8) ~ 3e3 cover every sane scale and
    #: keep sigma and KL finite when an encoder output runs away.
    min_log_var = -12.0
    max_log_var = 8.0

    def __init__(
        self,
        image_shape: Sequence[int],
        likelihood: Likelihood,
        prior: PriorFactory,
        encoder: EncoderFactory,
        decoder: DecoderFactory,
        latent_dim: int = 32,
    ) -> None:
        super().__init__()
        require_int("model.latent_dim", latent_dim, 1)
        c, h, w = (int(s) for s in image_shape)
        self.image_shape = (c, h, w)
        self.latent_parts = {"z": (latent_dim,)}
        self.likelihood = likelihood
        self.encoder = encoder(in_shape=self.image_shape, out_dim=2 * latent_dim)
        self.decoder = decoder(latent_dim=latent_dim, out_shape=(likelihood.out_channels(c), h, w))
        self.latent_prior = prior(latent_dim=latent_dim, image_shape=self.image_shape)

    @classmethod
    def bound_log_var(cls, log_var: Tensor) -> Tensor:
        """The posterior's log-variance: a soft floor at min_log_var (a vanishing sigma would make
        the density and the KL blow up) and a hard ceiling at max_log_var; two cheap ops on the
        hot path, and the gradient only stops above the ceiling."""
        return soft_floor(log_var, cls.min_log_var).clamp(max=cls.max_log_var)

    @classmethod
    def gaussian(cls, params: Tensor) -> Distribution:
        """(..., 2 D) mean and log-variance -> a diagonal Gaussian, event (D,), the
        log-variance bounded (`bound_log_var`)."""
        mean, log_var = at_least_float32(params).chunk(2, dim=-1)
        return Independent(Normal(mean, torch.exp(0.5 * cls.bound_log_var(log_var))), 1)

    def posterior(self, x: Tensor) -> Distribution:
        """q(z|x): a diagonal Gaussian with event shape (latent_dim,), batch shape (B,)."""
        return self.gaussian(self.encoder(x))

    def prior(self) -> Distribution:
        """p(z), event shape (latent_dim,)."""
        return self.latent_prior(self)

    def decode(self, z: Tensor) -> Distribution:
        """p(x|z) for codes z of shape (*S, latent_dim): batch shape S, event (C, H, W)."""
        (latent_dim,) = self.latent_parts["z"]
        params = at_least_float32(self.decoder(z.reshape(-1, latent_dim)))  # (N, P, H, W)
        return self.likelihood(params.view(*z.shape[:-1], *params.shape[1:]))

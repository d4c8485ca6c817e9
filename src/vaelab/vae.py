"""The variational autoencoder of Kingma & Welling (2013): model and inference network only.

p(x, z) = p(x|z) p(z), with the prior p(z) and the likelihood p(x|z) from `prior` and
`likelihood`; the amortised posterior q(z|x) = N(mu(x), diag sigma^2(x)) from `encoder`.
No training logic lives here: objectives take a VAE and a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from vaelab.errors import require
from vaelab.likelihoods import Likelihood, at_least_float32, soft_floor


class VAE(nn.Module):
    """Encoder (B, C, H, W) -> (B, 2*latent_dim); decoder (N, latent_dim) -> (N, P*C, H, W)."""

    #: Posterior log-variance bounds: exp(-12) ~ 6e-6 and exp(8) ~ 3e3 cover every sane scale and
    #: keep sigma and KL finite when an encoder output runs away.
    min_log_var = -12.0
    max_log_var = 8.0

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        prior: nn.Module,
        image_shape: Sequence[int],
        latent_dim: int,
    ) -> None:
        super().__init__()
        require(latent_dim >= 1, f"model.latent_dim must be >= 1, got {latent_dim}")
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.prior = prior
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim

    @classmethod
    def bound_log_var(cls, log_var: Tensor) -> Tensor:
        """The posterior's log-variance: a soft floor at min_log_var (a vanishing sigma would make
        the density and the KL blow up) and a hard ceiling at max_log_var; two cheap ops on the
        hot path, and the gradient only stops above the ceiling."""
        return soft_floor(log_var, cls.min_log_var).clamp(max=cls.max_log_var)

    def posterior(self, x: Tensor) -> Distribution:
        """q(z|x): a diagonal Gaussian with event shape (latent_dim,), batch shape (B,)."""
        mean, log_var = at_least_float32(self.encoder(x)).chunk(2, dim=-1)  # each (B, latent_dim)
        log_var = self.bound_log_var(log_var)
        return Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)

    def decode(self, z: Tensor) -> Distribution:
        """p(x|z) for codes z of shape (*S, latent_dim): batch shape S, event (C, H, W)."""
        params = at_least_float32(self.decoder(z.reshape(-1, self.latent_dim)))  # (N, P*C, H, W)
        return self.likelihood(params.view(*z.shape[:-1], *params.shape[1:]))

    def sample(self, n: int) -> Tensor:
        """Means of p(x|z) for n codes z ~ p(z): (n, C, H, W)."""
        return self.decode(self.prior().sample((n,))).mean

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x|z) at the posterior mean z = mu(x): (B, C, H, W)."""
        return self.decode(self.posterior(x).mean).mean

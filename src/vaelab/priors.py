"""Priors p(z) as nn.Modules: called with the model, each returns a torch.distributions object
with event shape (latent_dim,). Built by the model (`_partial_: true` in configs/prior/) with
`latent_dim` and the data's `image_shape`, so a prior that needs the model's own modules
(VampPrior's pseudo-inputs go through the encoder) gets them at call time.

- StandardNormal: N(0, I) (Kingma & Welling 2013).
- MixtureOfGaussians: a mixture of K learnable diagonal Gaussians with learnable weights.
- VampPrior (Tomczak & Welling 2018): the mixture (1/K) sum_k q(z | u_k) of the posteriors of K
  learned pseudo-inputs u_k.

Neither mixture has a closed-form KL to the Gaussian posterior; the model's `rate` then falls
back to the Monte-Carlo estimate log q(z|x) - log p(z) on the objective's own draws. Both are
`DiagonalGaussianMixture`s: torch's MixtureSameFamily whose log-density goes through matrix
products instead of an (N, K, D) broadcast (VampPrior's K = 500 components made that the largest
cost of a training step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
)

from vaelab.errors import require_int, require_number


class DiagonalGaussianMixture(MixtureSameFamily):
    """sum_k pi_k N(z; mu_k, diag s_k^2) as `MixtureSameFamily(Categorical, Independent(Normal))`,
    with `log_prob` computed as

        log N(z; mu_k, s_k) = -1/2 [z^2 . s_k^-2 - 2 z . (mu_k s_k^-2) + mu_k^2 . s_k^-2]
                              - sum_d log s_kd - D/2 log 2 pi

    for all k at once: three (N, D) x (D, K) matrix products, no (N, K, D) tensor. The expanded
    square cancels when |z| is much larger than s, so it is formed in float64 (the result is
    exact to ~1e-10 nats, returned in the input's dtype); sampling, mean and variance are torch's.
    """

    def __init__(self, logits: Tensor, loc: Tensor, scale: Tensor, validate_args=None) -> None:
        components = Independent(Normal(loc, scale, validate_args=validate_args), 1)  # (K,)
        super().__init__(Categorical(logits=logits), components, validate_args=validate_args)

    def log_prob(self, value: Tensor) -> Tensor:  # value (*S, D) -> (*S,)
        if self._validate_args:
            self._validate_sample(value)
        base = self.component_distribution.base_dist
        loc, scale = base.loc.double(), base.scale.double()  # (K, D)
        z = value.reshape(-1, value.shape[-1]).double()  # (N, D)
        precision = scale.pow(-2)
        quadratic = (
            z.pow(2) @ precision.T - 2 * z @ (loc * precision).T + (loc.pow(2) * precision).sum(-1)
        )  # (N, K)
        log_norm = scale.log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)  # (K,)
        log_weights = torch.log_softmax(self.mixture_distribution.logits.double(), -1)  # (K,)
        log_p = torch.logsumexp(log_weights - log_norm - 0.5 * quadratic, dim=-1)  # (N,)
        return log_p.to(value.dtype).reshape(value.shape[:-1])

    @torch.no_grad()
    def sample(self, sample_shape=()) -> Tensor:
        """One component per draw, then its Gaussian: (*sample_shape, D), without torch's draw
        from every component ((*sample_shape, K, D), 1.3 GB for 20,000 draws of K=500)."""
        shape = torch.Size(sample_shape)
        index = self.mixture_distribution.sample(shape)  # (*S,)
        base = self.component_distribution.base_dist
        loc, scale = base.loc[index], base.scale[index]  # (*S, D)
        return loc + scale * torch.randn_like(loc)


class Prior(nn.Module):
    """Base class of priors: `forward(model)` returns p(z). Declared capability, with its
    default:"""

    #: p(z) encodes inputs through the model's own posterior (VampPrior), which needs q(z|x) of
    #: the whole code in closed form and without labels (model families refuse it otherwise).
    encodes_inputs: bool = False

    def forward(self, model: nn.Module | None = None) -> Distribution:
        raise NotImplementedError


class StandardNormal(Prior):
    """p(z) = N(0, I) over `latent_dim` dimensions (Kingma & Welling 2013)."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        require_int("model.latent_dim", latent_dim, 1)
        self.register_buffer("loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("scale", torch.ones(latent_dim), persistent=False)

    def forward(self, model: nn.Module | None = None) -> Distribution:
        return Independent(Normal(self.loc, self.scale), 1)


class MixtureOfGaussians(Prior):
    """p(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2), K = `n_components`, all learned: means
    initialised N(0, init_spread^2 I), scales 1, weights uniform (softmax of learned logits)."""

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int] | None = None,
        n_components: int = 10,
        init_spread: float = 1.0,
    ) -> None:
        super().__init__()
        require_int("model.latent_dim", latent_dim, 1)
        require_int("prior.n_components", n_components, 1)
        require_number("prior.init_spread", init_spread, 0)
        self.loc = nn.Parameter(init_spread * torch.randn(n_components, latent_dim))  # (K, D)
        self.log_scale = nn.Parameter(torch.zeros(n_components, latent_dim))  # (K, D)
        self.logits = nn.Parameter(torch.zeros(n_components))  # (K,)

    def forward(self, model: nn.Module | None = None) -> Distribution:
        return DiagonalGaussianMixture(self.logits, self.loc, self.log_scale.exp())


class VampPrior(Prior):
    """p(z) = (1/K) sum_k q(z | u_k) (Tomczak & Welling 2018), K = `n_components` learned
    pseudo-inputs u_k of the data's image shape, kept in [0, 1] by a hard tanh as in the
    paper's code, and initialised around `init_mean` with `init_std` (the paper's 0.05, 0.01).
    The posteriors come from the model's own encoder, so the prior moves with it."""

    encodes_inputs = True

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        n_components: int = 500,
        init_mean: float = 0.05,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        require_int("prior.n_components", n_components, 1)
        require_number("prior.init_std", init_std, 0)
        self.pseudo_inputs = nn.Parameter(
            init_mean + init_std * torch.randn(n_components, *image_shape)
        )  # (K, C, H, W)

    def forward(self, model: nn.Module) -> Distribution:
        q = model.posterior(nn.functional.hardtanh(self.pseudo_inputs, 0.0, 1.0))  # batch (K,)
        logits = q.mean.new_zeros(len(self.pseudo_inputs))  # uniform weights (K,)
        if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
            return DiagonalGaussianMixture(logits, q.base_dist.loc, q.base_dist.scale)
        return MixtureSameFamily(Categorical(logits=logits), q)  # any other posterior family

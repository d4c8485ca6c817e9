"""Models with known answers for the math tests: tiny VAEs, a VAE with a constant posterior,
and a linear Gaussian model whose marginal likelihood and exact posterior are closed forms."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal

from vaelab.likelihoods import Bernoulli, GaussianFixed
from vaelab.models import VAE
from vaelab.nets import MLPDecoder, MLPEncoder
from vaelab.priors import StandardNormal

D, LATENT, SIGMA = 6, 3, 0.5  # the linear Gaussian model: data dims, latent dims, noise scale


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ConstantEncoder(nn.Module):
    """Ignores x; returns fixed (mean, log-variance) rows, one per example."""

    def __init__(self, mean: Tensor, log_var: Tensor) -> None:
        super().__init__()
        self.out = nn.Parameter(torch.cat([mean, log_var], dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        return self.out[: len(x)]


def built(module: nn.Module):
    """A factory that returns an already built network (the model passes it its sizes)."""
    return lambda **sizes: module


def constant_vae(mean: Tensor, log_var: Tensor) -> VAE:
    latent_dim = mean.shape[-1]
    vae = VAE(
        image_shape=(1, 2, 2),
        likelihood=Bernoulli(),
        prior=StandardNormal,
        encoder=built(ConstantEncoder(mean, log_var)),
        decoder=partial(MLPDecoder, hidden_dims=(4,)),
        latent_dim=latent_dim,
    )
    return vae.double()


def random_posterior_params(n: int, latent_dim: int, seed: int) -> tuple[Tensor, Tensor]:
    g = generator(seed)
    mean = 1.5 * torch.randn(n, latent_dim, generator=g, dtype=torch.float64)
    log_var = -3 + 4 * torch.rand(n, latent_dim, generator=g, dtype=torch.float64)  # in (-3, 1)
    return mean, log_var


def small_vae(latent_dim: int = 3, prior=StandardNormal) -> VAE:
    return VAE(
        image_shape=(1, 4, 4),
        likelihood=Bernoulli(),
        prior=prior,
        encoder=partial(MLPEncoder, hidden_dims=(8,), activation=nn.Tanh),
        decoder=partial(MLPDecoder, hidden_dims=(8,), activation=nn.Tanh),
        latent_dim=latent_dim,
    )


def binary_batch(n: int = 6, seed: int = 0) -> Tensor:
    return torch.bernoulli(torch.full((n, 1, 4, 4), 0.4), generator=generator(seed))


def fixed_linear(weight: Tensor, bias: Tensor) -> nn.Linear:
    """A float64 nn.Linear holding the given weight and bias."""
    linear = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


class LinearDecoder(nn.Module):
    """z (N, latent) -> W z + b as (N, 1, 1, D) images."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.linear = fixed_linear(weight, bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z).view(-1, 1, 1, self.linear.out_features)


class LinearEncoder(nn.Module):
    """x (B, 1, 1, D) -> A x + c, the (mean, log-variance) of q(z|x)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.linear = fixed_linear(weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def linear_gaussian_model() -> tuple[Tensor, Tensor, Tensor]:
    """W (D, LATENT) with orthogonal columns of norms 1, 1.5, 2 (so W^T W is diagonal), and b."""
    g = generator(0)
    q, _ = torch.linalg.qr(torch.randn(D, LATENT, generator=g, dtype=torch.float64))
    scales = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    weight = q * scales
    bias = torch.randn(D, generator=g, dtype=torch.float64)
    return weight, bias, scales


def exact_posterior(weight: Tensor, bias: Tensor, scales: Tensor, x: Tensor):
    """p(z|x) = N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I = diag(s^2 + sigma^2)."""
    m_diag = scales**2 + SIGMA**2
    mean = (x.flatten(1) - bias) @ weight / m_diag
    var = SIGMA**2 / m_diag
    return mean, var, m_diag


def linear_vae(encoder: nn.Module, weight: Tensor, bias: Tensor) -> VAE:
    vae = VAE(
        image_shape=(1, 1, D),
        likelihood=GaussianFixed(SIGMA),
        prior=StandardNormal,
        encoder=built(encoder),
        decoder=built(LinearDecoder(weight, bias)),
        latent_dim=LATENT,
    )
    return vae.double()


def exact_log_marginal(weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    covariance = weight @ weight.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
    return MultivariateNormal(bias, covariance).log_prob(x.flatten(1))


def linear_data(weight: Tensor, bias: Tensor, n: int = 8) -> Tensor:
    g = generator(1)
    z = torch.randn(n, LATENT, generator=g, dtype=torch.float64)
    x = z @ weight.T + bias + SIGMA * torch.randn(n, D, generator=g, dtype=torch.float64)
    x[-1] += 3.0  # and one example far from the model's typical set
    return x.view(n, 1, 1, D)


def approximate_posterior_vae(shift: float = 0.5, variance_factor: float = 2.0):
    """The linear Gaussian model with an encoder near, but not at, the exact posterior: means
    shifted by 0.5 and variances doubled, so log p(x) - ELBO is a few nats. shift=0 and
    variance_factor=1: the exact posterior."""
    weight, bias, scales = linear_gaussian_model()
    D = weight.shape[0]
    m_diag = scales**2 + SIGMA**2
    enc_weight = torch.cat([weight.T / m_diag[:, None], torch.zeros(LATENT, D).double()])
    log_var = torch.log(variance_factor * SIGMA**2 / m_diag)
    low = VAE.min_log_var  # the encoder's output goes through the soft floor: invert it
    enc_bias = torch.cat(
        [-(weight.T @ bias) / m_diag + shift, low + torch.log(torch.expm1(log_var - low))]
    )
    return linear_vae(LinearEncoder(enc_weight, enc_bias), weight, bias), weight, bias


def replay_draws(vae, z: torch.Tensor) -> None:
    """Make the VAE's posterior hand out the given draws z (k, B, latent) in order, whatever
    the chunk sizes asked for, so that iwae_bound can be compared with a reference on them."""
    draws = iter(z.split(1))

    class Replay(torch.distributions.Independent):
        def sample(self, sample_shape=(1,)):
            return torch.cat([next(draws) for _ in range(sample_shape[0])])

    original = vae.posterior
    vae.posterior = lambda inputs: Replay(original(inputs).base_dist, 1)

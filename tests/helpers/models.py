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
    low = VAE.log_var_bounds[0]  # the encoder's output goes through the soft floor: invert it
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


# --- a two-layer linear Gaussian chain: p(z2) p(z1|z2) p(x|z1), all closed forms -------------
CHAIN_S1 = 0.7  # noise scale of p(z1 | z2)
CHAIN_A = torch.tensor([1.2, 0.8, 1.5], dtype=torch.float64)  # p(z1|z2) mean: A z2 + a, A diagonal
CHAIN_OFFSET = torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64)


def set_gaussian_layer(layer: nn.Module, weight: Tensor, bias: Tensor, log_var: Tensor) -> None:
    """A GaussianLayer without hidden layers (one Linear): mean weight @ z + bias, a constant
    log-variance (through the log-variance soft floor, inverted here)."""
    (linear,) = layer.net
    d_out, d_in = weight.shape
    low = VAE.log_var_bounds[0]
    with torch.no_grad():
        linear.weight.copy_(torch.cat([weight, torch.zeros(d_out, d_in, dtype=weight.dtype)]))
        linear.bias.copy_(torch.cat([bias, low + torch.log(torch.expm1(log_var - low))]))


def linear_chain(shift: float = 0.0, variance_factor: float = 1.0):
    """HierarchicalVAE with z1, z2 of LATENT dims each, x of D dims, every map linear:
    z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, s1^2 I), x | z1 ~ N(W z1 + b, sigma^2 I), with W^T W
    and A diagonal, so the exact posterior p(z1|x) p(z2|z1) is a chain of diagonal Gaussians
    the model can represent. The encoder is that posterior with its means shifted by `shift`
    and its variances times `variance_factor` (0 and 1: exact). Returns (model, exact log p(x)
    as a function of x)."""
    from vaelab.models import HierarchicalVAE

    weight, bias, scales = linear_gaussian_model()
    prior_var_z1 = CHAIN_A**2 + CHAIN_S1**2  # p(z1) = N(a, diag(A^2 + s1^2))
    model = HierarchicalVAE(
        image_shape=(1, 1, D),
        likelihood=GaussianFixed(SIGMA),
        prior=StandardNormal,
        encoder=lambda **sizes: LinearEncoder(
            torch.zeros(2 * LATENT, D, dtype=torch.float64), torch.zeros(2 * LATENT).double()
        ),
        decoder=built(LinearDecoder(weight, bias)),
        latent_dims=(LATENT, LATENT),
        hidden_dims=(),
    ).double()
    # q(z1|x) = p(z1|x): precision 1/prior_var + s^2/sigma^2 (W^T W = diag(s^2))
    post_var = 1 / (1 / prior_var_z1 + scales**2 / SIGMA**2)
    enc_weight = post_var[:, None] * weight.T / SIGMA**2
    enc_mean_bias = post_var * (CHAIN_OFFSET / prior_var_z1 - weight.T @ bias / SIGMA**2)
    low = VAE.log_var_bounds[0]
    log_var = torch.log(variance_factor * post_var)
    encoder = model.encoder.linear
    with torch.no_grad():
        encoder.weight.copy_(torch.cat([enc_weight, torch.zeros(LATENT, D).double()]))
        encoder.bias.copy_(
            torch.cat([enc_mean_bias + shift, low + torch.log(torch.expm1(log_var - low))])
        )
    # q(z2|z1) = p(z2|z1) = N(A (z1 - a) / (A^2 + s1^2), s1^2 / (A^2 + s1^2))
    set_gaussian_layer(
        model.up[0],
        torch.diag(CHAIN_A / prior_var_z1),
        -CHAIN_A * CHAIN_OFFSET / prior_var_z1 + shift,
        torch.log(variance_factor * CHAIN_S1**2 / prior_var_z1),
    )
    # p(z1|z2) = N(A z2 + a, s1^2)
    set_gaussian_layer(
        model.down[0],
        torch.diag(CHAIN_A),
        CHAIN_OFFSET,
        torch.log(torch.full((LATENT,), CHAIN_S1**2, dtype=torch.float64)),
    )
    mean = weight @ CHAIN_OFFSET + bias
    covariance = weight @ torch.diag(prior_var_z1) @ weight.T + SIGMA**2 * torch.eye(D).double()

    def log_marginal(x: Tensor) -> Tensor:
        return MultivariateNormal(mean, covariance).log_prob(x.flatten(1))

    return model, log_marginal


def chain_data(n: int = 8) -> Tensor:
    weight, bias, _ = linear_gaussian_model()
    g = generator(2)
    z2 = torch.randn(n, LATENT, generator=g, dtype=torch.float64)
    z1 = z2 * CHAIN_A + CHAIN_OFFSET + CHAIN_S1 * torch.randn(n, LATENT, generator=g).double()
    x = z1 @ weight.T + bias + SIGMA * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x.view(n, 1, 1, D)


# --- a conditional linear Gaussian model: z ~ N(0, I), x | z, y ~ N(W z + B onehot(y) + b, sigma^2)
N_CLASSES = 4


class FlatFeatures(nn.Module):
    """x (B, 1, 1, D) -> its D values: the encoder that hands x itself to the head."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def linear_cvae(shift: float = 0.0):
    """ConditionalVAE whose decoder is linear in (z, onehot(y)) and whose head (one
    Linear of (x, onehot(y))) is the exact posterior p(z|x,y) shifted by `shift`. Returns the
    model and log p(x|y) in closed form as a function of (x, y)."""
    from vaelab.models import ConditionalVAE

    weight, bias, scales = linear_gaussian_model()
    label_weight = torch.randn(D, N_CLASSES, generator=generator(5), dtype=torch.float64)
    decoder = LinearDecoder(torch.cat([weight, label_weight], dim=1), bias)
    model = ConditionalVAE(
        image_shape=(1, 1, D),
        likelihood=GaussianFixed(SIGMA),
        prior=StandardNormal,
        encoder=built(FlatFeatures()),
        decoder=built(decoder),
        latent_dim=LATENT,
        n_classes=N_CLASSES,
        feature_dim=D,
    ).double()
    # p(z|x,y) = N(M^-1 W^T (x - b - B y), sigma^2 M^-1), M = diag(s^2 + sigma^2)
    m_diag = scales**2 + SIGMA**2
    mean_weight = weight.T / m_diag[:, None]  # (LATENT, D)
    head_weight = torch.zeros(2 * LATENT, D + N_CLASSES, dtype=torch.float64)
    head_weight[:LATENT, :D] = mean_weight
    head_weight[:LATENT, D:] = -mean_weight @ label_weight
    log_var = torch.log(SIGMA**2 / m_diag)
    low = VAE.log_var_bounds[0]
    head_bias = torch.cat(
        [-mean_weight @ bias + shift, low + torch.log(torch.expm1(log_var - low))]
    )
    model.head = fixed_linear(head_weight, head_bias)
    covariance = weight @ weight.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)

    def log_marginal(x: Tensor, y: Tensor) -> Tensor:
        mean = bias + label_weight[:, y].T  # (B, D)
        return MultivariateNormal(mean, covariance).log_prob(x.flatten(1))

    return model, log_marginal

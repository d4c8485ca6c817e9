"""The maths, checked against closed forms and brute force: likelihood densities, the soft clamp,
the Gaussian KL, the ELBO estimator (gradients, averaging, beta) and, on a linear Gaussian model
whose marginal likelihood is known exactly, the bound ELBO <= log p(x) and its tightness."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from helpers.models import (
    LATENT,
    SIGMA,
    D,
    LinearEncoder,
    binary_batch,
    constant_vae,
    exact_log_marginal,
    exact_posterior,
    generator,
    linear_data,
    linear_gaussian_model,
    linear_vae,
    random_posterior_params,
    small_vae,
)
from torch import Tensor
from torch.distributions import Independent, kl_divergence

from vaelab.errors import ConfigError
from vaelab.likelihoods import (
    Bernoulli,
    BernoulliImages,
    ContinuousBernoulli,
    Gaussian,
    GaussianFixed,
    _BernoulliLogProbSum,
    bernoulli_log_prob_sum,
    bounded,
)
from vaelab.models import VAE
from vaelab.models.vae import bound_log_var
from vaelab.nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from vaelab.objectives import ELBO, IWAE
from vaelab.priors import StandardNormal

B, C, H, W = 5, 2, 3, 4  # a small image batch for the likelihood checks


# --- likelihoods: log p(x|z) against hand-written densities -------------------------------------


def bernoulli_reference(logits: Tensor, x: Tensor) -> Tensor:
    p = torch.sigmoid(logits.double())
    x = x.double()
    return (x * p.log() + (1 - x) * (1 - p).log()).flatten(-3).sum(-1)


def gaussian_reference(mean: Tensor, var: Tensor, x: Tensor) -> Tensor:
    mean, var, x = mean.double(), var.double(), x.double()
    density = -0.5 * torch.log(2 * math.pi * var) - (x - mean) ** 2 / (2 * var)
    return density.flatten(-3).sum(-1)


def continuous_bernoulli_reference(logits: Tensor, x: Tensor) -> Tensor:
    lam = torch.sigmoid(logits.double())
    log_norm = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))  # C(lambda), lambda != 0.5
    return bernoulli_reference(logits, x) + log_norm.flatten(-3).sum(-1)


def logits_away_from_zero(shape: tuple[int, ...], seed: int) -> Tensor:
    """Logits with 0.2 <= |l| <= 4: lambda is at least 0.05 from 1/2 (torch's Taylor zone)."""
    g = generator(seed)
    magnitude = 0.2 + 3.8 * torch.rand(shape, generator=g)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return sign * magnitude


def test_bernoulli_log_prob_matches_formula():
    logits = 3 * torch.randn(B, C, H, W, generator=generator(0))
    x = torch.bernoulli(torch.full((B, C, H, W), 0.5), generator=generator(1))
    log_prob = Bernoulli()(logits).log_prob(x)
    assert log_prob.shape == (B,)
    torch.testing.assert_close(
        log_prob.double(), bernoulli_reference(logits, x), rtol=1e-5, atol=1e-4
    )


def test_bernoulli_log_prob_of_certain_pixels_is_zero():
    logits = torch.full((2, 1, 2, 2), 30.0)
    assert torch.allclose(Bernoulli()(logits).log_prob(torch.ones(2, 1, 2, 2)), torch.zeros(2))


@pytest.mark.parametrize("pixels", [784, 12, 7])
def test_grouped_bernoulli_log_prob_sum_matches_torch_distributions(pixels):
    """The Bernoulli sum with one log per group of pixels against torch.distributions' per-pixel
    log-probs (float64), with logits from tiny to huge (where exp overflows a naive softplus and
    confident pixels would cancel in a naive sum), for pixel counts that 16 divides, that only 4
    divides, and that nothing divides."""
    gen = generator(0)
    scale = torch.tensor([1e-3, 1.0, 10.0, 100.0, 1e4]).repeat_interleave(20)[:, None, None]
    logits = torch.randn(100, 3, pixels, generator=gen) * scale  # (n, B, D)
    x = (torch.rand(3, pixels, generator=gen) < 0.4).float()
    expected = Independent(torch.distributions.Bernoulli(logits=logits.double()), 1).log_prob(
        x.double()
    )
    got = bernoulli_log_prob_sum(logits, x)
    assert got.shape == (100, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-6)


def torch_bernoulli_images(logits: Tensor, validate_args: bool | None = None) -> Independent:
    base = torch.distributions.Bernoulli(logits=logits, validate_args=validate_args)
    return Independent(base, 3, validate_args=validate_args)


def test_bernoulli_images_gradients_match_torch_distributions():
    """BernoulliImages' own backward (d/dl = x - sigmoid(l), d/dx = l) gives torch's gradients
    through the per-pixel log-probs, for logits with sample dims broadcast against the images
    and for soft targets that need a gradient themselves."""
    logits = 5 * torch.randn(4, B, C, H, W, generator=generator(0), dtype=torch.float64)
    x = torch.rand(B, C, H, W, generator=generator(1), dtype=torch.float64)
    weights = torch.randn(4, B, generator=generator(2), dtype=torch.float64)
    grads = []
    for dist in (BernoulliImages, torch_bernoulli_images):
        leaf_logits, leaf_x = logits.clone().requires_grad_(), x.clone().requires_grad_()
        log_prob = dist(leaf_logits, validate_args=False).log_prob(leaf_x)  # soft targets
        assert log_prob.shape == (4, B)
        grads.append(
            (log_prob, *torch.autograd.grad((weights * log_prob).sum(), [leaf_logits, leaf_x]))
        )
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs)
    # and images with more leading dims than the logits (one decoded batch scored on many images)
    images = torch.rand(3, 1, B, C, H, W, generator=generator(3), dtype=torch.float64)
    grads = []
    for dist in (BernoulliImages, torch_bernoulli_images):
        leaf_logits = logits[0].clone().requires_grad_()
        log_prob = dist(leaf_logits, validate_args=False).log_prob(images)
        assert log_prob.shape == (3, 1, B)
        grads.append((log_prob, *torch.autograd.grad(log_prob.sum(), leaf_logits)))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs)
    inputs = (logits[:, :2].detach().requires_grad_(), x[:2].detach().requires_grad_())
    fn = lambda lg, v: BernoulliImages(lg, validate_args=False).log_prob(v)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_bernoulli_images_under_torch_func_transforms():
    """torch.func.grad and vmap (per-example gradients) go through BernoulliImages' own backward
    and give what they give through torch's per-pixel Independent(Bernoulli)."""
    logits = 4 * torch.randn(B, C, H, W, generator=generator(0), dtype=torch.float64)
    x = torch.bernoulli(torch.full((B, C, H, W), 0.3, dtype=torch.float64), generator=generator(1))

    def per_example(dist):
        def log_prob(lg, v):  # one image: no batch dim inside vmap
            return dist(lg, validate_args=False).log_prob(v)

        return torch.func.vmap(torch.func.grad(log_prob))(logits, x)

    ours, theirs = per_example(BernoulliImages), per_example(torch_bernoulli_images)
    assert ours.shape == logits.shape
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, x - torch.sigmoid(logits))  # d/dl log p = x - sigmoid(l)
    # the autograd.Function itself, with both arguments differentiated and batched by vmap
    flat_logits, flat_x = logits.flatten(1), torch.rand_like(x.flatten(1))
    grad = torch.func.vmap(torch.func.grad(_BernoulliLogProbSum.apply, argnums=(0, 1)))
    grad_logits, grad_x = grad(flat_logits, flat_x)
    torch.testing.assert_close(grad_logits, flat_x - torch.sigmoid(flat_logits))
    torch.testing.assert_close(grad_x, flat_logits)


def test_bernoulli_images_expand_and_half_precision():
    """BernoulliImages.expand gives a BernoulliImages with torch's expanded log-probs; float16
    logits (whose 16-factor products would overflow float16) are scored in float32."""
    logits = 3 * torch.randn(1, C, H, W, generator=generator(0))
    x = torch.bernoulli(torch.full((4, C, H, W), 0.5), generator=generator(1))
    expanded = Bernoulli()(logits).expand((4,))
    assert isinstance(expanded, BernoulliImages) and expanded.batch_shape == (4,)
    reference = torch_bernoulli_images(logits).expand((4,))
    torch.testing.assert_close(expanded.log_prob(x), reference.log_prob(x))
    even = torch.zeros(2, 1, 4, 4).half()  # 16 pixels, each factor 1 + e^0 = 2: 2^16 > 65504
    log_prob = Bernoulli()(even).log_prob(torch.ones(2, 1, 4, 4))
    assert log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob, torch.full((2,), 16 * math.log(0.5)))


def test_gaussian_log_prob_matches_formula_with_bounded_log_var():
    mean = torch.randn(B, C, H, W, generator=generator(0))
    log_var = 2 * torch.randn(B, C, H, W, generator=generator(1))
    log_var[0, 0, 0, 0] = -40.0  # far below min_log_var: must be clamped, not a huge density
    x = torch.randn(B, C, H, W, generator=generator(2))
    likelihood = Gaussian(min_log_var=-9.0, max_log_var=4.0)
    assert likelihood.params_per_pixel == 2
    log_prob = likelihood(torch.cat([mean, log_var], dim=1)).log_prob(x)
    assert log_prob.shape == (B,)
    var = bounded(log_var, -9.0, 4.0).exp()
    torch.testing.assert_close(
        log_prob.double(), gaussian_reference(mean, var, x), rtol=1e-5, atol=1e-3
    )


def test_gaussian_splits_mean_and_log_var_by_channel():
    """The first C channels are the means, the next C the log-variances."""
    mean = torch.arange(C, dtype=torch.float32).view(1, C, 1, 1).expand(1, C, H, W)
    log_var = torch.full((1, C, H, W), -1.0)
    p = Gaussian()(torch.cat([mean, log_var], dim=1))
    torch.testing.assert_close(p.mean, mean)
    torch.testing.assert_close(p.variance, bounded(log_var, -9.0, 4.0).exp())


def test_gaussian_fixed_log_prob_matches_formula():
    sigma = 0.3
    mean = torch.randn(B, C, H, W, generator=generator(0))
    x = mean + 0.5 * torch.randn(B, C, H, W, generator=generator(1))
    log_prob = GaussianFixed(sigma)(mean).log_prob(x)
    assert log_prob.shape == (B,)
    var = torch.full_like(mean, sigma**2)
    torch.testing.assert_close(
        log_prob.double(), gaussian_reference(mean, var, x), rtol=1e-5, atol=1e-3
    )


def test_continuous_bernoulli_log_prob_matches_formula():
    logits = logits_away_from_zero((B, C, H, W), seed=0)
    x = torch.rand(B, C, H, W, generator=generator(1))
    log_prob = ContinuousBernoulli()(logits).log_prob(x)
    assert log_prob.shape == (B,)
    expected = continuous_bernoulli_reference(logits, x)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=1e-3)


def test_continuous_bernoulli_normaliser_is_two_at_one_half():
    """lambda = 1/2: 0.5^x 0.5^(1-x) times C(1/2) = 2 is the uniform density, log p = 0."""
    p = ContinuousBernoulli()(torch.zeros(1, 1, 2, 2))
    x = torch.rand(1, 1, 2, 2, generator=generator(0))
    torch.testing.assert_close(p.log_prob(x), torch.zeros(1), atol=1e-4, rtol=0)


def test_continuous_bernoulli_density_integrates_to_one():
    """Brute force: the density of one pixel, integrated over [0, 1] on a fine grid, is 1."""
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    for logit in (-3.0, -0.7, 0.4, 2.5):
        p = ContinuousBernoulli()(torch.full((1, 1, 1, 1), logit, dtype=torch.float64))
        density = p.log_prob(grid.view(-1, 1, 1, 1, 1)).exp().squeeze(-1)
        assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6)


LIKELIHOODS = [Bernoulli(), Gaussian(), GaussianFixed(0.2), ContinuousBernoulli()]


@pytest.mark.parametrize("likelihood", LIKELIHOODS, ids=lambda lik: type(lik).__name__)
def test_likelihood_with_sample_and_batch_dims(likelihood):
    """Params (L, B, P*C, H, W) give log_prob of shape (L, B), equal to each slice on its own."""
    n_samples = 3
    params = logits_away_from_zero((n_samples, B, likelihood.out_channels(C), H, W), seed=0)
    x = torch.rand(B, C, H, W, generator=generator(1))
    if likelihood.accepts == ("binary",):
        x = x.round()
    log_prob = likelihood(params).log_prob(x)
    assert log_prob.shape == (n_samples, B)
    for i in range(n_samples):
        torch.testing.assert_close(log_prob[i], likelihood(params[i]).log_prob(x))


# --- bounded: the soft clamp ---------------------------------------------------------------------

BOUNDS = [(0.0, 1.0), (-9.0, 4.0), (-12.0, 8.0)]
EXTREMES = [-1e30, -1e4, -100.0, -30.0, 30.0, 100.0, 1e4, 1e30]


@pytest.mark.parametrize("low,high", BOUNDS)
def test_bounded_stays_below_high(low, high):
    y = bounded(torch.tensor(EXTREMES), low, high)
    assert torch.isfinite(y).all()
    assert (y <= high).all()
    # strictly inside wherever float64 can tell high - exp(-distance) from high
    x64 = torch.linspace(low - 25, high + 25, 1001, dtype=torch.float64)
    assert (bounded(x64, low, high) < high).all()


@pytest.mark.parametrize("low,high", BOUNDS)
def test_bounded_stays_above_low(low, high):
    y = bounded(torch.tensor(EXTREMES), low, high)
    assert (y >= low).all(), y
    x64 = torch.linspace(low - 25, high + 25, 1001, dtype=torch.float64)
    assert (bounded(x64, low, high) > low).all(), bounded(x64, low, high).min().item()


@pytest.mark.parametrize("low,high", BOUNDS)
def test_bounded_is_nearly_identity_in_the_middle(low, high):
    width = high - low
    x = torch.linspace(low + 0.4 * width, high - 0.4 * width, 11, dtype=torch.float64)
    # the error of each softplus step is log1p(exp(-distance to its bound)) <= exp(-0.4 width)
    tolerance = 2 * math.exp(-0.4 * width)
    assert (bounded(x, low, high) - x).abs().max().item() <= tolerance
    assert bounded(torch.tensor(0.5 * (low + high)), low, high).item() == pytest.approx(
        0.5 * (low + high), abs=tolerance
    )


@pytest.mark.parametrize("low,high", BOUNDS)
def test_bounded_is_monotone_with_nonzero_gradient(low, high):
    x = torch.linspace(low - 30, high + 30, 2001, dtype=torch.float64, requires_grad=True)
    y = bounded(x, low, high)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert (grad > 0).all()
    assert (grad <= 1 + 1e-12).all()  # a contraction: never steeper than the identity
    x = torch.linspace(low - 20, high + 20, 2001, dtype=torch.float64)
    assert (bounded(x, low, high).diff() > 0).all()  # strictly increasing


# --- the posterior and its closed-form KL to the prior --------------------------------------------


def test_posterior_is_diagonal_gaussian_with_bounded_log_var():
    mean, log_var = random_posterior_params(4, 3, seed=0)
    log_var[0, 0] = 50.0  # runaway encoder output: clamped below VAE.log_var_bounds[1]
    log_var[1, 1] = -1e4  # collapsing variance: floored above VAE.log_var_bounds[0]
    q = constant_vae(mean, log_var).posterior(torch.zeros(4, 1, 2, 2, dtype=torch.float64))
    assert q.batch_shape == (4,) and q.event_shape == (3,)
    torch.testing.assert_close(q.mean, mean)
    expected_var = bound_log_var(log_var).exp()
    torch.testing.assert_close(q.variance, expected_var)
    assert q.variance[0, 0] <= math.exp(VAE.log_var_bounds[1])
    assert q.variance[1, 1] >= math.exp(VAE.log_var_bounds[0])


def test_kl_matches_textbook_formula():
    mean, log_var = random_posterior_params(6, 4, seed=0)
    vae = constant_vae(mean, log_var)
    x = torch.zeros(6, 1, 2, 2, dtype=torch.float64)
    kl = kl_divergence(vae.posterior(x), vae.prior())
    assert kl.shape == (6,)
    var = bound_log_var(log_var).exp()
    expected = 0.5 * (mean**2 + var - 1 - var.log()).sum(-1)
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-10)


def test_kl_is_zero_when_posterior_is_the_prior():
    vae = constant_vae(
        torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    )
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(
        kl_divergence(vae.posterior(x), vae.prior()), torch.zeros(2).double()
    )


def test_kl_matches_monte_carlo_estimate():
    n = 200_000
    mean, log_var = random_posterior_params(4, 3, seed=1)
    vae = constant_vae(mean, log_var)
    q, p = vae.posterior(torch.zeros(4, 1, 2, 2, dtype=torch.float64)), vae.prior()
    torch.manual_seed(0)
    z = q.sample((n,))  # (n, 4, 3)
    log_ratio = q.log_prob(z) - p.log_prob(z)  # (n, 4)
    estimate, standard_error = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n)
    kl = kl_divergence(q, p)
    # a 5-sigma band: fails by chance with probability ~ 6e-7 per example (CLT, n = 200k)
    assert ((kl - estimate).abs() <= 5 * standard_error).all(), (kl, estimate, standard_error)
    assert (standard_error < 0.02).all()  # the band is tight enough to mean something


# --- the ELBO estimator ---------------------------------------------------------------------------


@pytest.mark.parametrize("objective", [ELBO(), IWAE(k=3)], ids=repr)
def test_mixed_precision_scores_in_float32(objective):
    """Under bfloat16 autocast (trainer.precision=bf16-mixed) the networks' matrix products run
    in bfloat16, but the posterior, the likelihood's parameters, the KL, the importance weights
    and the loss are float32, and the float32 weights get float32 gradients. The loss is that of
    float32 training up to the rounding of the network outputs."""
    torch.manual_seed(0)
    vae, x = small_vae(), binary_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vae.encoder(x).dtype == torch.bfloat16  # autocast is on
        q = vae.posterior(x)
        assert q.base_dist.loc.dtype == q.base_dist.scale.dtype == torch.float32
        assert vae.decode(q.rsample((2,))).base_dist.logits.dtype == torch.float32
        torch.manual_seed(1)
        parts = objective(vae, x)
    assert all(
        value.dtype == torch.float32 for value in parts.values() if value.is_floating_point()
    )
    parts["loss"].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in vae.parameters())
    torch.manual_seed(1)
    full = objective(vae, x)
    torch.testing.assert_close(parts["loss"], full["loss"], rtol=0.02, atol=0.05)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gradients_reach_every_encoder_parameter(beta):
    """With beta=0 the rate drops out: encoder gradients can only come through rsample."""
    torch.manual_seed(0)
    vae = small_vae()
    out = ELBO(beta=beta, n_samples=2)(vae, binary_batch())
    out["loss"].backward()
    for name, param in vae.encoder.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    for name, param in vae.decoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_elbo_parts_shapes_and_beta_relations():
    torch.manual_seed(0)
    vae, x = small_vae(), binary_batch(n=6)
    out = ELBO(beta=3.0, n_samples=4)(vae, x)
    assert set(out) == {"loss", "elbo", "rate", "distortion", "beta"}
    for key in ("elbo", "rate", "distortion"):
        assert out[key].shape == (6,), key
    assert out["loss"].shape == ()
    torch.testing.assert_close(out["loss"], (out["distortion"] + 3.0 * out["rate"]).mean())
    torch.testing.assert_close(out["elbo"], -(out["distortion"] + out["rate"]))
    assert (out["rate"] >= 0).all() and (out["distortion"] >= 0).all()  # KL; -log of a pmf


def test_elbo_reported_independently_of_beta():
    vae, x = small_vae(), binary_batch()
    results = []
    for beta in (0.0, 1.0, 7.5):
        torch.manual_seed(1)
        results.append(ELBO(beta=beta, n_samples=3)(vae, x))
    for out in results[1:]:
        torch.testing.assert_close(out["elbo"], results[0]["elbo"])
        torch.testing.assert_close(out["rate"], results[0]["rate"])
    torch.testing.assert_close(results[0]["loss"], results[0]["distortion"].mean())


def test_elbo_averages_its_samples():
    """distortion = -(1/L) sum_l log p(x|z_l), z_l the same reparameterised draws."""
    n_samples = 5
    vae, x = small_vae(), binary_batch()
    torch.manual_seed(2)
    out = ELBO(n_samples=n_samples)(vae, x)
    torch.manual_seed(2)
    z = vae.posterior(x).rsample((n_samples,))
    assert z.shape == (n_samples, len(x), vae.latent_dim)
    per_sample = torch.stack([vae.decode(z[i]).log_prob(x) for i in range(n_samples)])
    torch.testing.assert_close(out["distortion"], -per_sample.mean(0))
    torch.testing.assert_close(out["rate"], kl_divergence(vae.posterior(x), vae.prior()))


# --- a linear Gaussian model: the exact marginal likelihood ---------------------------------------


def elbo_and_standard_error(vae: VAE, x: Tensor, n_samples: int) -> tuple[Tensor, Tensor]:
    """The vaelab ELBO, and the MC standard error of its distortion term (measured)."""
    torch.manual_seed(0)
    with torch.no_grad():
        elbo = ELBO(n_samples=n_samples)(vae, x)["elbo"]
        z = vae.posterior(x).sample((n_samples,))
        log_lik = vae.decode(z).log_prob(x)  # (L, B)
    return elbo, log_lik.std(0) / math.sqrt(n_samples)


def test_linear_gaussian_exact_posterior_is_diagonal():
    """W has orthogonal columns, so W^T W and hence the exact posterior covariance are diagonal."""
    weight, _, scales = linear_gaussian_model()
    torch.testing.assert_close(weight.T @ weight, torch.diag(scales**2))


def test_elbo_equals_log_marginal_at_the_exact_posterior():
    weight, bias, scales = linear_gaussian_model()
    m_diag = scales**2 + SIGMA**2
    enc_weight = torch.cat([weight.T / m_diag[:, None], torch.zeros(LATENT, D).double()])
    enc_bias = torch.cat([-(weight.T @ bias) / m_diag, torch.log(SIGMA**2 / m_diag)])
    assert (enc_bias[LATENT:] > VAE.log_var_bounds[0] + 8).all()  # bounded() is ~identity here
    vae = linear_vae(LinearEncoder(enc_weight, enc_bias), weight, bias)
    x = linear_data(weight, bias)

    mean, var, _ = exact_posterior(weight, bias, scales, x)
    q = vae.posterior(x)
    torch.testing.assert_close(q.mean, mean)
    torch.testing.assert_close(q.variance, var.expand_as(mean), rtol=1e-3, atol=0)

    elbo, standard_error = elbo_and_standard_error(vae, x, n_samples=50_000)
    log_px = exact_log_marginal(weight, bias, x)
    assert (standard_error < 0.02).all()
    assert ((elbo - log_px).abs() <= 5 * standard_error + 1e-4).all(), elbo - log_px


def test_elbo_gap_is_kl_to_exact_posterior_for_arbitrary_encoder():
    """log p(x) - ELBO(x) = KL(q(z|x) || p(z|x)) >= 0, for an arbitrary (random) encoder."""
    weight, bias, scales = linear_gaussian_model()
    g = generator(2)
    enc_weight = 0.3 * torch.randn(2 * LATENT, D, generator=g, dtype=torch.float64)
    enc_bias = 0.5 * torch.randn(2 * LATENT, generator=g, dtype=torch.float64)
    vae = linear_vae(LinearEncoder(enc_weight, enc_bias), weight, bias)
    x = linear_data(weight, bias)

    elbo, standard_error = elbo_and_standard_error(vae, x, n_samples=50_000)
    log_px = exact_log_marginal(weight, bias, x)
    tolerance = 5 * standard_error + 1e-4
    assert (elbo <= log_px + tolerance).all(), (elbo, log_px)

    mean, var, _ = exact_posterior(weight, bias, scales, x)
    q = vae.posterior(x)
    posterior = torch.distributions.Independent(
        torch.distributions.Normal(mean, var.sqrt().expand_as(mean)), 1
    )
    gap = kl_divergence(q, posterior)
    assert (gap > 10 * tolerance).all()  # the encoder really is far off: the bound is not tight
    assert ((log_px - elbo - gap).abs() <= tolerance).all(), (log_px - elbo, gap)


# --- nets: shapes and impossible shapes -----------------------------------------------------------

IMAGE_SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=str)
@pytest.mark.parametrize("encoder_class", [MLPEncoder, ConvEncoder])
def test_encoder_output_shape(encoder_class, shape):
    kwargs = {"hidden_dims": (16,)} if encoder_class is MLPEncoder else {"channels": (4, 8)}
    encoder = encoder_class(shape, 10, **kwargs)
    assert encoder(torch.rand(7, *shape)).shape == (7, 10)


@pytest.mark.parametrize("params_per_pixel", [1, 2])
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=str)
@pytest.mark.parametrize("decoder_class", [MLPDecoder, ConvDecoder])
def test_decoder_output_shape(decoder_class, shape, params_per_pixel):
    c, h, w = shape
    out_shape = (params_per_pixel * c, h, w)
    kwargs = {"hidden_dims": (16,)} if decoder_class is MLPDecoder else {"channels": (4, 8)}
    decoder = decoder_class(5, out_shape, **kwargs)
    assert decoder(torch.randn(7, 5)).shape == (7, *out_shape)


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=str)
def test_vae_decode_keeps_sample_dims(shape):
    latent_dim = 4
    vae = VAE(
        image_shape=shape,
        likelihood=Gaussian(),
        prior=StandardNormal,
        encoder=partial(ConvEncoder, channels=(4, 8)),
        decoder=partial(ConvDecoder, channels=(4, 8)),
        latent_dim=latent_dim,
    )
    assert vae.decoder.net[-1].out_channels == 2 * shape[0]  # mean and log-variance per value
    x = torch.rand(2, *shape)
    p = vae.decode(torch.randn(3, 2, latent_dim))
    assert p.batch_shape == (3, 2) and p.event_shape == shape
    assert p.log_prob(x).shape == (3, 2)
    assert vae.reconstruct(x).shape == (2, *shape)
    assert vae.sample(5).shape == (5, *shape)


@pytest.mark.parametrize("net_class", [ConvEncoder, ConvDecoder])
@pytest.mark.parametrize("shape,channels", [((1, 30, 30), (4, 8)), ((1, 28, 28), (4, 8, 16))])
def test_conv_nets_reject_impossible_shapes(net_class, shape, channels):
    with pytest.raises(ConfigError, match="x".join(map(str, shape))):
        if net_class is ConvEncoder:
            ConvEncoder(shape, 8, channels=channels)
        else:
            ConvDecoder(4, shape, channels=channels)


# --- validation of objective and prior arguments --------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [({"beta": -1.0}, "beta"), ({"n_samples": 0}, "n_samples"), ({"n_samples": 1.5}, "n_samples")],
)
def test_elbo_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ELBO(**kwargs)


@pytest.mark.parametrize("latent_dim", [0, -3])
def test_standard_normal_rejects_empty_latent(latent_dim):
    with pytest.raises(ConfigError, match="latent_dim"):
        StandardNormal(latent_dim)


def test_likelihoods_reject_bad_arguments():
    with pytest.raises(ConfigError, match="sigma"):
        GaussianFixed(0.0)
    with pytest.raises(ConfigError, match="min_log_var"):
        Gaussian(min_log_var=1.0, max_log_var=0.0)

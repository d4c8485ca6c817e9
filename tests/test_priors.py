"""Priors on the model protocol: MixtureOfGaussians and VampPrior log-densities against brute
force, the rate (registered KL where torch has it, else Monte Carlo on the same draws) against the
exact KL, and a tiny run of each prior end to end (train, evaluate, pictures)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.models import binary_batch, small_vae
from helpers.runs import compose_evaluate, compose_train, tiny
from torch.distributions import Independent, MixtureSameFamily, Normal, kl_divergence

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.errors import ConfigError
from vaelab.models import rate, rate_per_dim
from vaelab.models.base import NO_CLOSED_FORM, kind, prior_quantiles
from vaelab.models.vae import bound_log_var
from vaelab.objectives import ELBO, IWAE
from vaelab.priors import (
    DiagonalGaussianMixture,
    MixtureOfGaussians,
    StandardNormal,
    VampPrior,
)


def normal_log_pdf(z, loc, scale):
    """log N(z; loc, diag scale^2), written out, summed over the last dim."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_mixture_of_gaussians_log_density_by_brute_force():
    torch.manual_seed(0)
    prior = MixtureOfGaussians(latent_dim=3, n_components=4).double()
    with torch.no_grad():
        prior.log_scale.uniform_(-1, 0.5)
        prior.logits.normal_()
    p = prior()
    assert isinstance(p, MixtureSameFamily) and p.event_shape == (3,)
    z = torch.randn(5, 2, 3, dtype=torch.float64)  # (S, B, D)
    weights = torch.softmax(prior.logits, 0)
    expected = torch.zeros(5, 2, dtype=torch.float64)
    for k in range(4):
        scale = prior.log_scale[k].exp()
        expected += weights[k] * normal_log_pdf(z, prior.loc[k], scale).exp()
    torch.testing.assert_close(p.log_prob(z), expected.log(), rtol=1e-10, atol=1e-10)


def test_vampprior_is_the_mean_of_the_pseudo_input_posteriors():
    torch.manual_seed(0)
    model = small_vae(latent_dim=3, prior=VampPrior).double()
    pseudo = model.latent_prior.pseudo_inputs
    assert pseudo.shape == (500, 1, 4, 4)  # the paper's K and the data's image shape
    with torch.no_grad():
        pseudo.uniform_(-0.5, 1.5)  # some outside [0, 1]: the hard tanh clamps them
    z = torch.randn(4, 3, dtype=torch.float64)
    clamped = pseudo.clamp(0, 1)
    mean, log_var = model.encoder(clamped).chunk(2, -1)  # (K, D) each
    scale = (0.5 * bound_log_var(log_var, model.log_var_bounds, model.log_var_clamp)).exp()
    per_component = normal_log_pdf(z[:, None, :], mean, scale)  # (4, K)
    expected = torch.logsumexp(per_component, -1) - math.log(500)
    torch.testing.assert_close(model.prior().log_prob(z), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matrix_product_mixture_density_matches_torch(dtype):
    """DiagonalGaussianMixture's log_prob (three matrix products, float64 inside) against
    torch's MixtureSameFamily in float64, values and gradients, with codes far from tiny
    components (where the expanded square would cancel in float32)."""
    g = torch.Generator().manual_seed(0)
    params = (
        torch.randn(50, generator=g, dtype=torch.float64),  # logits (K,)
        3 * torch.randn(50, 8, generator=g, dtype=torch.float64),  # loc (K, D)
        0.01 + 0.3 * torch.rand(50, 8, generator=g, dtype=torch.float64),  # scale (K, D)
        4 * torch.randn(6, 5, 8, generator=g, dtype=torch.float64),  # z (S, B, D)
    )
    exact = [p.clone().requires_grad_() for p in params]
    inputs = [p.to(dtype).requires_grad_() for p in params]
    logits, loc, scale, z = exact
    reference = MixtureSameFamily(
        torch.distributions.Categorical(logits=logits), Independent(Normal(loc, scale), 1)
    ).log_prob(z)
    value = DiagonalGaussianMixture(*inputs[:3]).log_prob(inputs[3])
    assert value.dtype == dtype and value.shape == (6, 5)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(value.double(), reference, rtol=tolerance, atol=tolerance)
    grads = torch.autograd.grad(value.sum(), inputs)
    # float32 inputs are themselves rounded: their gradients agree to float32 sensitivity
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for grad, expected in zip(grads, torch.autograd.grad(reference.sum(), exact), strict=True):
        torch.testing.assert_close(grad.double(), expected, rtol=tolerance, atol=tolerance)


def test_vampprior_moves_with_the_encoder_and_its_pseudo_inputs():
    torch.manual_seed(0)
    model = small_vae(latent_dim=2, prior=VampPrior)
    parts = ELBO()(model, binary_batch())
    parts["loss"].backward()
    assert model.latent_prior.pseudo_inputs.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_rate_uses_the_registered_kl_where_torch_has_one():
    model = small_vae().double()
    q = model.posterior(binary_batch().double())
    p = model.prior()
    z = q.rsample((3,))
    torch.testing.assert_close(model.rate(q, p, z), kl_divergence(q, p), rtol=0, atol=0)
    torch.testing.assert_close(
        rate_per_dim(q, p).sum(-1), kl_divergence(q, p), rtol=1e-12, atol=1e-12
    )


def test_monte_carlo_rate_matches_the_exact_kl():
    """A one-component mixture is a Gaussian with no registered KL: the rate falls back to
    mean_s log q(z_s) - log p(z_s), which must agree with the closed form within 5 standard
    errors, on the same draws the caller passes in."""
    torch.manual_seed(0)
    loc = torch.randn(4, 3, dtype=torch.float64)
    q = Independent(Normal(loc, 0.3 + torch.rand(4, 3, dtype=torch.float64)), 1)
    p_loc, p_scale = torch.randn(3, dtype=torch.float64), 0.5 + torch.rand(3, dtype=torch.float64)
    gaussian = Independent(Normal(p_loc, p_scale), 1)
    mixture = MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(1, dtype=torch.float64)),
        Independent(Normal(p_loc[None], p_scale[None]), 1),
    )
    z = q.sample((100_000,))
    estimate = rate(q, mixture, z)
    log_ratio = q.log_prob(z) - mixture.log_prob(z)
    torch.testing.assert_close(estimate, log_ratio.mean(0), rtol=0, atol=0)
    # the registry was asked once for this pair of kinds; later calls go straight to the estimate
    assert (kind(q), kind(mixture)) in NO_CLOSED_FORM and (kind(q), kind(gaussian)) not in (
        NO_CLOSED_FORM
    )
    torch.testing.assert_close(rate(q, mixture, z), estimate, rtol=0, atol=0)
    standard_error = log_ratio.std(0) / math.sqrt(len(z))
    exact = kl_divergence(q, gaussian)
    assert ((estimate - exact).abs() <= 5 * standard_error).all(), (estimate, exact)
    assert rate_per_dim(q, mixture) is None  # a mixture has no per-dimension KL


@pytest.mark.parametrize("prior", [MixtureOfGaussians, VampPrior])
def test_objectives_take_the_monte_carlo_rate_on_their_own_draws(prior):
    torch.manual_seed(0)
    model, x = small_vae(latent_dim=2, prior=prior).double(), binary_batch().double()
    torch.manual_seed(1)
    parts = ELBO(n_samples=3)(model, x)
    torch.manual_seed(1)
    q, p = model.posterior(x), model.prior()
    z = q.rsample((3,))
    expected = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(parts["rate"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts["elbo"], -(parts["distortion"] + parts["rate"]))
    torch.manual_seed(2)
    iwae = IWAE(k=4)(model, x)
    torch.manual_seed(2)
    q, p = model.posterior(x), model.prior()
    z = q.rsample((4,))
    expected = (q.log_prob(z) - p.log_prob(z)).mean(0)  # IWAE reuses its weights' log-ratio
    torch.testing.assert_close(iwae["rate"], expected, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(iwae["loss"])


def test_free_bits_need_a_per_dimension_kl():
    model = small_vae(prior=MixtureOfGaussians)
    with pytest.raises(ConfigError, match="free_bits needs a KL per latent dimension"):
        ELBO(free_bits=0.5)(model, binary_batch())


def test_prior_quantiles_exact_for_gaussians_empirical_otherwise():
    probabilities = torch.tensor([0.05, 0.5, 0.95])
    exact = prior_quantiles(StandardNormal(2)(), probabilities)
    torch.testing.assert_close(exact, Normal(0.0, 1.0).icdf(probabilities)[:, None].expand(3, 2))
    torch.manual_seed(0)
    mixture = MixtureOfGaussians(2, n_components=1)
    with torch.no_grad():
        mixture.loc.fill_(3.0)
    empirical = prior_quantiles(mixture(), probabilities, n=200_000)
    torch.testing.assert_close(empirical, exact + 3.0, atol=0.02, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "prior,latent_dim", [("mog", 2), ("vampprior", 3)], ids=["mog-2d", "vampprior-3d"]
)
def test_each_prior_trains_and_evaluates_end_to_end(prior, latent_dim, data_dir, tmp_path):
    overrides = [
        *tiny(data_dir),
        f"prior={prior}",
        f"model.latent_dim={latent_dim}",
        f"paths.log_dir={tmp_path}",
    ]
    if prior == "vampprior":
        overrides.append("prior.n_components=16")
    cfg = compose_train(overrides, output_dir=tmp_path / "run")
    metrics = train_module.run(cfg)
    assert math.isfinite(metrics["val/elbo"])
    # A mixture prior has no closed-form KL: the rate is a one-sample Monte-Carlo estimate, which
    # can fall just below zero where q(z|x) has collapsed onto the prior (as on random fake data).
    assert metrics["val/rate"] > -0.05
    eval_cfg = compose_evaluate(
        [f"run={tmp_path / 'run'}", f"paths.data_dir={data_dir}", "eval.k=20"],
        output_dir=tmp_path / "evaluation",
    )
    evaluate.run(eval_cfg)
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert report["metrics"]["test/nll_is"] <= -report["metrics"]["test/elbo"] + 5
    assert "kl_per_dim_sorted" not in report  # a mixture prior has no per-dimension KL
    pictures = {p.name for p in (tmp_path / "evaluation").glob("*.png")}
    shaped = "manifold.png" if latent_dim == 2 else "traversals.png"
    assert {"samples.png", "reconstructions.png", shaped} <= pictures


def test_mixture_samples_follow_the_mixture():
    """DiagonalGaussianMixture.sample (one component per draw): the mean and variance of the
    draws against the mixture's closed-form moments."""
    torch.manual_seed(0)
    prior = MixtureOfGaussians(2, n_components=3, init_spread=3.0)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
        prior.log_scale.fill_(-1.0)
    p = prior()
    draws = p.sample((200_000,))
    assert draws.shape == (200_000, 2)
    torch.testing.assert_close(draws.mean(0), p.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(draws.var(0), p.variance, atol=0.1, rtol=0.02)

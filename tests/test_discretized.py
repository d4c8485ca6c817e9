"""The discretised likelihoods for 8-bit data: exact bin probabilities (a pixel's 256 sum to 1),
against brute-force numerical integration, the channel coupling against its formula, finite
gradients at extreme parameters, means and samples on the 256 values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from vaelab.likelihoods import (
    DiscretizedGaussian,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
)

LEVELS = torch.arange(256, dtype=torch.float64) / 255
SINGLE = [DiscretizedLogistic, DiscretizedGaussian]


def single_params(loc: float, log_scale: float) -> torch.Tensor:
    """Decoder output of one 1x1 grey pixel: (1, 2, 1, 1), loc relative to mid-grey."""
    return torch.tensor([loc - 0.5, log_scale], dtype=torch.float64).view(1, 2, 1, 1)


@pytest.mark.parametrize("likelihood", SINGLE, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loc, log_scale", [(0.5, -3.0), (0.02, -5.0), (1.3, -1.0), (0.4, -7.5)])
def test_bins_sum_to_one_and_match_numerical_integration(likelihood, loc, log_scale):
    lik = likelihood()
    params = single_params(loc, log_scale)
    log_p = lik(params).log_prob(LEVELS.view(256, 1, 1, 1))  # (256,)
    assert torch.all(log_p <= 0)
    assert torch.exp(log_p).sum().item() == pytest.approx(1.0, abs=1e-5)

    scale = math.exp(lik._log_scale(torch.tensor(log_scale, dtype=torch.float64)).item())
    law = stats.logistic if likelihood is DiscretizedLogistic else stats.norm
    edges = [-np.inf, *((np.arange(255) + 0.5) / 255), np.inf]
    for k in (0, 1, 7, 100, 128, 200, 254, 255):
        expected, _ = integrate.quad(
            lambda t: law.pdf(t, loc=loc, scale=scale), edges[k], edges[k + 1], epsabs=1e-14
        )
        if expected > 1e-12:
            assert math.exp(log_p[k].item()) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_mixture_on_two_coupled_channels_sums_to_one():
    """Every pair (x_1, x_2) of a 2-channel pixel: the joint probabilities sum to 1."""
    torch.manual_seed(0)
    lik = DiscretizedLogisticMixture(components=3)
    params = torch.randn(1, lik.out_channels(2), 1, 1, dtype=torch.float64)
    params[:, 3:] *= 0.5
    grid = torch.cartesian_prod(LEVELS, LEVELS).view(-1, 2, 1, 1)  # (65536, 2, 1, 1)
    log_p = lik(params).log_prob(grid)
    assert torch.exp(log_p).sum().item() == pytest.approx(1.0, abs=1e-5)


def logistic_bin(x: float, mu: float, s: float) -> float:
    """P(k) of a logistic(mu, s) discretised to the 256 bins, edges to -inf / +inf (float64)."""

    def cdf(t):
        return 1 / (1 + math.exp(-(t - mu) / s))

    upper = 1.0 if x > 1 - 1 / 510 else cdf(x + 1 / 510)
    lower = 0.0 if x < 1 / 510 else cdf(x - 1 / 510)
    return upper - lower


def test_rgb_mixture_matches_the_pixelcnn_formula():
    """p(r, g, b) = sum_k pi_k P(r | mu_r) P(g | mu_g + a r) P(b | mu_b + b r + c g)."""
    torch.manual_seed(1)
    k = 2
    lik = DiscretizedLogisticMixture(components=k)
    params = torch.randn(1, lik.out_channels(3), 1, 1, dtype=torch.float64) * 0.7
    x = torch.tensor([30, 200, 255], dtype=torch.float64).view(1, 3, 1, 1) / 255
    got = lik(params).log_prob(x).item()

    flat = params.view(-1).tolist()
    logits, rest = flat[:k], np.array(flat[k:]).reshape(k, 9)
    weights = np.exp(logits) / np.exp(logits).sum()
    r, g, b = x.view(-1).tolist()
    bound = lik._log_scale
    total = 0.0
    for j in range(k):
        mu = rest[j, :3] + 0.5
        s = [math.exp(bound(torch.tensor(v)).item()) for v in rest[j, 3:6]]
        a, bb, c = np.tanh(rest[j, 6:9])
        total += (
            weights[j]
            * logistic_bin(r, mu[0], s[0])
            * logistic_bin(g, mu[1] + a * r, s[1])
            * logistic_bin(b, mu[2] + bb * r + c * g, s[2])
        )
    assert got == pytest.approx(math.log(total), rel=1e-9)


@pytest.mark.parametrize(
    "likelihood",
    [DiscretizedLogistic, DiscretizedGaussian, lambda: DiscretizedLogisticMixture(4)],
    ids=["dlogistic", "dgaussian", "dlogistic_mixture"],
)
def test_gradients_are_finite_for_extreme_parameters(likelihood):
    lik = likelihood()
    out = lik.out_channels(3)
    torch.manual_seed(0)
    base = torch.randn(6, out, 4, 4)
    scales = torch.tensor([1.0, 30.0, -30.0, 300.0, 1e-3, -300.0]).view(6, 1, 1, 1)
    params = (base * scales).requires_grad_()
    x = torch.randint(0, 256, (6, 3, 4, 4)).float() / 255
    x[:, :, 0] = 0.0  # edge bins
    x[:, :, 1] = 1.0
    log_p = lik(params).log_prob(x)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    log_p.sum().backward()
    assert torch.isfinite(params.grad).all()


@pytest.mark.parametrize(
    "likelihood",
    [DiscretizedLogistic, DiscretizedGaussian, lambda: DiscretizedLogisticMixture(3)],
    ids=["dlogistic", "dgaussian", "dlogistic_mixture"],
)
def test_samples_are_8_bit_values_and_the_mean_is_in_range(likelihood):
    lik = likelihood()
    torch.manual_seed(0)
    params = torch.randn(2, lik.out_channels(3), 5, 5)
    d = lik(params)
    assert d.batch_shape == (2,) and d.event_shape == (3, 5, 5)
    draws = d.sample((4,))
    assert draws.shape == (4, 2, 3, 5, 5)
    assert torch.equal(torch.round(draws * 255) / 255, draws)
    assert torch.isfinite(d.log_prob(draws)).all()
    assert d.mean.shape == (2, 3, 5, 5) and ((d.mean >= 0) & (d.mean <= 1)).all()


def test_single_component_sample_mean_matches_its_mean():
    """Away from the edges the discretised logistic's mean is its location."""
    lik = DiscretizedLogistic()
    params = torch.zeros(1, 2, 1, 1)
    params[:, 0] = 0.1 - 0.5 + 0.5  # location 0.6
    params[:, 1] = -3.0
    d = lik(params)
    torch.manual_seed(0)
    draws = d.sample((20000,))
    assert draws.mean().item() == pytest.approx(d.mean.item(), abs=2e-3)


def test_mixture_mean_of_coupled_channels():
    """One component: the mean of G is mu_g + a * E[R]."""
    lik = DiscretizedLogisticMixture(components=1)
    params = torch.zeros(1, lik.out_channels(3), 1, 1)
    params[0, 1:4, 0, 0] = torch.tensor([0.1, -0.2, 0.0])  # means (+ 0.5)
    params[0, 4:7, 0, 0] = -4.0
    params[0, 7:10, 0, 0] = torch.atanh(torch.tensor([0.5, 0.0, 0.0]))
    mean = lik(params).mean.view(-1)
    assert mean[0].item() == pytest.approx(0.6)
    assert mean[1].item() == pytest.approx(0.3 + 0.5 * 0.6)


def test_mixture_takes_any_channel_count_and_refuses_bad_components():
    from vaelab.errors import ConfigError

    lik = DiscretizedLogisticMixture(components=5)
    assert lik.out_channels(3) == 50 and lik.out_channels(1) == 15
    for channels in (1, 2, 3, 4):
        params = torch.randn(2, lik.out_channels(channels), 3, 3)
        assert lik(params).event_shape == (channels, 3, 3)
    with pytest.raises(ConfigError, match="components"):
        DiscretizedLogisticMixture(components=0)
    assert lik.bpd_offset("discrete") == 0.0 and lik.bpd_offset("dequantized") is None
    assert lik.accepts == ("discrete",)


def test_log_ndtr_tail_value_and_gradient():
    from vaelab.likelihoods import log_ndtr

    x = torch.tensor([-5.0, -19.9, -20.1, -60.0, -1e3, -1e5], dtype=torch.float64)
    x.requires_grad_()
    y = log_ndtr(x)
    reference = torch.special.log_ndtr(x.detach())
    assert torch.allclose(y, reference, rtol=1e-9)
    y.sum().backward()
    expected = torch.exp(-0.5 * x.detach() ** 2 - reference) / math.sqrt(2 * math.pi)
    assert torch.allclose(x.grad, expected, rtol=1e-6)

"""Importance-sampled log-likelihood against the exact log p(x) of a linear Gaussian model, and
the evaluation's diagnostics against brute force."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers.models import (
    approximate_posterior_vae,
    exact_log_marginal,
    linear_data,
    replay_draws,
    small_vae,
)
from helpers.runs import CONFIGS, compose_train
from hydra import compose, initialize_config_dir
from torch.distributions import Independent, Normal

from vaelab import evaluate
from vaelab.build import build_model
from vaelab.errors import CheckpointError, ConfigError
from vaelab.evaluation.metrics import (
    COMPILE_AUTO_MIN_CODES,
    CompiledLogWeights,
    SplitResults,
    summarise,
    weights_function,
)
from vaelab.objectives import ELBO, iwae_bound
from vaelab.objectives.bounds import draw_codes


def test_nll_is_converges_to_exact_log_likelihood():
    vae, weight, bias = approximate_posterior_vae()
    x = linear_data(weight, bias)
    log_px = exact_log_marginal(weight, bias, x)
    errors = []
    for k in (1, 10, 100, 1000, 20000):
        torch.manual_seed(0)
        bound = iwae_bound(vae, x, k, max_codes=4096)["log_likelihood"]
        errors.append((log_px - bound).abs().mean().item())
    assert errors == sorted(errors, reverse=True), errors  # error shrinks as k grows
    assert errors[0] > 1.0 and errors[-1] < 0.05 and errors[-1] < errors[2] / 10, errors


def test_bounds_are_ordered_elbo_le_lk_le_lk_prime():
    """ELBO <= L_k <= L_k' <= log p(x) for k < k', in expectation (averaged over repeats)."""
    vae, weight, bias = approximate_posterior_vae()
    x = linear_data(weight, bias)
    torch.manual_seed(0)
    with torch.no_grad():
        elbo = ELBO(n_samples=50000)(vae, x)["elbo"]
    means, errors = [], []
    torch.manual_seed(1)
    for k in (1, 5, 50, 500):
        repeats = torch.stack([iwae_bound(vae, x, k)["log_likelihood"] for _ in range(400)])
        means.append(repeats.mean(0))
        errors.append(repeats.std(0) / math.sqrt(len(repeats)))
    log_px = exact_log_marginal(weight, bias, x)
    # L_1 is the ELBO, up to Monte-Carlo error
    assert ((means[0] - elbo).abs() <= 5 * errors[0] + 0.02).all()
    for low, high, low_err, high_err in zip(means, means[1:], errors, errors[1:], strict=False):
        assert (low <= high + 5 * (low_err + high_err)).all()
    assert (means[-1] - means[0] > 1.0).all()  # and the improvement is real, not noise
    assert (means[-1] <= log_px + 5 * errors[-1]).all()


def test_iwae_bound_elbo_estimate_matches_closed_form_elbo():
    vae, weight, bias = approximate_posterior_vae()
    x = linear_data(weight, bias)
    torch.manual_seed(0)
    from_weights = iwae_bound(vae, x, 20000)["elbo"]
    with torch.no_grad():
        closed_form_kl = ELBO(n_samples=20000)(vae, x)["elbo"]
    assert torch.allclose(from_weights, closed_form_kl, atol=0.1)


def test_chunking_does_not_change_the_estimate():
    """Chunks of any size combine to the same log-mean-exp as one pass over the same draws."""
    vae, weight, bias = approximate_posterior_vae()
    x = linear_data(weight, bias)
    q = vae.posterior(x)
    torch.manual_seed(3)
    z = q.sample((600,))
    log_w = vae.decode(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)
    reference = torch.logsumexp(log_w, 0) - math.log(600)
    replay_draws(vae, z)
    bound = iwae_bound(vae, x, 600, max_codes=7 * len(x))["log_likelihood"]  # chunks of 7
    torch.testing.assert_close(bound, reference)


def test_iwae_bound_rejects_bad_k():
    vae, weight, bias = approximate_posterior_vae()
    with pytest.raises(ConfigError, match="eval.k"):
        iwae_bound(vae, linear_data(weight, bias), 0)


def test_active_units_and_kl_per_dim_by_brute_force():
    results = SplitResults()
    means = torch.zeros(100, 3)
    means[:, 0] = torch.linspace(-1, 1, 100)  # variance ~0.34: active
    means[:, 1] = torch.linspace(-0.05, 0.05, 100)  # variance ~8e-4: inactive
    results.posterior_mean.append(means)
    results.kl_per_dim.append(torch.tensor([[0.5, 2.0, 0.0]]).repeat(100, 1))
    results.log_likelihood.append(torch.full((100,), -80.0))
    results.elbo_is.append(torch.full((100,), -85.0))
    results.squared_error.append(torch.full((100,), 0.01))
    metrics, per_dim = summarise(results, "test", num_dims=784, bpd_offset=0.0)
    assert metrics["test/active_units"] == 1
    assert metrics["test/nll_is"] == pytest.approx(80.0)
    assert metrics["test/bpd"] == pytest.approx(80.0 / (784 * math.log(2)))
    assert per_dim["kl_per_dim_sorted"] == pytest.approx([2.0, 0.5, 0.0])
    assert per_dim["kl_dim_order"] == [1, 0, 2]


def burda_vae():
    """The 784-200-200-50 tanh Bernoulli VAE of the literature presets, untrained."""
    cfg = compose_train(["experiment=mnist_cpu_budget"])
    torch.manual_seed(0)
    return build_model(cfg, (1, 28, 28)).eval()


@pytest.mark.slow
def test_compiled_log_weights_give_the_eager_numbers():
    """eval.compile: the torch.compile'd importance weights give L_5000 and the ELBO of the eager
    computation on the same draws (float rounding only), for the preset's real architecture."""
    vae = burda_vae()
    x = (torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    torch.manual_seed(0)
    eager = iwae_bound(vae, x, 5000, max_codes=2000)
    compiled_fn = CompiledLogWeights(vae, torch.device("cpu"))
    compiled_fn.tile_codes = 1000  # 500 samples per chunk: two groups of two examples
    torch.manual_seed(0)
    compiled = iwae_bound(vae, x, 5000, max_codes=2000, weights_fn=compiled_fn)
    assert not compiled_fn.gaussian_log_weights.failed, "compilation fell back to eager"
    for name in ("log_likelihood", "elbo"):
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-4, rtol=1e-6)


def test_compiled_log_weights_group_the_examples_in_order():
    """The CPU's grouping: consecutive examples, about tile_codes codes a group, every example
    once, each piece what the model gives for those examples alone."""
    vae = small_vae()
    x = (torch.rand(7, 1, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    z = vae.posterior(x).sample((3,))  # (3, 7, D)
    weights = CompiledLogWeights(vae, torch.device("cpu"))
    weights.tile_codes = 6  # two examples (6 codes) a group: 2 + 2 + 2 + 1
    pieces = weights.grouped_log_likelihood(x, z)
    assert [tuple(piece.shape) for piece in pieces] == [(3, 2), (3, 2), (3, 2), (3, 1)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), vae.log_likelihood(x, z))
    weights.tile_codes = 2  # fewer codes than samples: one example a group
    assert len(weights.grouped_log_likelihood(x, z)) == 7
    assert len(CompiledLogWeights(vae, torch.device("meta")).grouped_log_likelihood(x, z)) == 1


def test_codes_of_a_diagonal_gaussian_are_drawn_as_sample_draws_them():
    """draw_codes: a diagonal Gaussian through rsample gives sample's very numbers (the IS pass's
    draws did not change); anything else (here a subclass) is asked for sample."""
    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    q = Independent(Normal(loc, scale), 1)
    torch.manual_seed(5)
    expected = q.sample((7,))
    torch.manual_seed(5)
    assert torch.equal(draw_codes(q, 7), expected)

    class Marked(Independent):
        def sample(self, sample_shape=(1,)):
            return torch.full((*sample_shape, 4, 3), 2.0)

    assert torch.equal(draw_codes(Marked(Normal(loc, scale), 1), 2), torch.full((2, 4, 3), 2.0))


@pytest.mark.slow
def test_compiled_log_weights_with_a_mixture_prior_give_the_eager_numbers():
    """A VampPrior (a mixture, not a diagonal Gaussian): the likelihood is compiled and the
    densities added eagerly; the numbers are the eager computation's on the same draws."""
    cfg = compose_train(["prior=vampprior", "prior.n_components=5"])
    torch.manual_seed(0)
    vae = build_model(cfg, (1, 28, 28)).eval()
    x = (torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    torch.manual_seed(0)
    eager = iwae_bound(vae, x, 300, max_codes=300)
    compiled_fn = CompiledLogWeights(vae, torch.device("cpu"))
    torch.manual_seed(0)
    compiled = iwae_bound(vae, x, 300, max_codes=300, weights_fn=compiled_fn)
    assert not compiled_fn.log_likelihood.failed, "compilation fell back to eager"
    assert compiled_fn.gaussian_log_weights.compiled is None  # the Gaussian graph never ran
    for name in ("log_likelihood", "elbo"):
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-4, rtol=1e-6)


def test_failed_compilation_falls_back_to_eager_with_one_warning(caplog):
    vae = burda_vae()
    x = (torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    weights_fn = CompiledLogWeights(vae, torch.device("cpu"))

    def broken(*args):
        raise RuntimeError("no C++ compiler found\ndetails that nobody needs")

    weights_fn.gaussian_log_weights.compiled = broken
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="vaelab.compiled"):
        fallen_back = iwae_bound(vae, x, 50, max_codes=20, weights_fn=weights_fn)
    torch.manual_seed(0)
    eager = iwae_bound(vae, x, 50, max_codes=20)
    torch.testing.assert_close(fallen_back["log_likelihood"], eager["log_likelihood"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "eval.compile: torch.compile failed (RuntimeError: no C++ compiler found); "
        "evaluating eagerly"
    ]


def test_compile_choice_auto_compiles_only_large_evaluations_on_a_cpu():
    vae, cpu, gpu = burda_vae(), torch.device("cpu"), torch.device("cuda")
    assert weights_function(vae, "auto", COMPILE_AUTO_MIN_CODES - 1, cpu) is None
    compiled = weights_function(vae, "auto", COMPILE_AUTO_MIN_CODES, cpu)
    assert isinstance(compiled, CompiledLogWeights)
    assert weights_function(vae, "auto", 10**9, gpu) is None
    assert isinstance(weights_function(vae, True, 10, cpu), CompiledLogWeights)
    assert weights_function(vae, False, 10**9, cpu) is None
    with pytest.raises(
        ConfigError, match="eval.compile must be one of auto, true, false, got 'yes'"
    ):
        weights_function(vae, "yes", 10, cpu)


@pytest.mark.parametrize("validate", [False, True])
def test_evaluate_follows_validate_args(validate, tmp_path):
    """evaluate.py sets torch.distributions' argument checks from its `validate_args` (off by
    default, as train.py does), before it looks for the checkpoint."""
    overrides = [f"run={tmp_path / 'no_run'}", f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        default = compose("evaluate", overrides=overrides)
        cfg = compose("evaluate", overrides=[*overrides, f"validate_args={validate}"])
    assert default.validate_args is False
    torch.distributions.Distribution.set_default_validate_args(not validate)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        evaluate.run(cfg)
    assert torch.distributions.Distribution._validate_args is validate


def test_max_codes_auto_fills_a_gpu_and_keeps_5000_on_a_cpu():
    """eval.max_codes=auto: the CPU's 5000; on a GPU a fifth of the free memory at the estimated
    bytes per code, clamped; integers pass through (the logic, on a CPU: the free memory given)."""
    from vaelab.evaluation.metrics import (
        CPU_MAX_CODES,
        MAX_CODES_CEILING,
        bytes_per_code,
        resolve_max_codes,
    )

    vae = small_vae(latent_dim=3)
    per_code = bytes_per_code(vae)
    assert per_code == 4 * (16 * 16 + 4 * 3)  # 1x4x4 images, 3 latents
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_max_codes("auto", vae, cpu) == CPU_MAX_CODES
    assert resolve_max_codes(1234, vae, gpu, free_bytes=10**12) == 1234
    free = 2**30  # 1 GiB free: 0.2 * free / per_code codes (200,000 for this tiny model)
    assert resolve_max_codes("auto", vae, gpu, free_bytes=free) == int(0.2 * free / per_code)
    assert resolve_max_codes("auto", vae, gpu, free_bytes=2**20) == CPU_MAX_CODES  # nearly full
    assert resolve_max_codes("auto", vae, gpu, free_bytes=2**50) == MAX_CODES_CEILING


@pytest.mark.parametrize("value", ["lots", 0, True])
def test_bad_max_codes_is_one_line(value):
    from helpers.runs import compose_evaluate

    from vaelab.evaluate import check_eval_config

    cfg = compose_evaluate(["run=somewhere"])
    cfg.eval.max_codes = value
    with pytest.raises(ConfigError, match="eval.max_codes must be auto or an integer >= 1"):
        check_eval_config(cfg)

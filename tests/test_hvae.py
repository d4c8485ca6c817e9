"""The hierarchical VAE (model=hvae): its chains of stochastic layers against a two-layer linear
Gaussian model whose log p(x) and exact posterior are closed forms, every objective and the
DReG estimator on it, the shapes it builds for, and a tiny run + evaluate + resume."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from helpers.models import (
    CHAIN_A,
    CHAIN_OFFSET,
    CHAIN_S1,
    chain_data,
    linear_chain,
)
from helpers.runs import compose_evaluate, compose_train, tiny

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.errors import ConfigError
from vaelab.likelihoods import Bernoulli, DiscretizedLogisticMixture
from vaelab.models import HierarchicalVAE
from vaelab.nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from vaelab.objectives import ELBO, IWAE, iwae_bound
from vaelab.priors import MixtureOfGaussians, StandardNormal, VampPrior


def test_every_bound_is_exact_at_the_true_posterior():
    """q(z1|x) q(z2|z1) = p(z1, z2 | x): log w = log p(x) for every joint draw, so one-sample
    ELBO, IWAE and the IS estimate all equal the closed-form log p(x) (a wrong term anywhere in
    either chain's log-density breaks this)."""
    model, log_marginal = linear_chain()
    x = chain_data()
    exact = log_marginal(x)
    torch.manual_seed(0)
    torch.testing.assert_close(ELBO()(model, x)["elbo"].detach(), exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(IWAE(k=7)(model, x)["iwae"], exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(iwae_bound(model, x, 50, max_codes=64)["log_likelihood"], exact)


def test_bounds_stay_below_log_px_and_tighten_with_k():
    """A posterior off the true one: the ELBO is below log p(x) by its KL gap; L_k increases
    with k towards log p(x) and stays below it (means over repeats, within 4 standard errors)."""
    model, log_marginal = linear_chain(shift=0.3, variance_factor=1.6)
    x = chain_data()
    exact = log_marginal(x)
    torch.manual_seed(1)
    with torch.no_grad():
        elbo = ELBO(n_samples=4000)(model, x)["elbo"]
        assert (elbo < exact - 0.1).all()
        means, errors = [], []
        for k in (1, 10, 100):
            draws = torch.stack([IWAE(k=k)(model, x)["iwae"] for _ in range(300)])
            means.append(draws.mean(0))
            errors.append(draws.std(0) / math.sqrt(len(draws)))
    for low, high, e1, e2 in zip(means, means[1:], errors, errors[1:], strict=False):
        assert (low <= high + 4 * (e1 + e2)).all()
    assert (means[-1] <= exact + 4 * errors[-1]).all()
    assert (exact - means[-1]).mean() < 0.25 * (exact - means[0]).mean()


def test_layer_rates_sum_to_the_rate():
    model, _ = linear_chain(shift=0.3, variance_factor=1.6)
    x = chain_data()
    torch.manual_seed(2)
    with torch.no_grad():
        rates = model.layer_rates(x, n_samples=20000)
        rate = ELBO(n_samples=20000)(model, x)["rate"]
    assert set(rates) == {"z1", "z2"}
    torch.testing.assert_close(rates["z1"] + rates["z2"], rate, rtol=0, atol=0.05)


def test_ancestral_samples_follow_the_chain():
    """p(z1) of the linear chain is N(a, A^2 + s1^2) and p(z2) is N(0, 1)."""
    model, _ = linear_chain()
    torch.manual_seed(3)
    z = model.prior().sample((100_000,))
    z1, z2 = z.split(3, dim=-1)
    torch.testing.assert_close(z1.mean(0), CHAIN_OFFSET, atol=0.02, rtol=0)
    torch.testing.assert_close(z1.var(0), CHAIN_A**2 + CHAIN_S1**2, atol=0.05, rtol=0)
    torch.testing.assert_close(z2.var(0), torch.ones(3).double(), atol=0.03, rtol=0)


def inference_and_generation_gradients(model, objective, x, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    out = objective(model, x)
    out["loss"].backward()

    def flat(modules):
        return torch.cat([p.grad.flatten() for m in modules for p in m.parameters()])

    return out, flat([model.encoder, model.up]), flat([model.decoder, model.down])


@pytest.mark.parametrize(
    "make", [lambda e: IWAE(k=6, estimator=e), lambda e: ELBO(n_samples=3, estimator=e)]
)
def test_dreg_through_the_chain(make):
    """DReG on the chain posterior: the same loss and generative gradient as the standard
    estimator on the same draws; at the true posterior the inference gradient is exactly zero
    (the path derivative of a constant log w), where the standard one is not."""
    model, _ = linear_chain(shift=0.3, variance_factor=1.6)
    x = chain_data()
    standard, inf_s, gen_s = inference_and_generation_gradients(model, make("standard"), x, 4)
    dreg, inf_d, gen_d = inference_and_generation_gradients(model, make("dreg"), x, 4)
    torch.testing.assert_close(dreg["loss"], standard["loss"])
    torch.testing.assert_close(gen_d, gen_s)
    assert not torch.allclose(inf_d, inf_s)
    exact, _ = linear_chain()
    _, inf_exact, _ = inference_and_generation_gradients(exact, make("dreg"), x, 5)
    _, inf_exact_standard, _ = inference_and_generation_gradients(exact, make("standard"), x, 5)
    assert inf_exact.abs().max() < 1e-8 and inf_exact_standard.abs().max() > 1e-3


@pytest.mark.parametrize(
    "shape,encoder,decoder,likelihood",
    [
        ((1, 28, 28), MLPEncoder, MLPDecoder, Bernoulli()),
        ((3, 32, 32), ConvEncoder, ConvDecoder, DiscretizedLogisticMixture(components=3)),
    ],
    ids=["1x28x28-mlp", "3x32x32-conv"],
)
def test_shapes(shape, encoder, decoder, likelihood):
    model = HierarchicalVAE(
        shape, likelihood, MixtureOfGaussians, encoder, decoder, latent_dims=(8, 6, 4)
    )
    x = torch.rand(5, *shape)
    x = x.round() if likelihood.accepts == ("binary",) else (x * 255).round() / 255
    q = model.posterior(x)
    assert q.batch_shape == (5,) and q.event_shape == (18,)
    z = q.rsample((2,))
    assert z.shape == (2, 5, 18) and q.log_prob(z).shape == (2, 5)
    assert model.prior().log_prob(z).shape == (2, 5)
    assert model.log_weights(x, z, q, model.prior()).shape == (2, 5)
    assert model.sample(3).shape == (3, *shape) and model.reconstruct(x).shape == (5, *shape)
    assert model.latent_parts == {"z1": (8,), "z2": (6,), "z3": (4,)}
    assert set(model.layer_rates(x)) == {"z1", "z2", "z3"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(latent_dims=[10]), "at least two"),
        (dict(latent_dims=[10, 0]), "model.latent_dims"),
        (dict(prior=VampPrior), "prior=vampprior"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, match):
    settings = dict(
        image_shape=(1, 4, 4),
        likelihood=Bernoulli(),
        prior=StandardNormal,
        encoder=partial(MLPEncoder, hidden_dims=[8]),
        decoder=partial(MLPDecoder, hidden_dims=[8]),
    )
    with pytest.raises(ConfigError, match=match):
        HierarchicalVAE(**{**settings, **kwargs})


@pytest.mark.slow
def test_hvae_trains_evaluates_and_resumes(data_dir, tmp_path):
    """model=hvae with IWAE (k=3, DReG) for one epoch: per-layer rates are logged; evaluate.py
    reports the IS estimate on the joint and draws its pictures; the run resumes to 2 epochs."""
    overrides = [
        *[o for o in tiny(data_dir) if not o.startswith("model.latent_dim")],
        "model=hvae",
        "model.latent_dims=[6,3]",
        "model.hidden_dims=[16]",
        "model.encoder.hidden_dims=[32]",
        "objective=iwae",
        "objective.k=3",
        "objective.estimator=dreg",
        "trainer.max_epochs=1",
        f"paths.log_dir={tmp_path}",
    ]
    cfg = compose_train(overrides, output_dir=tmp_path / "run")
    metrics = train_module.run(cfg)
    assert math.isfinite(metrics["val/iwae"])
    assert {"val/rate_z1", "val/rate_z2"} <= set(metrics)
    eval_cfg = compose_evaluate(
        [f"run={tmp_path / 'run'}", f"paths.data_dir={data_dir}", "eval.k=20"],
        output_dir=tmp_path / "evaluation",
    )
    evaluate.run(eval_cfg)
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert report["metrics"]["test/nll_is"] <= -report["metrics"]["test/elbo"] + 5
    pictures = {p.name for p in (tmp_path / "evaluation").glob("*.png")}
    assert {"samples.png", "reconstructions.png"} <= pictures
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resume = compose_train(
        [*overrides, "trainer.max_epochs=2", f"ckpt_path={checkpoint}"],
        output_dir=tmp_path / "resumed",
    )
    train_module.run(resume)
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 2 * torch.load(checkpoint)["global_step"]
    assert last["hyper_parameters"]["model"]["_target_"] == "vaelab.models.HierarchicalVAE"


def test_the_chain_distributions_validate_their_values_when_asked():
    """validate_args is switchable on vaelab's Distribution subclasses (on in the tests): a code
    of the wrong size is refused, not broadcast."""
    model = linear_chain()[0]
    q, p = model.posterior(chain_data(2)), model.prior()
    z = q.sample()
    q.log_prob(z), p.log_prob(z)
    for distribution in (q, p):
        with pytest.raises(ValueError):
            distribution.log_prob(z[..., :-1])

"""model=categorical (vaelab.models.CategoricalVAE): on a model small enough to enumerate every
code, the bounds against the exact log p(x); the KL in closed form; the relaxation and its
temperature schedule; and the family end to end."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from helpers.models import binary_batch
from helpers.runs import compose_train, evaluated, resumed, tiny, train_error
from torch import nn

from vaelab import train as train_module
from vaelab.likelihoods import Bernoulli
from vaelab.models import CategoricalVAE
from vaelab.nets import MLPDecoder, MLPEncoder
from vaelab.objectives import ELBO, iwae_bound

N, K = 2, 3  # 9 codes


def tiny_model(seed: int = 0) -> CategoricalVAE:
    torch.manual_seed(seed)
    model = CategoricalVAE(
        image_shape=(1, 4, 4),
        likelihood=Bernoulli(),
        encoder=partial(MLPEncoder, hidden_dims=(8,), activation=nn.Tanh),
        decoder=partial(MLPDecoder, hidden_dims=(8,), activation=nn.Tanh),
        n_variables=N,
        n_classes=K,
    ).double()
    # a decoder whose codes differ (a real gap between the ELBO and log p(x)), and a posterior
    # broad enough to be a good proposal (the k-sample check converges at k = 2000)
    for p in model.decoder.parameters():
        nn.init.normal_(p, std=1.0)
    for p in model.encoder.parameters():
        nn.init.normal_(p, std=0.3)
    return model.eval()


def every_code() -> torch.Tensor:
    """All K^N one-hot codes, (K^N, N, K)."""
    rows = [
        torch.eye(K, dtype=torch.float64)[list(c)] for c in itertools.product(range(K), repeat=N)
    ]
    return torch.stack(rows)


def enumerated(model: CategoricalVAE, x: torch.Tensor):
    """Exact log p(x), the exact (discrete) ELBO and KL(q || p(z)), each (B,)."""
    codes = every_code()[:, None]  # (C, 1, N, K)
    log_joint = model.log_likelihood(x, codes.expand(-1, len(x), -1, -1)) - N * math.log(K)
    log_px = torch.logsumexp(log_joint, 0)
    q = model.posterior(x)
    log_q = q.log_prob(codes)  # (C, B)
    weights = log_q.exp()
    elbo = (weights * (log_joint - log_q)).sum(0)
    kl = (weights * (log_q + N * math.log(K))).sum(0)
    return log_px, elbo, kl


def test_rate_is_the_discrete_kl_to_the_uniform_prior():
    model, x = tiny_model(), binary_batch().double()
    _, _, kl = enumerated(model, x)
    q = model.posterior(x)
    torch.testing.assert_close(model.rate(q, model.prior(), q.sample()), kl)
    assert (kl >= 0).all() and (kl <= N * math.log(K) + 1e-12).all()


def test_the_bounds_against_exact_enumeration():
    """ELBO = log p(x) - KL(q || p(z|x)) < log p(x); the importance weights of one-hot draws
    estimate p(x) without bias, so L_k rises with k towards log p(x) from below; the
    objective's validation ELBO and L_1 estimate the exact ELBO."""
    model, x = tiny_model(), binary_batch().double()
    log_px, elbo, _ = enumerated(model, x)
    assert (elbo < log_px - 0.05).all()  # a real gap: the checks below mean something
    torch.manual_seed(0)
    draws = torch.stack([iwae_bound(model, x, 1)["log_likelihood"] for _ in range(4000)])
    # E[w] = p(x): the mean weight against the enumerated p(x), within 4 standard errors
    weights = (draws - log_px).exp()  # w / p(x)
    assert ((weights.mean(0) - 1).abs() < 4 * weights.std(0) / math.sqrt(len(weights))).all()
    # E[log w] = ELBO, from iwae_bound and from the objective
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - elbo).abs() < 4 * standard_error).all()
    parts = torch.stack([ELBO()(model, x)["elbo"] for _ in range(4000)])
    assert ((parts.mean(0) - elbo).abs() < 4 * standard_error).all()
    # E[L_k] increases with k and stays below log p(x)
    means = [
        torch.stack([iwae_bound(model, x, k)["log_likelihood"] for _ in range(200)]).mean(0)
        for k in (10, 200)
    ]
    assert (elbo < means[0]).all() and (means[0] < means[1]).all()
    assert (means[1] < log_px + 0.01).all() and (means[1] > log_px - 0.05).all()


def test_training_draws_are_relaxed_and_evaluation_draws_are_one_hot():
    model, x = tiny_model(), binary_batch().double()
    model.train()
    y = model.posterior(x).rsample((5,))
    assert y.shape == (5, len(x), N, K)
    torch.testing.assert_close(y.sum(-1), torch.ones(5, len(x), N, dtype=torch.float64))
    assert ((y > 0) & (y < 1)).all()  # on the simplex's interior: a relaxation
    (y * torch.arange(K)).sum().backward()  # reparameterised: gradients reach the encoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    model.eval()
    z = model.posterior(x).rsample((5,))
    assert set(z.unique().tolist()) == {0.0, 1.0} and (z.sum(-1) == 1).all()


def test_the_temperature_anneals_to_its_floor():
    model = CategoricalVAE(
        image_shape=(1, 4, 4),
        likelihood=Bernoulli(),
        encoder=partial(MLPEncoder, hidden_dims=(8,)),
        decoder=partial(MLPDecoder, hidden_dims=(8,)),
        n_variables=N,
        n_classes=K,
        temperature=2.0,
        temperature_min=0.5,
        anneal_rate=1e-3,
    )
    for step, expected in [(0, 2.0), (500, 2 * math.exp(-0.5)), (5000, 0.5)]:
        model.set_step(step)
        assert model.temperature.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_categorical_trains_evaluates_and_resumes(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny(data_dir) if "latent_dim" not in o]
    metrics = train_module.run(
        compose_train([*overrides, "model=categorical", "model.n_variables=4"], output_dir=run_dir)
    )
    assert metrics["val/rate"] <= 4 * math.log(10) + 1e-4
    assert 0.5 <= metrics["train/temperature"] < 1.0
    report = evaluated(run_dir, data_dir, tmp_path / "evaluation")["metrics"]
    assert math.isfinite(report["test/nll_is"])
    assert report["test/nll_is"] <= -report["test/elbo"] + 1.0
    before = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    after = resumed(run_dir, data_dir)
    assert after["epoch"] == 2
    temperature = after["state_dict"]["model.temperature"]
    assert temperature < before["state_dict"]["model.temperature"]  # the schedule went on


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["objective=iwae"], "model=categorical trains with objective=elbo"),
        (["prior=vampprior"], "the prior group (VampPrior) does not apply"),
        (["model.n_classes=1"], "model.n_classes must be"),
        (["model.temperature=0.1"], "model.temperature must be"),
    ],
    ids=["iwae", "prior", "classes", "temperature"],
)
def test_bad_categorical_settings_are_one_line(overrides, fragment, data_dir, tmp_path):
    base = [o for o in tiny(data_dir) if "latent_dim" not in o]
    message = train_error([*base, "model=categorical", *overrides], tmp_path)
    assert fragment in message, message

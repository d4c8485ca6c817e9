"""The conditional VAE (model=cvae): its bounds against a conditional linear Gaussian model with a
closed-form log p(x|y), the labels reaching every distribution, class-conditional samples, its
errors, and a tiny run + evaluate + resume."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from helpers.models import N_CLASSES, linear_cvae, linear_gaussian_model
from helpers.runs import compose_evaluate, compose_train, tiny, train_error
from PIL import Image

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.errors import ConfigError
from vaelab.evaluation.pictures import image_grids
from vaelab.likelihoods import Bernoulli, DiscretizedLogistic
from vaelab.models import ConditionalVAE
from vaelab.nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from vaelab.objectives import ELBO, IWAE, iwae_bound
from vaelab.priors import StandardNormal, VampPrior


def conditional_data(n: int = 8):
    weight, bias, _ = linear_gaussian_model()
    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    model, _ = linear_cvae()
    with torch.no_grad():
        x = model.given(y).decode(torch.randn(n, 3, generator=g, dtype=torch.float64)).mean
    return x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64), y


def test_bounds_are_exact_at_the_true_conditional_posterior():
    """q(z|x,y) = p(z|x,y): every log-weight, so IWAE and the IS estimate, equal log p(x|y);
    the ELBO with its closed-form KL does in expectation."""
    model, log_marginal = linear_cvae()
    x, y = conditional_data()
    exact = log_marginal(x, y)
    torch.manual_seed(0)
    given = model.given(y)
    elbo = ELBO(n_samples=4000)(given, x)["elbo"].detach()
    torch.testing.assert_close(elbo, exact, rtol=0, atol=0.05)
    torch.testing.assert_close(IWAE(k=5)(given, x)["iwae"], exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(iwae_bound(given, x, 40, max_codes=64)["log_likelihood"], exact)


def test_bounds_stay_below_log_p_x_given_y_and_the_label_matters():
    model, log_marginal = linear_cvae(shift=0.4)
    x, y = conditional_data()
    exact = log_marginal(x, y)
    torch.manual_seed(1)
    with torch.no_grad():
        given = model.given(y)
        elbo = ELBO(n_samples=4000)(given, x)["elbo"]
        draws = torch.stack([IWAE(k=100)(given, x)["iwae"] for _ in range(200)])
        wrong = (y + 1) % N_CLASSES
        elbo_wrong = ELBO(n_samples=4000)(model.given(wrong), x)["elbo"]
    assert (elbo < exact - 0.05).all()
    error = draws.std(0) / math.sqrt(len(draws))
    assert (draws.mean(0) <= exact + 4 * error).all() and (draws.mean(0) > elbo).all()
    assert (elbo_wrong < elbo).all()  # the labels reach the decoder and the posterior
    assert (log_marginal(x, wrong) < exact).all()


@pytest.mark.parametrize("conditional_prior", [False, True])
@pytest.mark.parametrize(
    "shape,encoder,decoder,likelihood",
    [
        ((1, 28, 28), MLPEncoder, MLPDecoder, Bernoulli()),
        ((3, 32, 32), ConvEncoder, ConvDecoder, DiscretizedLogistic()),
    ],
    ids=["1x28x28-mlp", "3x32x32-conv"],
)
def test_shapes_and_class_rows(shape, encoder, decoder, likelihood, conditional_prior):
    model = ConditionalVAE(
        shape,
        likelihood,
        StandardNormal,
        encoder,
        decoder,
        latent_dim=4,
        embedding_dim=None if conditional_prior else 6,
        conditional_prior=conditional_prior,
    )
    x = torch.rand(5, *shape)
    x = x.round() if likelihood.accepts == ("binary",) else (x * 255).round() / 255
    y = torch.tensor([0, 1, 2, 3, 9])
    given = model.given(y)
    q = given.posterior(x)
    assert q.batch_shape == (5,) and q.event_shape == (4,)
    z = q.rsample((2,))
    assert given.log_weights(x, z, q, given.prior()).shape == (2, 5)
    labels = model.sample_labels(64)
    assert labels.tolist() == [c for c in range(10) for _ in range(6)]
    grids = image_grids(model, x, [0, 1, 2, 3], labels=y)
    assert set(grids) == {"reconstructions", "samples"}
    assert grids["samples"].shape[1:] == (10 * (shape[1] + 2) + 2, 6 * (shape[2] + 2) + 2)


def test_the_class_prior_is_learned_per_class():
    model = ConditionalVAE(
        (1, 4, 4),
        Bernoulli(),
        StandardNormal,
        partial(MLPEncoder, hidden_dims=[8]),
        partial(MLPDecoder, hidden_dims=[8]),
        latent_dim=2,
        n_classes=3,
        conditional_prior=True,
    )
    with torch.no_grad():
        model.class_prior.weight[1, :2] = torch.tensor([2.0, -1.0])
    given = model.given(torch.tensor([0, 1]))
    p = given.prior()
    torch.testing.assert_close(p.mean, torch.tensor([[0.0, 0.0], [2.0, -1.0]]))
    q = given.posterior(torch.zeros(2, 1, 4, 4))
    torch.testing.assert_close(
        given.rate(q, p, q.rsample((1,))),
        torch.distributions.kl_divergence(q, p),
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m.given(torch.tensor([0, 12])), "model.n_classes=13"),
        (lambda m: m.posterior(torch.zeros(2, 1, 4, 4)), "use model.given"),
        (lambda m: m.given(None), "labels"),
    ],
)
def test_label_errors_are_one_line(call, match):
    model = ConditionalVAE(
        (1, 4, 4),
        Bernoulli(),
        StandardNormal,
        partial(MLPEncoder, hidden_dims=[8]),
        partial(MLPDecoder, hidden_dims=[8]),
        latent_dim=2,
    )
    with pytest.raises(ConfigError, match=match):
        call(model)


def test_vampprior_is_refused():
    with pytest.raises(ConfigError, match="prior=vampprior"):
        ConditionalVAE(
            (1, 4, 4),
            Bernoulli(),
            VampPrior,
            partial(MLPEncoder, hidden_dims=[8]),
            partial(MLPDecoder, hidden_dims=[8]),
        )


def test_too_few_classes_for_the_data_is_one_line(data_dir, tmp_path):
    overrides = [*tiny(data_dir), "model=cvae", "model.n_classes=3"]
    assert "set model.n_classes=" in train_error(overrides, tmp_path)


@pytest.mark.slow
def test_cvae_trains_evaluates_and_resumes(data_dir, tmp_path):
    overrides = [
        *tiny(data_dir),
        "model=cvae",
        "model.conditional_prior=true",
        "model.encoder.hidden_dims=[32]",
        "model.feature_dim=16",
        "trainer.max_epochs=1",
        f"paths.log_dir={tmp_path}",
    ]
    cfg = compose_train(overrides, output_dir=tmp_path / "run")
    metrics = train_module.run(cfg)
    assert math.isfinite(metrics["val/elbo"])
    eval_cfg = compose_evaluate(
        [f"run={tmp_path / 'run'}", f"paths.data_dir={data_dir}", "eval.k=20"],
        output_dir=tmp_path / "evaluation",
    )
    evaluate.run(eval_cfg)
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert "-log p(x|y)" in report["note"]
    assert report["metrics"]["test/nll_is"] <= -report["metrics"]["test/elbo"] + 5
    width, height = Image.open(tmp_path / "evaluation" / "samples.png").size
    assert (width, height) == (6 * 30 + 2, 10 * 30 + 2)  # 6 samples of each of 10 classes
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resume = compose_train(
        [*overrides, "trainer.max_epochs=2", f"ckpt_path={checkpoint}"],
        output_dir=tmp_path / "resumed",
    )
    train_module.run(resume)
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1
    assert last["hyper_parameters"]["model"]["_target_"] == "vaelab.models.ConditionalVAE"

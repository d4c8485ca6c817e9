"""objective=rae (Ghosh et al. 2020): the loss against its parts written out, the gradient
penalty's estimate against the decoder's full Jacobian, the ex-post Gaussian mixture against
known clusters, and the family end to end (evaluate.py reports no likelihood, samples through
the mixture)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.models import binary_batch, small_vae
from helpers.runs import compose_train, evaluated, resumed, tiny, train_error

from vaelab import train as train_module
from vaelab.evaluation.code_density import fit_mixture
from vaelab.objectives import RAE


@pytest.mark.parametrize("regulariser", ["l2", "gp", "none"])
@pytest.mark.parametrize("reconstruction", ["mse", "likelihood"])
def test_the_loss_is_its_weighted_parts(regulariser, reconstruction):
    torch.manual_seed(0)
    model, x = small_vae(), binary_batch()
    objective = RAE(reconstruction, embedding_weight=0.3, regulariser=regulariser, reg_weight=0.2)
    torch.manual_seed(1)
    parts = objective(model, x)
    z = model.posterior(x).mean
    p = model.decode(z)
    squared_error = (p.mean - x).pow(2).flatten(1).sum(-1)
    distortion = -p.log_prob(x)
    torch.testing.assert_close(parts["squared_error"], squared_error)
    torch.testing.assert_close(parts["code_penalty"], 0.5 * z.pow(2).sum(-1))
    if regulariser == "l2":
        expected = sum(w.pow(2).sum() for w in model.decoder.parameters()).expand(len(x))
        torch.testing.assert_close(parts["decoder_penalty"], expected)
    elif regulariser == "none":
        assert "decoder_penalty" not in parts
    reconstruction_term = squared_error if reconstruction == "mse" else distortion
    penalty = parts.get("decoder_penalty", torch.zeros(()))
    loss = reconstruction_term + 0.3 * parts["code_penalty"] + 0.2 * penalty
    torch.testing.assert_close(parts["loss"], loss.mean())


def test_the_gradient_penalty_estimates_the_jacobians_squared_norm():
    """E_v ||v^T J||^2 = ||J||_F^2, J = d mean(x|z) / dz at each example's code: the penalty
    averaged over 3000 draws of v against the full Jacobian from autograd."""
    torch.manual_seed(0)
    model, x = small_vae().double(), binary_batch(3).double()
    objective = RAE(regulariser="gp", reg_weight=1.0)
    draws = torch.stack([objective(model, x)["decoder_penalty"].detach() for _ in range(3000)])
    z = model.posterior(x).mean.detach()
    exact = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda c: model.decode(c).mean.flatten(), code)
            .pow(2)
            .sum()
            for code in z
        ]
    )
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() < 4 * standard_error).all(), (draws.mean(0), exact)
    # and its gradient reaches the decoder (the penalty trains it)
    parts = objective(model, x)
    parts["decoder_penalty"].sum().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_the_ex_post_mixture_finds_known_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    codes = torch.cat(
        [c + 0.5 * torch.randn(400, 2, generator=g, dtype=torch.float64) for c in centres]
    )
    mixture = fit_mixture(codes, n_components=3)
    found = mixture.component_distribution.loc
    distances = torch.cdist(centres, found).min(1).values
    assert (distances < 0.15).all(), found
    torch.testing.assert_close(
        mixture.mixture_distribution.probs,
        torch.full((3,), 1 / 3, dtype=torch.float64),
        atol=0.02,
        rtol=0,
    )
    # it fits the codes better than a single Gaussian does
    single = fit_mixture(codes, n_components=1)
    assert mixture.log_prob(codes).mean() > single.log_prob(codes).mean() + 1.0


@pytest.mark.slow
def test_rae_trains_evaluates_without_a_likelihood_and_resumes(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train_module.run(
        compose_train(
            [*tiny(data_dir), "objective=rae", "objective.regulariser=gp"], output_dir=run_dir
        )
    )
    assert "val/elbo" not in metrics and math.isfinite(metrics["val/loss"])
    assert "val/decoder_penalty" not in metrics  # measured while training only
    assert metrics["train/decoder_penalty"] > 0
    report = evaluated(run_dir, data_dir, tmp_path / "evaluation", k=10)
    assert report["nll_is"].startswith("undefined: RAE(")
    assert "test/nll_is" not in report["metrics"] and report["metrics"]["test/mse"] > 0
    assert "Gaussian mixture fitted on 256 training codes" in report["samples"]
    assert (tmp_path / "evaluation" / "samples.png").is_file()
    last = resumed(run_dir, data_dir)
    assert last["epoch"] == 2 and last["hyper_parameters"]["objective"]["regulariser"] == "gp"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["objective.regulariser=spectral"], "objective.regulariser must be one of l2, gp, none"),
        (["objective.reg_weight=-1"], "objective.reg_weight must be"),
        (["objective.reconstruction=l1"], "objective.reconstruction must be one of"),
    ],
    ids=["regulariser", "weight", "reconstruction"],
)
def test_bad_rae_settings_are_one_line(overrides, fragment, data_dir, tmp_path):
    message = train_error([*tiny(data_dir), "objective=rae", *overrides], tmp_path)
    assert fragment in message, message


def test_the_summary_names_each_autoencoder_metrics_unit():
    """(an autoencoder trained on the squared error still reports its distortion, -log p(x|z),
    in nats; it was labelled a squared error)"""
    from vaelab.summary import metric_unit

    assert metric_unit("val/distortion", squared_error=True) == "nats per example"
    assert metric_unit("val/loss", squared_error=True) == "squared error per example"
    assert metric_unit("val/squared_error") == "squared error per example"
    assert metric_unit("val/loss") == "nats per example"

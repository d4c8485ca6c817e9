"""MMD objectives (objective=wae, objective=infovae): the unbiased estimator against its
definition and in expectation against a closed form, the kernels' bandwidths, each objective's
loss from its parts, one-line refusals, and both trained, evaluated and resumed end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.models import binary_batch, small_vae
from helpers.runs import compose_evaluate, compose_train, tiny, train_error

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.objectives import ELBO, WAE, InfoVAE, mmd_unbiased


def kernel(kind: str, a: torch.Tensor, b: torch.Tensor, widths) -> float:
    d = float(((a - b) ** 2).sum())
    return sum(c / (c + d) if kind == "imq" else math.exp(-d / c) for c in widths)


@pytest.mark.parametrize("kind", ["imq", "rbf"])
def test_the_estimate_is_the_u_statistic_written_out(kind):
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g)
    y = y.double() + 0.5
    widths = [0.5, 2.0]
    n, m = len(z), len(y)
    within_z = sum(kernel(kind, z[i], z[j], widths) for i in range(n) for j in range(n) if i != j)
    within_y = sum(kernel(kind, y[i], y[j], widths) for i in range(m) for j in range(m) if i != j)
    cross = sum(kernel(kind, z[i], y[j], widths) for i in range(n) for j in range(m))
    expected = within_z / (n * (n - 1)) + within_y / (m * (m - 1)) - 2 * cross / (n * m)
    assert mmd_unbiased(z, y, kind, widths).item() == pytest.approx(expected, rel=1e-12)


def rbf_mmd_between_gaussians(mu: float, s1: float, s2: float, c: float) -> float:
    """MMD^2 of N(0, s1^2) and N(mu, s2^2) in 1-D under k = exp(-(x - y)^2 / c):
    E k(X, Y) = (1 + 2 v / c)^(-1/2) exp(-m^2 / (c + 2 v)), X - Y ~ N(m, v)."""

    def expected_kernel(m: float, v: float) -> float:
        return (1 + 2 * v / c) ** -0.5 * math.exp(-(m**2) / (c + 2 * v))

    return (
        expected_kernel(0, 2 * s1**2)
        + expected_kernel(0, 2 * s2**2)
        - 2 * expected_kernel(mu, s1**2 + s2**2)
    )


def test_the_estimate_is_unbiased_against_the_closed_form():
    """Averaged over 4,000 batches of 8: the closed form for two Gaussians within 3 standard
    errors, and 0 for equal distributions, where the V-statistic (the diagonal kept) is biased
    upwards by many standard errors."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4000, 8, 1, generator=g, dtype=torch.float64)
    y = 0.7 + 1.5 * torch.randn(4000, 8, 1, generator=g, dtype=torch.float64)
    same = torch.randn(4000, 8, 1, generator=g, dtype=torch.float64)
    c = 2.0
    estimates = torch.stack([mmd_unbiased(a, b, "rbf", [c]) for a, b in zip(z, y, strict=True)])
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - rbf_mmd_between_gaussians(0.7, 1.0, 1.5, c)) < 3 * se
    nulls = torch.stack([mmd_unbiased(a, b, "rbf", [c]) for a, b in zip(z, same, strict=True)])
    null_se = nulls.std() / math.sqrt(len(nulls))
    assert abs(nulls.mean()) < 3 * null_se
    biased = torch.stack([v_statistic(a, b, c) for a, b in zip(z, same, strict=True)])
    assert biased.mean() > 10 * null_se


def v_statistic(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """The biased estimate (every mean over all pairs, the diagonals included)."""

    def k(u, v):
        return torch.exp(-torch.cdist(u, v).pow(2) / c)

    return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()


def test_the_bandwidths_follow_the_papers():
    """WAE: C = 2 D sigma^2 for each scale (N(0, I): sigma^2 = 1); InfoVAE: C = D^2."""
    vae = small_vae(latent_dim=3)
    prior = vae.prior()
    draws = prior.sample((50,))
    wae = WAE()
    assert wae.widths(prior, draws) == pytest.approx([6.0 * s for s in wae.scales])
    assert InfoVAE().widths(prior, draws) == [9.0]


def parts_with_seed(objective, vae, x, step=None):
    torch.manual_seed(0)
    return objective(vae, x, x, step)


def test_each_loss_is_its_weighted_parts():
    torch.manual_seed(0)
    vae, x = small_vae(latent_dim=3), binary_batch(8)
    for alpha, lam in ((0.0, 1000.0), (1.0, 1.0), (0.5, 10.0)):
        parts = parts_with_seed(InfoVAE(alpha=alpha, lam=lam), vae, x)
        expected = (
            parts["distortion"].mean()
            + (1 - alpha) * parts["rate"].mean()
            + (alpha + lam - 1) * parts["mmd"]
        )
        torch.testing.assert_close(parts["loss"], expected)
    wae = parts_with_seed(WAE(lam=10.0), vae, x)
    torch.testing.assert_close(wae["loss"], wae["distortion"].mean() + 10.0 * wae["mmd"])
    wae["loss"].backward()  # the kernels at the diagonal's zero distances: finite gradients
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)
    # InfoVAE with lam = 1 - alpha ... alpha = 0, lam = 1: exactly the ELBO on the same draw
    info = parts_with_seed(InfoVAE(alpha=0.0, lam=1.0), vae, x)
    elbo = parts_with_seed(ELBO(), vae, x)
    torch.testing.assert_close(info["loss"], elbo["loss"])
    # the deterministic-encoder WAE trains on the posterior means
    means = parts_with_seed(WAE(codes="mean"), vae, x)
    expected = -vae.log_likelihood(x, vae.posterior(x).mean[None]).mean()
    torch.testing.assert_close(means["distortion"].mean(), expected)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["objective=infovae", "objective.alpha=2"], "objective.alpha must be a number <= 1"),
        (["objective=infovae", "objective.alpha=-5", "objective.lam=2"], "MMD's weight"),
        (["objective=wae", "objective.kernel=laplace"], "objective.kernel must be one of imq, rbf"),
        (["objective=wae", "objective.scales=[1,0]"], "objective.scales must be a list of"),
        (["objective=wae", "objective.codes=mode"], "objective.codes must be one of sample, mean"),
        (["objective=wae", "model=hvae"], "needs one flat latent vector"),
    ],
    ids=["alpha", "weight", "kernel", "scales", "codes", "hvae"],
)
def test_bad_mmd_settings_are_one_line(overrides, fragment, data_dir, tmp_path):
    base = [o for o in tiny(data_dir) if "model=hvae" not in overrides or "latent_dim" not in o]
    message = train_error([*base, *overrides], tmp_path)
    assert fragment in message, message


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["wae", "infovae"])
def test_mmd_objectives_train_evaluate_and_resume(objective, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train_module.run(
        compose_train([*tiny(data_dir), f"objective={objective}"], output_dir=run_dir)
    )
    assert math.isfinite(metrics["val/mmd"]) and metrics["val/elbo"] < 0
    overrides = [f"run={run_dir}", f"paths.data_dir={data_dir}", "eval.k=10"]
    evaluate.run(compose_evaluate(overrides, output_dir=tmp_path / "evaluation"))
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert math.isfinite(report["metrics"]["test/nll_is"])
    assert report["metrics"]["test/nll_is"] <= -report["metrics"]["test/elbo"] + 5
    resume = [f"resume={run_dir}", "trainer.max_epochs=3", f"paths.data_dir={data_dir}"]
    train_module.run(compose_train(resume, output_dir=run_dir))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2
    assert last["hyper_parameters"]["objective"]["_target_"].endswith(
        "WAE" if objective == "wae" else "InfoVAE"
    )

"""Flow posteriors (vaelab.models.flows): the log-determinant against autograd's Jacobian, the
exact inverse, log q integrating to 1, the bound below log p(x) of a linear-Gaussian model (and
above the best diagonal Gaussian's), DReG's stopped posterior, and posterior=iaf / planar end to
end."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.runs import compose_train, evaluated, resumed, tiny, train_error
from torch.distributions import Independent, MultivariateNormal, Normal

from vaelab import train as train_module
from vaelab.models.base import stopped
from vaelab.models.flows import IAF, FlowPosterior, PlanarFlow

FLOWS = {
    "iaf": lambda d, steps=3: IAF(d, steps=steps, hidden_dim=16, context_dim=3),
    "planar": lambda d, steps=3: PlanarFlow(d, steps=steps),
}


def random_flow(name: str, d: int, seed: int = 0, steps: int = 3):
    """A flow in float64 with random (not the zero-start) weights, and a context (1, E)."""
    torch.manual_seed(seed)
    flow = FLOWS[name](d, steps).double()
    for module in flow.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.4)
            torch.nn.init.normal_(module.bias, std=0.2)
    return flow, 0.5 * torch.randn(1, flow.context_dim, dtype=torch.float64)


def base_gaussian(d: int, seed: int = 1) -> Independent:
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(1, d, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(1, d, generator=g, dtype=torch.float64)
    return Independent(Normal(loc, scale), 1)


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("d", [1, 2, 5])
def test_log_det_is_autograds_full_jacobian(name, d):
    flow, context = random_flow(name, d)
    for seed in range(3):
        z0 = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        jacobian = torch.autograd.functional.jacobian(
            lambda z: flow.push(z[None], context)[0][0], z0
        )
        sign, log_abs_det = torch.linalg.slogdet(jacobian)
        assert sign > 0
        log_det = flow.push(z0[None], context)[1][0]
        assert log_det.item() == pytest.approx(log_abs_det.item(), abs=1e-10)


@pytest.mark.parametrize("name", FLOWS)
def test_the_inverse_is_exact_and_log_prob_agrees_with_the_draw(name):
    flow, context = random_flow(name, 4)
    q = flow(base_gaussian(4), context)
    z = q.rsample((50,))  # (50, 1, 4)
    drawn = q.log_prob(z)  # the value kept from the draw
    fresh = q.log_prob(z.clone())  # a tensor the draw did not return: by inversion
    torch.testing.assert_close(fresh, drawn, atol=1e-9, rtol=0)
    z0, _ = flow.pull(z, context)
    torch.testing.assert_close(flow.push(z0, context)[0], z, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_integrates_to_one_in_one_dimension(name):
    flow, context = random_flow(name, 1)
    q = flow(base_gaussian(1), context)
    grid = torch.linspace(-15, 15, 30001, dtype=torch.float64)
    density = q.log_prob(grid[:, None, None]).exp()[:, 0]  # (N,)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("seed", [0, 3])
def test_log_prob_integrates_to_one_in_two_dimensions(name, seed):
    """(seed 3's IAF overflows its inverse at the grid's far corners: density 0 there, not NaN)"""
    flow, context = random_flow(name, 2, seed=seed)
    q = flow(base_gaussian(2), context)
    axis = torch.linspace(-12, 12, 801, dtype=torch.float64)
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([a, b], -1).reshape(-1, 1, 2)
    log_q = q.log_prob(points)
    assert not log_q.isnan().any()
    density = log_q.exp().reshape(len(axis), len(axis))
    total = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis)
    assert total.item() == pytest.approx(1.0, abs=1e-5)


def test_sampling_follows_the_density():
    """Draws land where log_prob says: the fraction in a box against the box's integral."""
    flow, context = random_flow("iaf", 2)
    q = flow(base_gaussian(2), context)
    draws = q.sample((200_000,))[:, 0]  # (N, 2)
    inside = ((draws > -0.5) & (draws < 1.0)).all(-1).double().mean().item()
    axis = torch.linspace(-0.5, 1.0, 401, dtype=torch.float64)
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    density = q.log_prob(torch.stack([a, b], -1).reshape(-1, 1, 2)).exp().reshape(401, 401)
    mass = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis).item()
    standard_error = math.sqrt(mass * (1 - mass) / 200_000)
    assert abs(inside - mass) < 4 * standard_error + 1e-4


def linear_gaussian(seed: int = 0):
    """p(z) = N(0, I_2), p(x|z) = N(W z + c, s^2 I_3) with W making the posterior strongly
    correlated; returns (W, c, s, x, log p(x), the true posterior)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.tensor([[2.0, 1.8], [1.0, 1.1], [0.5, 0.4]], dtype=torch.float64)
    bias = 0.1 * torch.randn(3, generator=g, dtype=torch.float64)
    s = 0.5
    x = torch.tensor([1.5, -0.7, 0.9], dtype=torch.float64)
    marginal = MultivariateNormal(
        bias, weight @ weight.T + s**2 * torch.eye(3, dtype=torch.float64)
    )
    precision = torch.eye(2, dtype=torch.float64) + weight.T @ weight / s**2
    covariance = torch.linalg.inv(precision)
    mean = covariance @ weight.T @ (x - bias) / s**2
    return weight, bias, s, x, marginal.log_prob(x).item(), (mean, precision)


def log_joint(z, weight, bias, s, x):
    likelihood = Independent(Normal(z @ weight.T + bias, s), 1).log_prob(x)
    return likelihood + Independent(Normal(torch.zeros_like(z), 1.0), 1).log_prob(z)


@pytest.mark.parametrize("name", FLOWS)
def test_a_fitted_flow_bound_is_below_log_px_and_above_the_best_diagonal_gaussian(name):
    """With a correlated true posterior, the best diagonal Gaussian's ELBO is log p(x) minus
    1/2 (sum_i log L_ii - log det L) (L the posterior precision); a flow fitted by the ELBO's own
    gradient gets closer, and never above log p(x)."""
    weight, bias, s, x, log_px, (_, precision) = linear_gaussian()
    diagonal_gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)).item()
    assert diagonal_gap > 0.8  # the problem needs the flow
    torch.manual_seed(0)
    flow = FLOWS[name](2, 4).double()
    loc = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    log_scale = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    # (not zero: u = w = 0 is a stationary point of a planar flow's parameters)
    context = 0.1 * torch.randn(1, flow.context_dim, dtype=torch.float64)
    context.requires_grad_(True)
    optimizer = torch.optim.Adam([loc, log_scale, context, *flow.parameters()], lr=0.02)
    for _ in range(1500):
        q = flow(Independent(Normal(loc, log_scale.exp()), 1), context)
        z = q.rsample((64,))
        elbo = (log_joint(z, weight, bias, s, x) - q.log_prob(z)).mean()
        optimizer.zero_grad()
        (-elbo).backward()
        optimizer.step()
    with torch.no_grad():
        q = flow(Independent(Normal(loc, log_scale.exp()), 1), context)
        z = q.sample((200_000,))
        log_w = log_joint(z, weight, bias, s, x)[:, 0] - q.log_prob(z)[:, 0]
    elbo, standard_error = log_w.mean().item(), log_w.std().item() / math.sqrt(len(log_w))
    assert elbo <= log_px + 4 * standard_error
    assert elbo > log_px - diagonal_gap + 0.3, (elbo, log_px, diagonal_gap)
    # the importance-weighted estimate with this proposal closes the rest of the gap
    assert torch.logsumexp(log_w, 0).item() - math.log(len(log_w)) == pytest.approx(
        log_px, abs=0.01
    )


@pytest.mark.parametrize("name", FLOWS)
def test_the_stopped_posterior_has_the_value_and_no_parameter_gradient(name):
    flow, context = random_flow(name, 3)
    context.requires_grad_(True)
    loc = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    q = flow(Independent(Normal(loc, torch.ones(1, 3, dtype=torch.float64)), 1), context)
    z = q.rsample((5,))
    stopped_log_q = stopped(q).log_prob(z)
    torch.testing.assert_close(stopped_log_q, q.log_prob(z), atol=1e-9, rtol=0)
    # d/dz log q(z) at fixed parameters against central differences of the density
    point = z.detach()[0, 0].clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(stopped(q).log_prob(point[None]).sum(), point)
    for i in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[i] = 1e-5
        with torch.no_grad():
            up, down = (q.log_prob((point + sign * step)[None]) for sign in (1, -1))
        assert gradient[i].item() == pytest.approx(((up - down) / 2e-5).item(), abs=1e-5)
    # the path through z reaches the parameters; log q_stop itself does not
    assert stopped(q).log_prob(z).requires_grad
    assert not stopped(q).log_prob(z.detach()).requires_grad
    assert isinstance(stopped(q), FlowPosterior)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["posterior=iaf", "prior=vampprior", "prior.n_components=5"],
        ["posterior=planar", "objective=iwae", "objective.k=3", "objective.estimator=dreg"],
    ],
    ids=["iaf-vampprior-elbo", "planar-iwae-dreg"],
)
def test_flow_posteriors_train_evaluate_and_resume(overrides, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train_module.run(compose_train([*tiny(data_dir), *overrides], output_dir=run_dir))
    assert math.isfinite(metrics["train/loss"])
    report = evaluated(run_dir, data_dir, tmp_path / "evaluation")["metrics"]
    # L_50 >= the ELBO on the same images (both from the same posterior)
    assert math.isfinite(report["test/nll_is"])
    assert report["test/nll_is"] <= -report["test/elbo"] + 1.0
    last = resumed(run_dir, data_dir)
    assert last["epoch"] == 2
    flow = last["hyper_parameters"]["posterior"]["_target_"]
    assert flow == (
        "vaelab.models.flows.IAF" if "iaf" in overrides[0] else "vaelab.models.flows.PlanarFlow"
    )
    # IAF's networks are the model's; planar flows' parameters come from the encoder
    assert any(key.startswith("model.flow.") for key in last["state_dict"]) == (
        flow.endswith("IAF")
    )


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["posterior=iaf", "model=hvae"],
            "the posterior flow IAF needs a model with one Gaussian code",
        ),
        (["posterior=iaf", "posterior.steps=0"], "posterior.steps must be"),
        (["posterior=iaf", "posterior.hidden_dim=-3"], "posterior.hidden_dim must be"),
        (["posterior=planar", "posterior.steps=1.5"], "posterior.steps must be"),
    ],
    ids=["hvae", "steps", "hidden", "planar-steps"],
)
def test_bad_flow_settings_are_one_line(overrides, fragment, data_dir, tmp_path):
    base = [o for o in tiny(data_dir) if "model=hvae" not in overrides or "latent_dim" not in o]
    message = train_error([*base, *overrides], tmp_path)
    assert fragment in message, message

"""A new model family and a new objective from a package outside vaelab (written into tmp_path, one
class + one YAML each, found through Hydra's search path) train, evaluate and resume with no edit
of vaelab: the model protocol and the objective protocol are the whole seam (docs/extending.md).
In-process: the CLI's part (the search path, the one-line errors) is tested in test_extension."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.runs import compose_evaluate, compose_train, tiny

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.errors import ConfigError

pytestmark = pytest.mark.slow

MODEL = '''
"""A VAE whose posterior is a diagonal Laplace: torch has no KL from it to N(0, I), so the rate
is the protocol's Monte-Carlo estimate; everything else is the protocol's default."""
import torch
from torch import nn
from torch.distributions import Independent, Laplace

from vaelab.models import LatentVariableModel


class LaplaceVAE(LatentVariableModel):
    def __init__(self, image_shape, likelihood, prior, latent_dim=4, hidden=64):
        super().__init__()
        c, h, w = image_shape
        self.image_shape = (c, h, w)
        self.latent_parts = {"z": (latent_dim,)}
        self.likelihood = likelihood
        out = likelihood.out_channels(c)
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, out * h * w)
        )
        self.latent_prior = prior(latent_dim=latent_dim, image_shape=self.image_shape)

    def posterior(self, x):
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        return Independent(Laplace(loc, log_scale.clamp(-6, 2).exp()), 1)

    def prior(self):
        return self.latent_prior(self)

    def decode(self, z):
        c, h, w = self.image_shape
        params = self.decoder(z.reshape(-1, z.shape[-1]))
        return self.likelihood(params.view(*z.shape[:-1], -1, h, w))
'''

OBJECTIVE = '''
"""The variational Renyi bound (Li & Turner 2016) with k draws:
L_alpha = 1 / (1 - alpha) log (1/k) sum_i w_i^(1 - alpha), w = p(x, z) / q(z|x); alpha = 0 is the
IWAE bound, alpha -> 1 the ELBO."""
import math

import torch

from vaelab.errors import require
from vaelab.objectives import Objective
from vaelab.objectives.base import bound_parts


class RenyiBound(Objective):
    def __init__(self, alpha=0.5, k=5):
        require(0 <= alpha < 1, f"objective.alpha must be in [0, 1), got {alpha}")
        self.alpha, self.k = alpha, k

    def parts(self, model, x, target, step):
        q, p = model.posterior(x), model.prior()
        z = q.rsample((self.k,))
        log_px = model.log_likelihood(target, z)  # (k, B)
        log_ratio = q.log_prob(z) - p.log_prob(z)
        scaled = (1 - self.alpha) * (log_px - log_ratio)
        bound = (torch.logsumexp(scaled, 0) - math.log(self.k)) / (1 - self.alpha)
        rate = model.rate(q, p, z, log_ratio)
        return bound_parts(-bound.mean(), -log_px.mean(0), rate, renyi=bound.detach())
'''


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    package = root / "myfamilies"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(MODEL)
    (package / "objectives.py").write_text(OBJECTIVE)
    (root / "configs" / "model").mkdir(parents=True)
    (root / "configs" / "objective").mkdir()
    (root / "configs" / "model" / "laplace_vae.yaml").write_text(
        "_target_: myfamilies.models.LaplaceVAE\nlatent_dim: 4\nhidden: 32\n"
    )
    (root / "configs" / "objective" / "renyi.yaml").write_text(
        "_target_: myfamilies.objectives.RenyiBound\nalpha: 0.5\nk: 4\n"
        "monitor: {metric: val/renyi, mode: max}\nreport: [val/renyi, val/elbo]\n"
    )
    return root


def test_an_outside_model_family_and_objective_train_evaluate_and_resume(
    extension, data_dir, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(extension))
    run_dir = tmp_path / "run"
    search = f"hydra.searchpath=[file://{extension / 'configs'}]"
    args = [
        *[o for o in tiny(data_dir) if not o.startswith("model.latent_dim")],
        search,
        "model=laplace_vae",
        "objective=renyi",
        "trainer.max_epochs=1",
        f"paths.log_dir={tmp_path}",
    ]
    cfg = compose_train(args, output_dir=run_dir)
    assert cfg.monitor.metric == "val/renyi"  # the objective's own metric is the monitor
    metrics = train_module.run(cfg)
    assert math.isfinite(metrics["val/renyi"]) and math.isfinite(metrics["val/elbo"])
    assert metrics["val/renyi"] >= metrics["val/elbo"] - 1.0  # alpha < 1: above the ELBO

    overrides = [f"run={run_dir}", f"paths.data_dir={data_dir}", "eval.k=20"]
    # the first outside target the check meets is refused, whichever group it sits in
    refused = r"myfamilies\.(models\.LaplaceVAE|objectives\.RenyiBound)"
    with pytest.raises(ConfigError, match=refused):
        evaluate.run(compose_evaluate(overrides, output_dir=tmp_path / "refused"))
    trusted = [*overrides, "trusted_targets=[myfamilies]"]
    evaluate.run(compose_evaluate(trusted, output_dir=tmp_path / "evaluation"))
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    nll, elbo = report["metrics"]["test/nll_is"], report["metrics"]["test/elbo"]
    assert math.isfinite(nll) and nll <= -elbo + 1.0  # -L_20 below the ELBO's bound, up to noise

    resume = [
        f"resume={run_dir}",
        "trainer.max_epochs=2",
        "trusted_targets=[myfamilies]",
        f"paths.data_dir={data_dir}",
    ]
    train_module.run(compose_train(resume, output_dir=run_dir))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 16
    assert last["hyper_parameters"]["objective"]["_target_"] == "myfamilies.objectives.RenyiBound"

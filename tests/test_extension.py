"""The proof that the seams are real: a prior and a likelihood from a package outside vaelab
(written into tmp_path, put on the path, one class + one YAML each, through Hydra's search path on
the command line) train, evaluate and resume (in-process) with no edit of vaelab; evaluation and
resume refuse them until the user trusts their package by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.runs import compose_evaluate, compose_train, run_script, tiny

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.errors import ConfigError

pytestmark = pytest.mark.slow

PRIOR = '''
"""A heavy-tailed Student-t prior: torch has no KL from a Gaussian posterior to it, so vaelab's
rate is the Monte-Carlo estimate."""
import torch
from torch.distributions import Independent, StudentT

from vaelab.priors import Prior


class StudentTPrior(Prior):
    def __init__(self, latent_dim, image_shape=None, df=4.0):
        super().__init__()
        self.df = float(df)
        self.register_buffer("loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("scale", torch.ones(latent_dim), persistent=False)

    def forward(self, model=None):
        return Independent(StudentT(self.df, self.loc, self.scale), 1)
'''

LIKELIHOOD = '''
"""Per-pixel Laplace with a learned location and log-scale: two outputs per pixel value."""
import torch
from torch.distributions import Independent, Laplace

from vaelab.likelihoods import Likelihood


class LaplacePixels(Likelihood):
    params_per_pixel = 2
    accepts = ("dequantized",)

    def __call__(self, params):
        loc, log_scale = params.chunk(2, dim=-3)
        return Independent(Laplace(loc, log_scale.clamp(-7, 3).exp()), 3)
'''


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extension")
    package = root / "myext"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "priors.py").write_text(PRIOR)
    (package / "likelihoods.py").write_text(LIKELIHOOD)
    configs = root / "configs"
    (configs / "prior").mkdir(parents=True)
    (configs / "likelihood").mkdir()
    (configs / "prior" / "student_t.yaml").write_text(
        "_target_: myext.priors.StudentTPrior\n_partial_: true\ndf: 4.0\n"
    )
    (configs / "likelihood" / "laplace.yaml").write_text(
        "_target_: myext.likelihoods.LaplacePixels\n"
    )
    return root


def test_an_outside_prior_and_likelihood_train_evaluate_and_resume(
    extension, data_dir, tmp_path, monkeypatch
):
    env = {"PYTHONPATH": os.pathsep.join([str(extension), os.environ.get("PYTHONPATH", "")])}
    logs = tmp_path / "logs"
    args = [
        *tiny(data_dir),
        f"hydra.searchpath=[file://{extension / 'configs'}]",
        "data=fashion_mnist",
        "prior=student_t",
        "likelihood=laplace",
        "trainer.max_epochs=1",
        f"paths.log_dir={logs}",
    ]
    result = run_script("train.py", args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (logs / "train" / "runs").iterdir()

    monkeypatch.syspath_prepend(str(extension))
    overrides = [f"run={run_dir}", f"paths.data_dir={data_dir}", "eval.k=20"]
    refused = compose_evaluate(overrides, output_dir=tmp_path / "refused")
    with pytest.raises(ConfigError, match="myext.likelihoods.LaplacePixels"):
        evaluate.run(refused)
    trusted = compose_evaluate([*overrides, "trusted_targets=[myext]"], tmp_path / "evaluation")
    evaluate.run(trusted)
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert "(nll / D + ln 256) / ln 2" in report["pixel_model"]  # the base class's bpd rule
    assert report["metrics"]["test/bpd"] > 0 and "kl_per_dim_sorted" not in report

    resume = [
        f"resume={run_dir}",
        "trainer.max_epochs=2",
        f"paths.data_dir={data_dir}",
    ]
    with pytest.raises(ConfigError, match="trusted_targets"):  # the run dir cannot trust itself
        train_module.run(compose_train(resume, output_dir=run_dir))
    train_module.run(compose_train([*resume, "trusted_targets=[myext]"], output_dir=run_dir))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["hyper_parameters"]["prior"]["_target_"] == (
        "myext.priors.StudentTPrior"
    )


def test_likelihood_source_declares_what_it_needs(extension, monkeypatch):
    """The outside likelihood's out_channels sizes the decoder; its `accepts` is enforced."""
    monkeypatch.syspath_prepend(str(extension))
    from myext.likelihoods import LaplacePixels

    assert LaplacePixels().out_channels(3) == 6
    assert "binary" not in LaplacePixels().accepts

"""Loading never runs code from a run dir or checkpoint: targets are trusted by exact name (the
project's own, plus what the user names in trusted_targets), not by package prefix. Also the one
metric contract and one-line optimizer errors, by composition and in-process runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.runs import compose_evaluate, compose_train, tiny
from hydra.utils import instantiate

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.build import build_module
from vaelab.errors import ConfigError, LightningAPIError, private_api
from vaelab.run.trust import check_saved, is_trusted, project_targets


def test_the_trusted_targets_are_the_classes_of_the_project_configs():
    targets = project_targets()
    assert {"vaelab.models.VAE", "vaelab.priors.VampPrior", "vaelab.data.MNIST"} <= targets
    assert {"torch.nn.Tanh", "lightning.pytorch.Trainer", "vaelab.callbacks.ImageLogger"} <= targets
    assert all(t.startswith(("vaelab.", "torch.", "lightning.")) for t in targets), targets
    # Hydra's own nodes (sweepers, launchers) are never part of a saved run config
    assert not any("optuna" in t or "hydra" in t for t in targets), targets


def test_a_new_yaml_is_trusted_with_no_other_edit(tmp_path):
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "laplace.yaml").write_text("_target_: vaelab.priors.Laplace\n")
    (tmp_path / "hydra").mkdir()
    (tmp_path / "hydra" / "x.yaml").write_text("_target_: hydra_plugins.Launcher\n")
    assert project_targets(tmp_path) == {"vaelab.priors.Laplace"}


@pytest.mark.parametrize(
    "target", ["torch.hub.load", "torch.load", "os.system", "builtins.exec", "vaelab.nets.mlp"]
)
def test_refuses_what_a_package_prefix_would_have_let_through(target):
    with pytest.raises(ConfigError, match="refusing to instantiate"):
        check_saved({"data": {"source": {"_target_": target}}}, "a checkpoint")


@pytest.mark.parametrize("resolver", ["oc.create", "oc.decode", "oc.deprecated"])
def test_refuses_interpolations_that_build_nodes_it_never_saw(resolver):
    """`${oc.create:'{_target_: builtins.print}'}` holds no `_target_` key, but resolving it
    makes one (found in review: the hole predates the exact-name list)."""
    payload = f"${{{resolver}:'{{_target_: builtins.print, _args_: [pwned]}}'}}"
    with pytest.raises(ConfigError, match="refusing the interpolation"):
        check_saved({"prior": {"scale": payload}}, "a checkpoint")
    for harmless_looking in ("${oc.env:HOME}", "${paths.y}", "x${model.latent_dim}"):
        with pytest.raises(ConfigError, match="refusing the interpolation"):  # data, never code
            check_saved({"paths": {"data_dir": harmless_looking}}, "a checkpoint")


def test_user_packages_are_trusted_only_when_named():
    with pytest.raises(ConfigError, match="myext.priors.Laplace"):
        check_saved({"prior": {"_target_": "myext.priors.Laplace"}}, "a checkpoint")
    assert not is_trusted("myext.priors.Laplace")
    assert is_trusted("myext.priors.Laplace", ["myext"])
    assert is_trusted("myext.priors.Laplace", ["myext.priors.Laplace"])
    assert not is_trusted("myext.priors.Laplace", ["myex"])  # a prefix of a name: no package


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_train(
        [*tiny(data_dir), "trainer.max_epochs=1", f"paths.log_dir={run_dir}"], output_dir=run_dir
    )
    train_module.run(cfg)
    return run_dir


@pytest.mark.slow
def test_a_malicious_checkpoint_runs_no_code(tiny_run, data_dir, tmp_path):
    """A checkpoint whose saved config points `data.source` at torch.hub.load with a local
    hubconf.py: the old `torch.` prefix allowed it, and loading it would import (run) that
    file. Evaluation must refuse it before anything is instantiated."""
    marker = tmp_path / "ran"
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\ndef x(): pass\n")
    checkpoint = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["data"]["source"] = {
        "_target_": "torch.hub.load",
        "repo_or_dir": str(hub),
        "model": "x",
        "source": "local",
    }
    path = tmp_path / "malicious.ckpt"
    torch.save(checkpoint, path)
    cfg = compose_evaluate(
        [f"run={path}", f"paths.data_dir={data_dir}", "eval.k=2"], output_dir=tmp_path / "out"
    )
    with pytest.raises(ConfigError, match="refusing to instantiate _target_='torch.hub.load'"):
        evaluate.run(cfg)
    assert not marker.exists()


# --- one metric contract ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective,metric,mode",
    [("elbo", "val/elbo", "max"), ("iwae", "val/iwae", "max"), ("ae", "val/loss", "min")],
)
def test_the_objective_sets_the_one_monitored_metric(objective, metric, mode):
    cfg = compose_train([f"objective={objective}", "scheduler=plateau"])
    checkpoint = cfg.callbacks.model_checkpoint
    assert (cfg.monitor.metric, cfg.monitor.mode) == (metric, mode)
    assert (checkpoint.monitor, checkpoint.mode) == (metric, mode)
    assert cfg.optimized_metric == metric and cfg.scheduler.mode == mode
    assert cfg.callbacks.hparams.metrics[0] == metric
    datamodule = instantiate(cfg.data, data_dir="unused")
    assert build_module(cfg, datamodule).monitor == metric


@pytest.mark.slow
def test_autoencoder_with_plateau_scheduler_trains(data_dir, tmp_path):
    """The plateau scheduler watched val/elbo, which an autoencoder does not log."""
    cfg = compose_train(
        [*tiny(data_dir), "objective=ae", "scheduler=plateau", f"paths.log_dir={tmp_path}"],
        output_dir=tmp_path,
    )
    metrics = train_module.run(cfg)
    assert math.isfinite(metrics["val/loss"])


# --- one-line errors ----------------------------------------------------------------------------


def test_a_vanished_private_api_is_a_clear_error():
    class Trainer:
        pass

    with pytest.raises(LightningAPIError, match="Trainer._signal_connector is gone"):
        private_api(Trainer(), "_signal_connector")


def test_the_private_names_vaelab_relies_on_exist():
    """Where no public route exists, vaelab uses a private name in one place (listed in
    docs/extending.md); a release that drops one fails here, naming it."""
    import lightning as L
    from lightning.pytorch.strategies.launchers import subprocess_script

    private_api(subprocess_script, "_hydra_subprocess_cmd")  # vaelab.ddp
    connector = private_api(L.Trainer(logger=False), "_signal_connector")
    private_api(connector, "_sigterm_notifier_fn")  # vaelab.callbacks.checkpointing
    private_api(torch._inductor, "list_options", "torch")  # vaelab.compiled
    private_api(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", "torch")  # vaelab.hardware

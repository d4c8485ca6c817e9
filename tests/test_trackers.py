"""logger=mlflow, logger=wandb (offline), logger=many and no logger, with the libraries installed
(nothing mocked): what a user then opens, a resumed run continuing its MLflow run, the summaries'
`Next:` commands, and a saved config that names another MLflow store or run dir."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import wandb_file
from helpers.runs import compose_train, resumed, tiny, train_error

from vaelab import train as train_module
from vaelab.errors import CheckpointError
from vaelab.loggers import RUN_DIR_TAG, logger_settings, viewers
from vaelab.run.dirs import refuse_links
from vaelab.sweeps import format_sweep_summary

pytestmark = pytest.mark.slow


def run(data_dir: Path, tmp_path: Path, *overrides: str, name: str = "run"):
    """A tiny training run with its log root in tmp_path; (metrics, run dir, summary text)."""
    run_dir = tmp_path / name
    cfg = compose_train(
        [*tiny(data_dir), f"paths.log_dir={tmp_path / 'logs'}", *overrides], output_dir=run_dir
    )
    metrics = train_module.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    return metrics, run_dir, summary


def mlflow_runs(store: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    return client, runs


def test_mlflow_run_has_params_metrics_images_and_resumes_into_the_same_run(data_dir, tmp_path):
    _, run_dir, summary = run(data_dir, tmp_path, "logger=mlflow")
    store = f"sqlite:///{tmp_path / 'logs' / 'mlflow' / 'mlflow.db'}"
    assert summary["viewers"] == [f"mlflow ui --backend-store-uri {store}"]
    client, runs = mlflow_runs(store)
    assert len(runs) == 1
    (found,) = runs
    assert found.info.run_name == run_dir.name
    assert found.data.tags[RUN_DIR_TAG] == str(run_dir.resolve())
    assert found.data.params["model/latent_dim"] == "4"
    assert found.data.params["objective/_target_"] == "vaelab.objectives.ELBO"
    history = client.get_metric_history(found.info.run_id, "val/elbo")
    assert len(history) == 2 and all(point.value < 0 for point in history)  # two epochs
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["images"]
    images = {a.path for a in client.list_artifacts(found.info.run_id, "images")}
    assert any("reconstructions" in path for path in images), images
    assert any("samples" in path for path in images), images
    assert not (run_dir / "tensorboard").exists()  # only the asked-for logger

    resume = [f"resume={run_dir}", "trainer.max_epochs=3", f"paths.data_dir={data_dir}"]
    train_module.run(
        compose_train([*resume, f"paths.log_dir={tmp_path / 'logs'}"], output_dir=run_dir)
    )
    client, runs = mlflow_runs(store)
    assert [r.info.run_id for r in runs] == [found.info.run_id]  # the same MLflow run
    history = client.get_metric_history(found.info.run_id, "val/elbo")
    assert len(history) == 3


def test_a_saved_config_never_names_the_mlflow_store_or_the_run_dir(data_dir, tmp_path):
    """A poisoned checkpoint whose logger points at another store and another run dir: the
    resume logs to this command's store, tagged with the run dir it resumes."""
    _, run_dir, _ = run(data_dir, tmp_path, "logger=mlflow")
    elsewhere = tmp_path / "elsewhere"
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    mlflow = checkpoint["hyper_parameters"]["logger"]["mlflow"]
    mlflow["tracking_uri"] = f"sqlite:///{elsewhere / 'evil.db'}"
    mlflow["run_dir"] = str(elsewhere / "victim")
    torch.save(checkpoint, last)
    resume = [f"resume={run_dir}", "trainer.max_epochs=3", f"paths.data_dir={data_dir}"]
    train_module.run(
        compose_train([*resume, f"paths.log_dir={tmp_path / 'logs'}"], output_dir=run_dir)
    )
    assert not elsewhere.exists()
    _, runs = mlflow_runs(f"sqlite:///{tmp_path / 'logs' / 'mlflow' / 'mlflow.db'}")
    assert [r.data.tags[RUN_DIR_TAG] for r in runs] == [str(run_dir.resolve())]


def test_wandb_offline_run_writes_history_config_and_images(data_dir, tmp_path):
    import wandb

    _, run_dir, summary = run(data_dir, tmp_path, "logger=wandb")
    wandb.finish()  # what the process's exit does: the run's file is complete
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert summary["viewers"] == [f"wandb sync {run_dir}/wandb/offline-run-*"]
    (records,) = offline.glob("run-*.wandb")
    wandb_file.finished(records)
    elbo = [json.loads(row["val/elbo"]) for row in wandb_file.history(records) if "val/elbo" in row]
    assert len(elbo) == 2 and all(value < 0 for value in elbo)  # one per epoch
    config = wandb_file.config(records)
    assert json.loads(config["model"])["latent_dim"] == 4
    images = list((offline / "files" / "media" / "images").rglob("*.png"))
    assert any("reconstructions" in p.name for p in images), images
    assert any("samples" in p.name for p in images), images
    # a resume logs its epochs into a second offline run of the same name (W&B's offline runs
    # cannot be appended to; `wandb sync` uploads both)
    last = resumed(run_dir, data_dir)
    wandb.finish()
    assert last["epoch"] == 2
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    (later,) = runs[1].glob("run-*.wandb")
    rows = [row for row in wandb_file.history(wandb_file.finished(later)) if "val/elbo" in row]
    assert [json.loads(row["trainer/global_step"]) > 0 for row in rows] == [True]


def test_many_loggers_take_the_same_run(data_dir, tmp_path):
    _, run_dir, summary = run(data_dir, tmp_path, "logger=many")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    store = f"sqlite:///{tmp_path / 'logs' / 'mlflow' / 'mlflow.db'}"
    _, runs = mlflow_runs(store)
    assert len(runs) == 1 and runs[0].data.metrics["val/elbo"] < 0
    assert summary["viewers"] == [
        f"tensorboard --logdir {run_dir}",
        f"mlflow ui --backend-store-uri {store}",
    ]


def test_no_logger_still_trains_and_summarises(data_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vaelab.train"):
        metrics, run_dir, summary = run(data_dir, tmp_path, "~logger")
    assert metrics["val/elbo"] < 0 and summary["viewers"] == []
    text = caplog.text
    assert "tensorboard --logdir" not in text
    assert f"Next: python evaluate.py run={run_dir}" in text


def test_the_sweep_summary_names_each_loggers_viewer(tmp_path):
    group = {
        "tensorboard": {"_target_": "lightning.pytorch.loggers.TensorBoardLogger"},
        "mlflow": {"_target_": "vaelab.loggers.MLflowLogger", "tracking_uri": "sqlite:///m.db"},
        "wandb": {"_target_": "vaelab.loggers.WandbLogger", "offline": True},
    }
    text = format_sweep_summary(tmp_path, logger_settings(group))
    assert f"Next: tensorboard --logdir {tmp_path}\n" in text
    assert "      mlflow ui --backend-store-uri sqlite:///m.db\n" in text
    assert f"      wandb sync {tmp_path}/*/wandb/offline-run-*\n" in text
    assert text.endswith(f"      python evaluate.py run={tmp_path}")
    assert viewers({}, tmp_path) == []


@pytest.mark.parametrize("target", ["/tmp", "../..", "offline-run-missing", "."])
def test_a_wandb_link_to_anywhere_else_is_refused(target, tmp_path):
    """W&B's own links in `wandb/` (`latest-run`, `debug.log`: paths inside its run folders)
    are the only links a run dir may hold; the same names pointing out of the folder, or at
    nothing, are refused as any link is."""
    run_dir = tmp_path / "run"
    (run_dir / "wandb" / "offline-run-1" / "logs").mkdir(parents=True)
    (run_dir / "wandb" / "offline-run-1" / "logs" / "debug.log").write_text("")
    (run_dir / "wandb" / "latest-run").symlink_to("offline-run-1")
    (run_dir / "wandb" / "debug.log").symlink_to("offline-run-1/logs/debug.log")
    refuse_links(run_dir)  # W&B's own
    (run_dir / "wandb" / "debug.log").unlink()
    (run_dir / "wandb" / "debug.log").symlink_to("latest-run/logs/debug.log")  # via a link
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        refuse_links(run_dir)
    (run_dir / "wandb" / "debug.log").unlink()
    (run_dir / "wandb" / "latest-run").unlink()
    (run_dir / "wandb" / "latest-run").symlink_to(target)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        refuse_links(run_dir)
    (run_dir / "wandb" / "latest-run").unlink()
    (run_dir / "latest-run").symlink_to("wandb")  # the name elsewhere in the run dir
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        refuse_links(run_dir)


@pytest.mark.parametrize("logger, module", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_tracker_library_is_one_line(logger, module, data_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    message = train_error([*tiny(data_dir), f"logger={logger}"], tmp_path)
    assert f"logger={logger} needs the {module} package" in message, message

"""End to end: `python train.py` and `python evaluate.py` run for real, as a user runs them, on
tiny fake MNIST IDX files; the run dir is checked for checkpoints, TensorBoard scalars and images,
and an improving val/elbo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script, tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

pytestmark = pytest.mark.slow

SCALARS = [
    "train/loss",
    "train/elbo",
    "train/rate",
    "train/distortion",
    "val/loss",
    "val/elbo",
    "val/rate",
    "val/distortion",
    "val/bpd",
]
IMAGES = ["images/reconstructions", "images/samples"]


def only_run_dir(log_dir: Path, task: str = "train") -> Path:
    (run_dir,) = (log_dir / task / "runs").iterdir()
    return run_dir


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("model", ["mlp", "conv"])
@pytest.mark.parametrize(
    "likelihood", ["bernoulli", "gaussian", "gaussian_fixed", "continuous_bernoulli"]
)
def test_train_writes_run_dir_and_improves(model, likelihood, data_dir, tmp_path):
    binarize = "dynamic" if likelihood == "bernoulli" else "none"
    args = [
        *tiny(data_dir),
        f"paths.log_dir={tmp_path / 'logs'}",
        f"model={model}",
        f"likelihood={likelihood}",
        f"data.binarize={binarize}",
        "trainer.max_epochs=3",
    ]
    result = run_script("train.py", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir = only_run_dir(tmp_path / "logs")
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    checkpoints = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in checkpoints and len(checkpoints) >= 2  # last + best on val/elbo

    accumulator = events(run_dir)
    assert set(SCALARS) <= set(accumulator.Tags()["scalars"])
    assert set(IMAGES) <= set(accumulator.Tags()["images"])
    elbo = [event.value for event in accumulator.Scalars("val/elbo")]
    assert len(elbo) == 3
    assert elbo[-1] > elbo[0], f"val/elbo did not improve: {elbo}"
    # TensorBoard's HParams tab: the config (with the group choices) and the metrics to compare.
    experiment, session = hparams_plugin_data(accumulator)
    metric_names = {info.name.tag for info in experiment.metric_infos}
    assert {"val/elbo", "val/elbo_best", "val/rate", "val/distortion"} <= metric_names
    assert session.hparams["choices/model"].string_value == model
    assert session.hparams["choices/likelihood"].string_value == likelihood
    assert session.hparams["model/latent_dim"].number_value == 4
    assert "val/elbo_best" in accumulator.Tags()["scalars"]


def hparams_plugin_data(accumulator: EventAccumulator):
    content = accumulator.PluginTagToContent("hparams")
    parse = plugin_data_pb2.HParamsPluginData.FromString
    experiment = parse(content["_hparams_/experiment"]).experiment
    session = parse(content["_hparams_/session_start_info"]).session_start_info
    return experiment, session


def test_evaluate_restores_run_and_reports_test_metrics(data_dir, tmp_path):
    log_dir = tmp_path / "logs"
    train = run_script(
        "train.py", [*tiny(data_dir), f"paths.log_dir={log_dir}", "test=true"], cwd=tmp_path
    )
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = only_run_dir(log_dir)

    result = run_script(
        "evaluate.py",
        [f"run={run_dir}", f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/elbo" in result.stdout
    report = json.loads((only_run_dir(log_dir, "evaluate") / "metrics.json").read_text())
    metrics = report["metrics"]
    assert {"test/elbo", "test/rate", "test/distortion", "test/bpd"} <= set(metrics)
    assert metrics["test/elbo"] == pytest.approx(
        -(metrics["test/rate"] + metrics["test/distortion"]), rel=1e-5
    )
    assert report["checkpoint"].endswith(".ckpt") and "last" not in report["checkpoint"]
    # Same checkpoint, same data, same seed: the test loop inside train.py agrees.
    trained = events(run_dir).Scalars("test/elbo")[-1].value
    assert metrics["test/elbo"] == pytest.approx(trained, abs=1e-3)

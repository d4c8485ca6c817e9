"""End to end: `python train.py` and `python evaluate.py` run for real, as a user runs them, on
tiny fake MNIST IDX files; the run dir is checked for checkpoints, TensorBoard scalars and images,
and an improving val/elbo."""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import (
    REPO,
    compose_evaluate,
    compose_train,
    evaluate_error,
    run_script,
    tiny,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from vaelab import commands
from vaelab import train as train_module

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


def count_scalars(run_dir: Path, tag: str) -> int:
    accumulator = events(run_dir)
    return len(accumulator.Scalars(tag)) if tag in accumulator.Tags()["scalars"] else 0


@pytest.mark.parametrize("model", ["mlp", "conv"])
@pytest.mark.parametrize(
    "likelihood", ["bernoulli", "gaussian", "gaussian_fixed", "continuous_bernoulli"]
)
def test_train_writes_run_dir_and_improves(model, likelihood, data_dir, tmp_path):
    """Two pairs through the CLI (the run dir as Hydra writes it), the others in-process."""
    binarize = "dynamic" if likelihood == "bernoulli" else "none"
    args = [
        *tiny(data_dir),
        f"paths.log_dir={tmp_path / 'logs'}",
        f"model={model}",
        f"likelihood={likelihood}",
        f"data.binarize={binarize}",
        "trainer.max_epochs=3",
    ]
    if (model, likelihood) in (("mlp", "bernoulli"), ("conv", "gaussian")):
        result = run_script("train.py", args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = only_run_dir(tmp_path / "logs")
        assert (run_dir / ".hydra" / "config.yaml").is_file()
    else:
        run_dir = tmp_path / "logs" / "train" / "runs" / "in_process"
        train_module.run(compose_train(args, output_dir=run_dir))
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


#: Library messages a user should not have to read past (vaelab.quiet drops them).
NOISE = (
    "💡 Tip",
    "litlogger",
    "LeafSpec",
    "FLOPs",
    "GPU available: False",
    "TPU available",
    "No CUDA runtime is found",
    "Embedding dir exists",
    "`srun` command is available",
    "is not supported by the model summary",
)


def assert_no_noise(output: str) -> None:
    for message in NOISE:
        assert message not in output, f"{message!r} in the output:\n{output[-3000:]}"


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> Path:
    """One tiny training run (latent_dim=4, with the test loop at the end); what it printed is
    in `output.txt` beside its log dir. Warnings are shown, as a user sees them."""
    root = tmp_path_factory.mktemp("trained")
    args = [*tiny(data_dir), f"paths.log_dir={root / 'logs'}", "test=true"]
    result = run_script("train.py", args, cwd=root, env={"PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "output.txt").write_text(result.stdout + result.stderr)
    return only_run_dir(root / "logs")


def test_log_lines_never_land_on_a_progress_bar(data_dir, tmp_path):
    """The per-epoch line and Lightning's own messages are written through the bar (the
    terminal's log handler clears it first), so none shares a line with it."""
    args = [*tiny(data_dir), "callbacks.progress_bar.refresh_rate=1", f"paths.log_dir={tmp_path}"]
    result = subprocess.run(  # stdout and stderr interleaved, as on a terminal
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    segments = re.split(r"[\r\n]", result.stdout)
    bars = [segment for segment in segments if "it/s" in segment]
    assert bars, "no progress bar was drawn"
    for bar in bars:
        for text in ("[vaelab", "Trainer.fit", "Run finished", "epoch 1 (step"):
            assert text not in bar, bar


def test_a_run_that_trained_nothing_says_so(data_dir, tmp_path, caplog):
    cfg = compose_train([*tiny(data_dir), "trainer.max_epochs=0"], output_dir=tmp_path / "run")
    with caplog.at_level("INFO"):
        train_module.run(cfg)
    assert "nothing was trained" in caplog.text and "python evaluate.py" not in caplog.text


@pytest.mark.slow
def test_a_bf16_run_prints_none_of_the_libraries_noise(data_dir, tmp_path):
    """(Lightning warned at every bf16-mixed run that its model summary does not know the
    precision; the presets on a CPU with native bfloat16 all run bf16-mixed)"""
    args = [*tiny(data_dir), "trainer.precision=bf16-mixed", "trainer.max_epochs=1"]
    args.append(f"paths.log_dir={tmp_path}")
    result = run_script("train.py", args, cwd=tmp_path, env={"PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_noise(result.stdout + result.stderr)


def test_the_end_of_a_run_says_what_it_reached(trained_run):
    """The end-of-run summary on the terminal and in train.log: the last and best validation
    values (as TensorBoard has them) with units, the test metrics, the checkpoints, the run dir
    and the commands to look at it; one log line per validation epoch; none of the libraries'
    noise."""
    output = (trained_run.parents[3] / "output.txt").read_text()
    assert_no_noise(output)
    summary = json.loads((trained_run / "summary.json").read_text())
    elbo = [event.value for event in events(trained_run).Scalars("val/elbo")]
    assert summary["epochs"] == 2 and summary["last"]["epoch"] == 1
    assert summary["last"]["metrics"]["val/elbo"] == pytest.approx(elbo[-1], abs=1e-4)
    assert summary["best"]["metrics"]["val/elbo"] == pytest.approx(max(elbo), abs=1e-4)
    best_ckpt = Path(summary["checkpoints"]["best"])
    assert best_ckpt.is_file() and best_ckpt.name == f"epoch_{summary['best']['epoch']:03d}.ckpt"
    assert summary["final"]["test/elbo"] == events(trained_run).Scalars("test/elbo")[0].value
    log = (trained_run / "train.log").read_text()
    for text in (output, log):
        assert "Run finished: 2 epochs" in text
        assert f"val/elbo {elbo[-1]:.4f}" in text  # the epoch line
        row = next(line for line in text.splitlines() if line.strip().startswith("val/elbo "))
        assert f"{elbo[-1]:.4f}" in row and f"{max(elbo):.4f}" in row
        assert "nats per example" in row
        assert "bits/dim" in text and "test/elbo" in text
        assert f"Checkpoint (best): {best_ckpt}" in text
        assert f"Checkpoint (last): {trained_run / 'checkpoints' / 'last.ckpt'}" in text
        assert f"tensorboard --logdir {trained_run}" in text
        assert f"python evaluate.py run={trained_run}" in text
    assert log.count("(step ") == 2  # one line per validation epoch
    assert "trainable parameters" in log and "model.encoder" in log


def evaluate(run: Path, data_dir: Path, log_dir: Path, *extra: str, env=None):
    args = [f"run={run}", f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}", "eval.k=20"]
    return run_script("evaluate.py", [*args, *extra], cwd=log_dir.parent, env=env)


def evaluate_in(run: Path, data_dir: Path, out_dir: Path, *extra: str) -> dict:
    """evaluate.py in-process (where the CLI itself is not what is tested): metrics.json."""
    from vaelab import evaluate as evaluate_module

    args = [f"run={run}", f"paths.data_dir={data_dir}", "eval.k=20", *extra]
    evaluate_module.run(compose_evaluate(args, output_dir=out_dir))
    return (
        json.loads((out_dir / "metrics.json").read_text())
        if (out_dir / "metrics.json").is_file()
        else {}
    )


def test_evaluate_restores_run_and_reports_test_metrics(trained_run, data_dir, tmp_path):
    log_dir = tmp_path / "logs"
    result = evaluate(trained_run, data_dir, log_dir, env={"PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/nll_is" in result.stdout and "k=20" in result.stdout
    assert_no_noise(result.stdout + result.stderr)
    # progress bars: the test pass, then the importance sampling with its running estimate
    assert "Testing DataLoader 0: 100%" in result.stdout
    assert "importance sampling, k=20: 100%" in result.stderr and "nll_is=" in result.stderr
    eval_dir = only_run_dir(log_dir, "evaluate")
    report = json.loads((eval_dir / "metrics.json").read_text())
    metrics = report["metrics"]
    expected = {
        "test/elbo",
        "test/rate",
        "test/distortion",
        "test/nll_is",
        "test/bpd",
        "test/bpd_elbo",
        "test/active_units",
        "test/mse",
        "test/elbo_is",
    }
    assert expected <= set(metrics)
    assert metrics["test/elbo"] == pytest.approx(
        -(metrics["test/rate"] + metrics["test/distortion"]), rel=1e-5
    )
    assert -metrics["test/nll_is"] >= metrics["test/elbo"] - 1.0  # L_k is the tighter bound
    assert report["k"] == 20 and "binary pixels" in report["pixel_model"]
    assert report["seconds"] > 0 and report["device"] == "cpu"
    assert report["examples_evaluated"] == report["examples_importance_sampled"] > 0
    assert len(report["kl_per_dim_sorted"]) == 4
    assert report["kl_per_dim_sorted"] == sorted(report["kl_per_dim_sorted"], reverse=True)
    assert report["checkpoint"].endswith(".ckpt") and "last" not in report["checkpoint"]
    for picture in ("reconstructions", "samples", "traversals", "latent_pca"):
        assert (eval_dir / f"{picture}.png").stat().st_size > 0
    # Same checkpoint, same data, same seed: the test loop inside train.py agrees.
    accumulator = events(trained_run)
    trained = accumulator.Scalars("test/elbo")[0].value
    assert metrics["test/elbo"] == pytest.approx(trained, abs=1e-3)
    # evaluate.py's numbers and pictures land in the run's own TensorBoard.
    assert "test/nll_is" in accumulator.Tags()["scalars"]
    assert {"eval/reconstructions", "eval/samples", "eval/traversals", "eval/latent_pca"} <= set(
        accumulator.Tags()["images"]
    )
    assert (trained_run / "tensorboard" / "projector_config.pbtxt").is_file()


def test_evaluate_on_a_subset_keeps_its_figures_apart(trained_run, data_dir, tmp_path):
    """eval.limit=8: metrics.json says how many examples were evaluated; in the run's
    TensorBoard the subset's figures are test_first8/... and eval_first8/..., not test/... and
    eval/... beside the whole split's at the same step (the test ELBO, from the whole split,
    keeps its name)."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    full_split_estimates = count_scalars(run, "test/nll_is")  # whole-split evaluations so far
    report = evaluate_in(run, data_dir, tmp_path / "evaluation", "eval.limit=8")
    assert report["examples_importance_sampled"] == report["examples_evaluated"] == 8
    assert "test/nll_is" in report["metrics"]
    tags = events(run).Tags()
    assert {"test_first8/nll_is", "test_first8/active_units", "test/elbo"} <= set(tags["scalars"])
    assert {"eval_first8/latent_pca", "eval_first8/traversals"} <= set(tags["images"])
    assert count_scalars(run, "test/nll_is") == full_split_estimates
    nll = events(run).Scalars("test_first8/nll_is")[0].value
    assert nll == pytest.approx(report["metrics"]["test/nll_is"], rel=1e-6)


def test_evaluate_sweep_reports_every_run(data_dir, tmp_path):
    log_dir = tmp_path / "logs"
    args = [
        "-m",
        *tiny(data_dir),
        f"paths.log_dir={log_dir}",
        "trainer.max_epochs=1",
        "model.latent_dim=2,3",
        "objective.beta=0.5,1",
    ]
    sweep = run_script("train.py", args, cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (sweep_dir,) = (log_dir / "train" / "multiruns").iterdir()
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(runs) == 4 and all((sweep_dir / r / "tensorboard").is_dir() for r in runs)
    assert runs[0] == "0_latent_dim=2,beta=0.5"  # named by the swept keys
    # a sweep's run resumes in its own dir, by the command vaelab prints for it (its name has
    # '=' and ',', which Hydra reads as syntax unless quoted)
    resume = shlex.split(commands.override("resume", sweep_dir / runs[0]))
    resumed = run_script(
        "train.py", [*resume, "trainer.max_epochs=2", f"paths.data_dir={data_dir}"], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(sweep_dir / runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == runs
    assert not (log_dir / "train" / "runs").exists()
    # A run that died before its first checkpoint is reported, not dropped.
    broken = sweep_dir / "4_model.latent_dim=8"
    shutil.copytree(sweep_dir / runs[0] / ".hydra", broken / ".hydra")

    eval_dir = tmp_path / "evaluation"
    evaluate_in(sweep_dir, data_dir, eval_dir)
    with open(eval_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows] == [*runs, broken.name]
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == 4
    for row in ok:
        assert {"model.latent_dim", "objective.beta"} <= set(row)
        for column in ("elbo", "nll_is", "rate", "distortion", "active_units"):
            assert math.isfinite(float(row[column]))
    assert "no checkpoint" in rows[-1]["status"]
    assert (eval_dir / "summary.md").read_text().count("\n") == 2 + len(rows)
    for plot in ("rate_distortion", "nll_vs_latent_dim", "nll_vs_beta"):
        assert (eval_dir / f"{plot}.png").stat().st_size > 0
    latent_2 = eval_dir / runs[0]
    assert (latent_2 / "manifold.png").is_file() and (latent_2 / "latent_scatter.png").is_file()


def edited_checkpoint(run_dir: Path, tmp_path: Path, edit) -> Path:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    edit(checkpoint)
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    return path


def test_evaluate_refuses_weights_that_do_not_match_config(trained_run, data_dir, tmp_path):
    def widen(checkpoint):
        checkpoint["hyper_parameters"]["model"]["latent_dim"] = 7

    path = edited_checkpoint(trained_run, tmp_path, widen)
    message = evaluate_error([f"run={path}", f"paths.data_dir={data_dir}"], tmp_path)
    assert "weights do not match the model its config describes" in message


def test_evaluate_refuses_foreign_targets(trained_run, data_dir, tmp_path):
    def inject(checkpoint):
        checkpoint["hyper_parameters"]["prior"]["_target_"] = "os.system"

    path = edited_checkpoint(trained_run, tmp_path, inject)
    message = evaluate_error([f"run={path}", f"paths.data_dir={data_dir}"], tmp_path)
    assert "refusing to instantiate" in message and "os.system" in message


def test_evaluate_compiled_and_eager_give_the_same_numbers(trained_run, data_dir, tmp_path, caplog):
    """eval.compile=true runs the importance weights through torch.compile: same seed, same
    draws, the same metrics up to float rounding."""
    reports = {}
    for choice in ("true", "false"):
        with caplog.at_level("WARNING"):
            metrics = evaluate_in(
                trained_run, data_dir, tmp_path / choice, f"eval.compile={choice}"
            )
        assert "torch.compile failed" not in caplog.text
        reports[choice] = metrics["metrics"]
    for name in ("test/nll_is", "test/elbo_is"):
        assert reports["true"][name] == pytest.approx(reports["false"][name], abs=1e-4)


def test_evaluate_bad_k_and_empty_sweep(trained_run, data_dir, tmp_path):
    """In-process: the one-line printing of the CLI is test_errors'."""
    args = [f"run={trained_run}", f"paths.data_dir={data_dir}"]
    message = evaluate_error([*args, "eval.k=0"], tmp_path)
    assert "eval.k must be an integer >= 1, got 0" in message
    message = evaluate_error([*args, "eval.compile=yes"], tmp_path)
    assert "eval.compile must be one of auto, true, false, got 'yes'" in message
    empty = tmp_path / "sweep"
    empty.mkdir()
    (empty / "multirun.yaml").write_text("{}\n")
    assert "no runs" in evaluate_error([f"run={empty}", f"paths.data_dir={data_dir}"], tmp_path)


def test_ae_vs_vae_experiment_trains_both_and_the_report_compares_them(data_dir, tmp_path):
    log_dir = tmp_path / "logs"
    args = [*tiny(data_dir), f"paths.log_dir={log_dir}", "experiment=ae_vs_vae"]
    result = run_script("train.py", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (log_dir / "train" / "multiruns").iterdir()
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(runs) == 2 and "objective=elbo" in runs[0] and "objective=ae" in runs[1]

    eval_dir = tmp_path / "evaluation"
    evaluate_in(sweep_dir, data_dir, eval_dir)
    with open(eval_dir / "summary.csv") as f:
        vae_row, ae_row = list(csv.DictReader(f))
    assert vae_row["status"] == ae_row["status"] == "ok"
    assert float(vae_row["nll_is"]) > 0 and ae_row["nll_is"] == ""  # undefined for the AE
    assert float(vae_row["mse"]) > 0 and float(ae_row["mse"]) > 0
    summary = (eval_dir / "summary.md").read_text()
    for run in runs:  # both sample grids, side by side in the report
        assert f"![samples]({run}/samples.png)" in summary
        assert (eval_dir / run / "samples.png").is_file()
    ae_report = json.loads((eval_dir / runs[1] / "metrics.json").read_text())
    assert ae_report["nll_is"].startswith("undefined")
    assert "test/nll_is" not in ae_report["metrics"] and "test/mse" in ae_report["metrics"]


def test_denoising_run_reports_noisy_to_clean_error(data_dir, tmp_path):
    args = [*tiny(data_dir), f"paths.log_dir={tmp_path}", "data.noise=mask", "data.noise_prob=0.5"]
    train_module.run(compose_train(args, output_dir=tmp_path / "run"))
    eval_dir = tmp_path / "evaluation"
    report = evaluate_in(tmp_path / "run", data_dir, eval_dir)
    assert report["denoising"] == "mask" and report["metrics"]["test/mse"] > 0
    # noisy inputs, reconstructions, clean targets: three rows of 28-pixel images (+ padding)
    from PIL import Image

    height = Image.open(eval_dir / "reconstructions.png").height
    assert height == 3 * 28 + 4 * 2

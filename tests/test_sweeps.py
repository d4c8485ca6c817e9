"""Sweeps: every run in its own named dir with its own TensorBoard events and HParams, the
experiment presets, the joblib launcher, the Optuna search, the SLURM launcher config, and a
sweep with a failing run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from helpers.runs import compose_train, run_script, tiny
from helpers.tensorboard import post, tensorboard_server
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from vaelab.swept import sweep_run_name, swept_keys

pytestmark = pytest.mark.slow


def sweep_dir(log_dir: Path, task: str = "train") -> Path:
    (path,) = (log_dir / task / "multiruns").iterdir()
    return path


def run_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if (p / ".hydra").is_dir())


def sweep(data_dir: Path, tmp_path: Path, *args: str):
    log_dir = tmp_path / "logs"
    common = [*tiny(data_dir), f"paths.log_dir={log_dir}", "trainer.max_epochs=1"]
    return run_script("train.py", ["-m", *common, *args], cwd=tmp_path), log_dir


def test_sweep_run_names_are_the_swept_keys_unique_and_safe():
    job = ["trainer.max_epochs=1", "model.latent_dim=2", "objective.beta=0.5", "data=mnist"]
    assert swept_keys(["trainer.max_epochs=1", "model.latent_dim=2,8", "data=range(0,2)"]) == [
        "model.latent_dim",
        "data",
    ]
    assert swept_keys([], {"objective.beta": "1,2,4", "seed": "0"}) == ["objective.beta"]
    varying = ["model.latent_dim", "objective.beta"]
    assert sweep_run_name(7, job, varying) == "7_latent_dim=2,beta=0.5"
    # keys whose last parts clash keep their full names; unsafe characters become '-'
    clash = sweep_run_name(
        0, ["model.beta=1", "objective.beta=2"], ["model.beta", "objective.beta"]
    )
    assert clash == "0_model.beta=1,objective.beta=2"
    assert sweep_run_name(1, ["data.root=/a b/c"], ["data.root"]) == "1_root=-a-b-c"
    assert sweep_run_name(2, ["seed=0"], ["seed"]) != sweep_run_name(3, ["seed=0"], ["seed"])
    assert sweep_run_name(4, job, None).startswith("4_max_epochs=1,latent_dim=2")  # no record
    long = sweep_run_name(5, [f"k{i}.value=" + "x" * 30 for i in range(20)], None)
    assert len(long) <= 204 and long.endswith(",...")


@pytest.mark.parametrize(
    "path",
    [
        "logs/train/runs/2026-12-06_10-00-00_a1b2c3",
        "logs/train/multiruns/x/3_latent_dim=8,beta=1",
        "my runs/0_root=-a b,c",
        'odd/it\'s \\ a "run"',
        "trailing\\",
        'a\\"b,c',
    ],
)
def test_printed_commands_read_back_the_same_path(path):
    """What vaelab prints after `run=` / `resume=` goes through the shell and Hydra's override
    grammar to the same path (a sweep's run dir is named with '=' and ',')."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from vaelab import commands

    (word,) = shlex.split(commands.override("run", path))
    (parsed,) = OverridesParser.create().parse_overrides([word])
    assert parsed.key_or_group == "run" and parsed.value() == path
    assert shlex.split(commands.path(path)) == [path]


def test_grid_sweep_lands_in_tensorboard_hparams(data_dir, tmp_path):
    """2x2 grid; TensorBoard's own reader over the sweep dir finds 4 runs, each with its swept
    values as hparams and the metrics to compare."""
    result, log_dir = sweep(data_dir, tmp_path, "model.latent_dim=2,8", "objective.beta=0.5,1")
    assert result.returncode == 0, result.stderr[-3000:]
    path = sweep_dir(log_dir)
    runs = run_dirs(path)
    # named by what the sweep varies, not by every override (tiny()'s ten are not in them)
    assert [r.name for r in runs] == [
        "0_latent_dim=2,beta=0.5",
        "1_latent_dim=2,beta=1",
        "2_latent_dim=8,beta=0.5",
        "3_latent_dim=8,beta=1",
    ]
    assert "trainer.max_epochs=1" in (runs[0] / ".hydra" / "overrides.yaml").read_text()

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(path))
    multiplexer.Reload()
    found = {}
    for run, tags in multiplexer.Runs().items():
        content = multiplexer.PluginRunToTagToContent("hparams").get(run)
        if not content:
            continue
        parse = plugin_data_pb2.HParamsPluginData.FromString
        session = parse(content["_hparams_/session_start_info"]).session_start_info
        experiment = parse(content["_hparams_/experiment"]).experiment
        metrics = {info.name.tag for info in experiment.metric_infos}
        assert {"val/elbo", "val/elbo_best", "val/rate", "val/distortion"} <= metrics
        assert metrics <= set(tags["scalars"])  # each metric has values in that run
        found[run] = (
            session.hparams["model/latent_dim"].number_value,
            session.hparams["objective/beta"].number_value,
        )
    assert sorted(found.values()) == [(2, 0.5), (2, 1), (8, 0.5), (8, 1)]

    # What the HPARAMS tab shows, through TensorBoard's own server: the swept keys first (the
    # frontend asks for a limited number of hyperparameters), the metrics, and every run's row.
    with tensorboard_server(path) as url:
        experiment = post(
            url,
            "/data/plugin/hparams/experiment",
            {"experimentName": "", "hparamsLimit": 3, "includeMetrics": True},
        )
        groups = post(
            url,
            "/data/plugin/hparams/session_groups",
            {
                "experimentName": "",
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
                "colParams": [
                    {"hparam": "model/latent_dim"},
                    {"hparam": "objective/beta"},
                    {"metric": {"tag": "val/elbo"}},
                ],
                "startIndex": 0,
                "sliceSize": 100,
                "includeMetrics": True,
            },
        )
    shown = [info["name"] for info in experiment["hparamInfos"]]
    assert shown[:2] == ["model/latent_dim", "objective/beta"], shown
    assert [info.get("differs", False) for info in experiment["hparamInfos"]] == [True, True, False]
    assert "val/elbo" in {info["name"]["tag"] for info in experiment["metricInfos"]}
    rows = {
        (group["hparams"]["model/latent_dim"], group["hparams"]["objective/beta"]): [
            value["value"] for value in group["metricValues"] if value["name"]["tag"] == "val/elbo"
        ]
        for group in groups["sessionGroups"]
    }
    assert sorted(rows) == [(2, 0.5), (2, 1), (8, 0.5), (8, 1)]
    assert all(len(values) == 1 and values[0] < 0 for values in rows.values())

    # The sweep's end on the terminal: one line per run with its best val/elbo, the best marked.
    summary = result.stdout[result.stdout.index("Sweep finished: 4 runs, 0 without a result") :]
    lines = [line for line in summary.splitlines() if "val/elbo best" in line]
    assert [line.split()[1 if line.startswith(" *") else 0] for line in lines] == [
        r.name for r in runs
    ]
    best = {r.name: json.loads((r / "summary.json").read_text())["best"] for r in runs}
    winner = max(best, key=lambda name: best[name]["metrics"]["val/elbo"])
    (marked,) = [line for line in lines if line.startswith(" *")]
    assert winner in marked and f"{best[winner]['metrics']['val/elbo']:.4f}" in marked
    assert f"python evaluate.py run={path}" in summary


@pytest.mark.parametrize(
    "experiment,expected_runs", [("beta_sweep", 4), ("latent_sweep", 4), ("debug", 1)]
)
def test_experiment_presets_run(experiment, expected_runs, data_dir, tmp_path):
    log_dir = tmp_path / "logs"
    # a command-line value of a swept key would replace the preset's grid
    overrides = [o for o in tiny(data_dir) if not o.startswith("model.latent_dim=")]
    args = [
        *overrides,
        f"paths.log_dir={log_dir}",
        "trainer.max_epochs=1",
        f"experiment={experiment}",
    ]
    result = run_script("train.py", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if expected_runs == 1:
        (run,) = (log_dir / "debug" / "runs").iterdir()
        assert (run / "checkpoints" / "last.ckpt").is_file()
    else:
        runs = run_dirs(sweep_dir(log_dir))
        assert len(runs) == expected_runs
        assert all((r / "checkpoints" / "last.ckpt").is_file() for r in runs)
        assert not any("experiment=" in r.name for r in runs)


def test_joblib_launcher_runs_in_parallel(data_dir, tmp_path):
    result, log_dir = sweep(
        data_dir,
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model.latent_dim=2,3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = run_dirs(sweep_dir(log_dir))
    assert len(runs) == 2
    assert all((r / "checkpoints" / "last.ckpt").is_file() for r in runs)
    assert all(any((r / "tensorboard").glob("events.out.tfevents.*")) for r in runs)


def test_optuna_search_optimises_the_returned_metric(data_dir, tmp_path):
    result, log_dir = sweep(
        data_dir,
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    path = sweep_dir(log_dir)
    assert len(run_dirs(path)) == 2
    results = (path / "optimization_results.yaml").read_text()
    assert "best_params" in results and "best_value" in results


def test_slurm_launcher_config_composes():
    cfg = compose_train(["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4 and launcher.nodes == 2
    assert launcher.signal_delay_s == 120


def test_failing_run_is_reported_and_the_others_finish(data_dir, tmp_path):
    result, log_dir = sweep(data_dir, tmp_path, "model.latent_dim=2,0,3")
    assert result.returncode != 0  # the sweep as a whole failed...
    assert "model.latent_dim must be an integer >= 1, got 0" in result.stderr
    path = sweep_dir(log_dir)
    runs = run_dirs(path)
    assert len(runs) == 3
    finished = [r for r in runs if (r / "checkpoints" / "last.ckpt").is_file()]
    assert [r.name.split("_")[0] for r in finished] == ["0", "2"]  # ...the others completed
    (failure,) = [json.loads(line) for line in (path / "failures.jsonl").read_text().splitlines()]
    assert failure["job"] == 1 and "model.latent_dim=0" in failure["overrides"]
    assert "latent_dim must be an integer >= 1, got 0" in failure["error"]
    assert failure["run_dir"] == runs[1].name
    summary = result.stdout[result.stdout.index("Sweep finished: 3 runs, 1 without a result") :]
    assert f"{runs[1].name}  failed: ConfigError: model.latent_dim must be" in summary

    result = run_script(
        "evaluate.py",
        [f"run={path}", f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}", "eval.k=5"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_dir,) = (log_dir / "evaluate" / "runs").iterdir()
    table = (eval_dir / "summary.md").read_text()
    assert "failed: ConfigError: model.latent_dim must be an integer >= 1, got 0" in table

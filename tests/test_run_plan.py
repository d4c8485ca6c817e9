"""The run plan as plain functions: what a command plus a saved run (data) become, with no
Lightning, no Hydra and no files (vaelab.run.plan); unique run dir names; the optimizer settings
a continued checkpoint gets; callback state confined to a (moved) run dir."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from vaelab.errors import CheckpointError, ConfigError
from vaelab.run.plan import Invocation, SavedRun, evaluation, plan, run_dir_name, source
from vaelab.run.state import apply_optimizer_settings, confine_state
from vaelab.run.trust import Site, check_saved, localise


def command(**extra) -> dict:
    """A command's config as train() hands it to the plan (resolved, plain data)."""
    config = {
        "task_name": "train",
        "seed": 0,
        "resume": None,
        "ckpt_path": None,
        "stage": None,
        "trusted_targets": [],
        "check_finite": True,
        "paths": {"data_dir": "/here/data", "log_dir": "/here/logs", "output_dir": "/here/run"},
        "data": {
            "_target_": "vaelab.data.ImageDataModule",
            "source": {"_target_": "vaelab.data.MNIST"},
            "data_dir": "/here/data",
            "root": None,
            "download": True,
        },
        "model": {"_target_": "vaelab.models.VAE", "latent_dim": 32},
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001},
        "trainer": {"_target_": "lightning.pytorch.Trainer", "max_epochs": 10},
    }
    config.update(extra)
    return config


def saved_config() -> dict:
    """A run config as another machine saved it, places and switches included."""
    return {
        "task_name": "train",
        "seed": 3,
        "check_finite": False,  # the file's word on checks is never taken
        "trusted_targets": ["os"],
        "paths": {"data_dir": "/there/data", "log_dir": "/there", "output_dir": "/there/run"},
        "data": {
            "_target_": "vaelab.data.ImageDataModule",
            "source": {"_target_": "vaelab.data.CIFAR10", "verify": False},
            "data_dir": "/there/data",
            "root": None,
            "download": True,
            "batch_size": 64,
        },
        "model": {"_target_": "vaelab.models.VAE", "latent_dim": 7},
        "likelihood": {"_target_": "vaelab.likelihoods.Bernoulli"},
        "prior": {"_target_": "vaelab.priors.StandardNormal", "_partial_": True},
        "objective": {"_target_": "vaelab.objectives.ELBO", "monitor": {"metric": "val/elbo"}},
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.003},
        "trainer": {
            "_target_": "lightning.pytorch.Trainer",
            "max_epochs": 5,
            "default_root_dir": "/there/run",
            "plugins": [{"_target_": "lightning.pytorch.Trainer"}],
        },
        "callbacks": {
            "model_checkpoint": {
                "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                "dirpath": "/there/run/checkpoints",
                "filename": "epoch_{epoch:03d}",
            }
        },
        "logger": {
            "tensorboard": {
                "_target_": "lightning.pytorch.loggers.TensorBoardLogger",
                "save_dir": "/there/run",
                "name": "tensorboard",
                "version": "",
            }
        },
        "choices": {"model": "mlp", "data": "cifar10"},
    }


def saved(path: str = "/runs/a/checkpoints/last.ckpt", step: int = 40, **config) -> SavedRun:
    return SavedRun(Path(path), check_saved({**saved_config(), **config}, path), step)


def test_a_new_run_is_the_command_in_a_new_dir():
    invocation = Invocation(command(), run_dir=Path("/here/run"))
    assert source(invocation) is None
    the_plan = plan(invocation, None)
    assert the_plan.config == command() and the_plan.fresh and the_plan.ckpt_path is None


def test_resume_takes_what_was_trained_from_the_file_and_every_place_from_here():
    invocation = Invocation(
        command(resume="/runs/a"),
        overrides=("resume=/runs/a", "trainer.max_epochs=10"),
        run_dir=Path("/runs/a"),
    )
    assert source(invocation) == ("resume", Path("/runs/a"))
    the_plan = plan(invocation, saved())
    config = the_plan.config
    assert not the_plan.fresh and the_plan.ckpt_path == Path("/runs/a/checkpoints/last.ckpt")
    # what was trained: the file's
    assert config["model"]["latent_dim"] == 7 and config["optimizer"]["lr"] == 0.003
    assert config["data"]["batch_size"] == 64 and config["seed"] == 3
    assert config["choices"] == {"model": "mlp", "data": "cifar10"}
    # how long: the command line's
    assert config["trainer"]["max_epochs"] == 10
    # places: this run dir and this machine's data root
    assert config["trainer"]["default_root_dir"] == "/runs/a"
    assert config["callbacks"]["model_checkpoint"]["dirpath"] == "/runs/a/checkpoints"
    assert config["logger"]["tensorboard"]["save_dir"] == "/runs/a"
    assert config["data"]["data_dir"] == "/here/data" and config["paths"] == command()["paths"]
    # switches and checks: the command's, or their safe value
    assert config["data"]["source"]["verify"] is True and "plugins" not in config["trainer"]
    assert config["check_finite"] is True and config["trusted_targets"] == []
    assert config["data"]["download"] is True  # the command's data.download


def test_resume_refuses_changes_to_what_was_trained():
    for override in ("model.latent_dim=4", "optimizer.lr=1", "trainer.default_root_dir=/x"):
        invocation = Invocation(command(resume="/runs/a"), overrides=("resume=/runs/a", override))
        with pytest.raises(ConfigError, match=f"cannot change {override}"):
            plan(invocation, saved())
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        plan(Invocation(command(resume="/runs/a")), None)


def test_a_saved_image_folder_is_never_read_from_the_file():
    data = {**saved_config()["data"], "root": "/there/images"}
    invocation = Invocation(command(resume="/runs/a"), run_dir=Path("/runs/a"))
    with pytest.raises(ConfigError, match="data.root=/there/images; a saved run never names"):
        plan(invocation, saved(data=data))
    here = command(resume="/runs/a", data={**command()["data"], "root": "/here/images"})
    config = plan(Invocation(here, run_dir=Path("/runs/a")), saved(data=data)).config
    assert config["data"]["root"] == "/here/images"


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", "a\\b"])
def test_names_of_files_must_stay_names(name):
    config = saved_config()
    config["logger"]["tensorboard"]["name"] = name
    with pytest.raises(ConfigError, match="never another place"):
        localise(check_saved(config, "f"), Site("/runs/a", "/here/data"))


def test_a_slurm_requeue_continues_its_own_dir():
    invocation = Invocation(command(), run_dir=Path("/runs/a"), restart_count=2)
    assert source(invocation) == ("requeue", Path("/runs/a"))
    the_plan = plan(invocation, saved())
    assert the_plan.config == command() and not the_plan.fresh  # the same command, trusted
    assert the_plan.ckpt_path == Path("/runs/a/checkpoints/last.ckpt")
    assert plan(invocation, None).ckpt_path is None  # requeued before its first checkpoint
    # a checkpoint named on the command line wins over the requeue
    assert source(Invocation(command(ckpt_path="/x.ckpt"), restart_count=1)) is None


def test_ckpt_path_starts_a_new_run_from_any_checkpoint():
    the_plan = plan(Invocation(command(ckpt_path="/elsewhere/x.ckpt")), None)
    assert the_plan.ckpt_path == Path("/elsewhere/x.ckpt") and the_plan.fresh
    assert the_plan.config["model"]["latent_dim"] == 32  # the command's config


def test_a_second_stage_takes_its_groups_and_keeps_its_own_keys():
    stage = {
        "run": "/runs/first",
        "groups": ["model", "data"],
        "own": ["model.latent_dim"],
    }
    invocation = Invocation(command(stage=stage), run_dir=Path("/runs/second"))
    assert source(invocation) == ("stage", Path("/runs/first"))
    the_plan = plan(invocation, saved("/runs/first/checkpoints/last.ckpt"))
    config = the_plan.config
    assert the_plan.init_from == Path("/runs/first/checkpoints/last.ckpt") and the_plan.fresh
    assert the_plan.ckpt_path is None
    assert config["data"]["batch_size"] == 64 and config["data"]["data_dir"] == "/here/data"
    assert config["model"]["latent_dim"] == 32  # stage.own: this stage's value
    assert config["optimizer"]["lr"] == 0.001  # not a stage group: the command's
    other = saved(model={"_target_": "vaelab.models.HierarchicalVAE"})
    with pytest.raises(ConfigError, match="trained vaelab.models.HierarchicalVAE"):
        plan(invocation, other)


def test_an_evaluation_builds_the_model_groups_only():
    site = Site("/eval/out", "/here/data", where="a.ckpt")
    config = evaluation(saved(), site, batch_size=9)
    assert set(config) == {"data", "model", "likelihood", "prior", "objective", "optimizer"}
    assert config["data"]["data_dir"] == "/here/data" and config["data"]["eval_batch_size"] == 9
    broken = SavedRun(Path("b.ckpt"), {"model": {}})
    with pytest.raises(CheckpointError, match="not written by vaelab's train.py"):
        evaluation(broken, site)


def test_run_dirs_started_in_the_same_second_differ():
    names = {run_dir_name("2026-12-06_10-00-00", {}, []) for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("2026-12-06_10-00-00_") for n in names)
    slurm = {"SLURM_JOB_ID": "77"}
    name = run_dir_name("t1", slurm, [], token="ab12cd")
    assert name == "t1_job77_ab12cd"
    array = {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    assert run_dir_name("t1", array, [], token="x") == "t1_job77_3_x"
    # a requeued job gets back its own dir (not another job's), under a new time
    requeued = {**slurm, "SLURM_RESTART_COUNT": "1"}
    existing = ["t0_job7_aa", "t1_job77_ab12cd", "t1_job770_zz"]
    assert run_dir_name("t9", requeued, existing) == "t1_job77_ab12cd"
    assert run_dir_name("t9", requeued, []).startswith("t9_job77_")
    assert run_dir_name("t", {"SLURM_JOB_ID": "1/../x"}, [], token="y") == "t_job1-..-x_y"


def optimizer_state(lr: float, initial_lr: float | None = None) -> dict:
    group = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0]}
    if initial_lr is not None:
        group["initial_lr"] = initial_lr
    return {"state": {}, "param_groups": [group, {"lr": 5e-4, "params": [1]}]}


def test_the_configured_optimizer_settings_win_over_a_checkpoint():
    checkpoint = {"optimizer_states": [optimizer_state(0.001)]}
    notes = apply_optimizer_settings(checkpoint, {"_target_": "x", "lr": 0.01, "eps": 1e-8})
    group, other = checkpoint["optimizer_states"][0]["param_groups"]
    assert group["lr"] == 0.01 and notes == ["optimizer.lr=0.01 replaces the checkpoint's 0.001"]
    assert other["lr"] == 5e-4  # an objective's own group keeps its settings
    # a schedule half way down (lr 0.0005 of 0.001) stays half way down the new rate
    checkpoint = {
        "optimizer_states": [optimizer_state(0.0005, initial_lr=0.001)],
        "lr_schedulers": [{"base_lrs": [0.001, 5e-4], "_last_lr": [0.0005, 5e-4]}],
    }
    apply_optimizer_settings(checkpoint, {"lr": 0.01, "betas": [0.5, 0.9]})
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.005) and group["initial_lr"] == 0.01
    assert group["betas"] == (0.5, 0.9)
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [0.01, 5e-4]
    assert checkpoint["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(0.005)
    same = {"optimizer_states": [optimizer_state(0.001)]}
    assert apply_optimizer_settings(same, {"lr": 0.001}) == []


def model_checkpoint_state(folder: Path, names: list[str], scores: list[float]) -> dict:
    paths = [str(folder / name) for name in names]
    best = max(range(len(names)), key=lambda i: scores[i])
    return {
        "hyper_parameters": {"monitor": {"metric": "val/elbo", "mode": "max"}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/elbo'}": {
                "dirpath": str(folder),
                "best_model_path": paths[best],
                "best_model_score": torch.tensor(scores[best]),
                "best_k_models": {p: torch.tensor(s) for p, s in zip(paths, scores, strict=True)},
                "kth_best_model_path": paths[0],
                "kth_value": torch.tensor(scores[0]),
                "last_model_path": "",
            }
        },
    }


def test_a_moved_run_dir_keeps_its_best_checkpoints_under_its_new_place(tmp_path):
    folder = tmp_path / "moved" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("epoch_001.ckpt", "epoch_002.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"x")
    checkpoint = model_checkpoint_state(
        Path("/old/place/checkpoints"), ["epoch_001.ckpt", "epoch_002.ckpt"], [-90.0, -85.0]
    )
    assert confine_state(checkpoint, folder / "last.ckpt", folder) == []
    (state,) = checkpoint["callbacks"].values()
    real = Path(folder).resolve()
    assert state["dirpath"] == str(real)
    assert state["best_model_path"] == str(real / "epoch_002.ckpt")
    assert set(state["best_k_models"]) == {
        str(real / "epoch_001.ckpt"),
        str(real / "epoch_002.ckpt"),
    }


def test_callback_state_never_names_a_file_outside_the_run(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "epoch_001.ckpt").write_bytes(b"x")
    victim = tmp_path / "victim.ckpt"
    victim.write_bytes(b"precious")
    (folder / "link.ckpt").symlink_to(victim)
    checkpoint = model_checkpoint_state(
        folder, ["epoch_001.ckpt", "../../victim.ckpt", "link.ckpt", "gone.ckpt"], [1, 5, 4, 3]
    )
    state = next(iter(checkpoint["callbacks"].values()))
    state["best_k_models"][str(victim)] = torch.tensor(9.0)
    dropped = confine_state(copy.deepcopy(checkpoint), folder / "last.ckpt", folder)
    assert str(victim) in dropped and str(folder / "link.ckpt") in dropped
    confine_state(checkpoint, folder / "last.ckpt", folder)
    state = next(iter(checkpoint["callbacks"].values()))
    only = str(folder.resolve() / "epoch_001.ckpt")
    assert set(state["best_k_models"]) == {only}
    assert state["best_model_path"] == only and state["kth_best_model_path"] == only
    # a checkpoint from another run dir brings no file bookkeeping at all
    foreign = model_checkpoint_state(folder, ["epoch_001.ckpt"], [1.0])
    confine_state(foreign, tmp_path / "elsewhere" / "last.ckpt", folder)
    state = next(iter(foreign["callbacks"].values()))
    assert state["best_k_models"] == {} and state["best_model_path"] == ""
    assert state["best_model_score"] is None

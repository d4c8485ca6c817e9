"""A poisoned run dir or checkpoint, sent by a colleague: evaluating it, resuming it or training a
second stage on it runs no code from it and changes nothing outside the run dir. One test per
class of attack: interpolations, unknown keys, keys that carry places or switch off checks,
names that climb out, callback state naming outside files, links in the run dir, pickled data
files. Each checks that a marker file was not created and that `outside/` (the files an
attacker aims at) did not change. In-process, except the one test of what Hydra itself writes
before vaelab runs (train.log, .hydra/)."""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.runs import assert_one_line_error, compose_evaluate, compose_train, run_script, tiny

from vaelab import evaluate
from vaelab import train as train_module
from vaelab.data import CIFAR10
from vaelab.errors import CheckpointError, ConfigError, DataError, VaelabError
from vaelab.run.dirs import claimed

pytestmark = pytest.mark.slow


def small(data_dir: Path) -> list[str]:
    return [*tiny(data_dir), "model.encoder.hidden_dims=[16]", "trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    """A run dir of one epoch, copied by `sent` for each test."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose_train([*small(data_dir), f"paths.log_dir={run_dir.parent}"], output_dir=run_dir)
    train_module.run(cfg)
    return run_dir


@pytest.fixture
def sent(trained, tmp_path) -> Path:
    """The run dir a colleague sent, and beside it `outside/` with a victim file."""
    run_dir = tmp_path / "sent"
    shutil.copytree(trained, run_dir)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.ckpt").write_bytes(b"precious")
    return run_dir


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def poison(run_dir: Path, edit: Callable[[dict], None], name: str = "last.ckpt") -> None:
    path = run_dir / "checkpoints" / name
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)


def set_config(dotted: str, value) -> Callable[[dict], None]:
    def edit(checkpoint: dict) -> None:
        node = checkpoint["hyper_parameters"]
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return edit


def evaluate_run(run_dir: Path, data_dir: Path, tmp_path: Path, *extra: str) -> dict:
    cfg = compose_evaluate(
        [
            f"run={run_dir}",
            f"paths.data_dir={data_dir}",
            "eval.k=2",
            "eval.checkpoint=last",
            *extra,
        ],
        output_dir=tmp_path / "evaluation",
    )
    return evaluate.run(cfg)


def resume(run_dir: Path, data_dir: Path, *extra: str) -> dict:
    cfg = compose_train(
        [f"resume={run_dir}", f"paths.data_dir={data_dir}", "trainer.max_epochs=2", *extra],
        output_dir=run_dir,
    )
    return train_module.run(cfg)


def code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


@pytest.mark.parametrize(
    "key,payload",
    [
        ("model.latent_dim", "${oc.create:{_target_: builtins.exec, _args_: ['CODE']}}"),
        ("model.latent_dim", "${oc.decode:'{_target_: builtins.exec, _args_: [CODE]}'}"),
        ("data.batch_size", "${oc.env:HOME}"),
        ("callbacks.model_checkpoint.monitor", "${paths.log_dir}"),
        ("data.source", ["${oc.create:{_target_: builtins.exec}}"]),
    ],
)
def test_interpolations_are_data_never_code(sent, data_dir, tmp_path, key, payload):
    """The old check read the literal text and let node-building resolvers or references
    through; resolved later, they built what it never saw."""
    marker = tmp_path / "ran"
    if isinstance(payload, str):
        payload = payload.replace("CODE", code(marker))
    poison(sent, set_config(key, payload))
    before = snapshot(tmp_path / "outside")
    for attempt in (lambda: evaluate_run(sent, data_dir, tmp_path), lambda: resume(sent, data_dir)):
        with pytest.raises(ConfigError, match="refusing the interpolation"):
            attempt()
    assert not marker.exists() and snapshot(tmp_path / "outside") == before


@pytest.mark.parametrize(
    "edit,message",
    [
        (set_config("evil", 1), "unknown key 'evil'"),
        (set_config("model.not_a_parameter", 1), "model.not_a_parameter: not a known key"),
        (set_config("model._args_", [1]), "model._args_: not a known key"),
        (set_config("data._recursive_", False), "data._recursive_: not a known key"),
        (set_config("monitor.exec", "x"), "monitor.exec: not a known key"),
        # passed through TensorBoardLogger's **kwargs to the SummaryWriter: a path suffix
        (set_config("logger.tensorboard.filename_suffix", "/../../x"), "not a known key"),
        # final_evaluation settings once became Hydra override strings
        (set_config("final_evaluation", {"k=1,run": 2}), "final_evaluation.k=1,run"),
        (set_config("trusted_targets", ["builtins"]), "refusing to instantiate"),
        (set_config("model.latent_dim", torch.ones(2)), "holds a Tensor"),
        (lambda c: c.update(hyper_parameters=[1, 2]), "holds no run config"),
    ],
)
def test_unknown_keys_and_values_are_refused(sent, data_dir, tmp_path, edit, message):
    poison(sent, edit)
    if message == "refusing to instantiate":  # the file's trust list is not read
        poison(sent, set_config("data.source", {"_target_": "builtins.exec", "source": "1"}))
    with pytest.raises(VaelabError, match=message.replace("(", r"\(")):
        evaluate_run(sent, data_dir, tmp_path)
    with pytest.raises(VaelabError, match=message.replace("(", r"\(")):
        resume(sent, data_dir)


def test_places_and_switches_are_never_taken_from_a_file(sent, data_dir, tmp_path):
    """Every key that carries a path or a side effect points outside; the resume trains in its
    own dir and writes nothing there, and data verification stays on."""
    outside = tmp_path / "outside"
    for key, value in [
        ("trainer.default_root_dir", str(outside)),
        ("callbacks.model_checkpoint.dirpath", str(outside)),
        ("callbacks.last_checkpoint.dirpath", str(outside)),
        ("logger.tensorboard.save_dir", str(outside)),
        ("data.data_dir", str(outside / "data")),
        ("data.download", True),
        ("paths", {"data_dir": str(outside), "log_dir": str(outside), "output_dir": str(outside)}),
        ("trainer.plugins", [{"_target_": "vaelab.callbacks.MetricsHistory"}]),
        ("check_finite", False),
    ]:
        poison(sent, set_config(key, value))
    before = snapshot(outside)
    resume(sent, data_dir)
    assert snapshot(outside) == before
    last = torch.load(sent / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 16  # two epochs of 8 steps: it trained, in its own dir
    assert last["hyper_parameters"]["check_finite"] is True
    assert last["hyper_parameters"]["trainer"]["default_root_dir"] == str(sent)


@pytest.mark.parametrize(
    "key,name",
    [
        ("logger.tensorboard.name", "../../outside"),
        ("logger.tensorboard.version", "/abs"),
        ("callbacks.model_checkpoint.filename", "../../outside/victim"),
    ],
)
def test_file_names_cannot_climb_out(sent, data_dir, tmp_path, key, name):
    poison(sent, set_config(key, name))
    before = snapshot(tmp_path / "outside")
    with pytest.raises(ConfigError, match="never another place"):
        resume(sent, data_dir)
    assert snapshot(tmp_path / "outside") == before


def test_callback_state_naming_outside_files_is_dropped(sent, data_dir, tmp_path):
    """ModelCheckpoint deletes the worst of its best-k files when a better one comes, with
    fsspec's recursive rm; it checks that the file is under its dirpath without resolving `..`,
    so a state naming `<its own dirpath>/../../outside/victim.ckpt` made a resume delete it."""
    victim = Path(os.path.realpath(sent / "checkpoints")) / ".." / ".." / "outside" / "victim.ckpt"

    def edit(checkpoint: dict) -> None:
        for key, state in checkpoint["callbacks"].items():
            if key.startswith("ModelCheckpoint"):
                state["dirpath"] = os.path.realpath(sent / "checkpoints")
                state["best_k_models"] = {str(victim): torch.tensor(-1e9)}
                state["kth_best_model_path"] = str(victim)
                state["kth_value"] = torch.tensor(-1e9)
                state["best_model_path"] = str(victim)
                state["best_model_score"] = torch.tensor(-1e9)
        # the strongest sender: the saved dirpath is where this resume puts its checkpoints
        checkpoint["hyper_parameters"]["callbacks"]["model_checkpoint"]["dirpath"] = str(
            Path(os.path.realpath(sent / "checkpoints"))
        )

    poison(sent, edit)
    before = snapshot(tmp_path / "outside")
    resume(sent, data_dir)
    assert snapshot(tmp_path / "outside") == before and victim.read_bytes() == b"precious"
    assert (sent / "checkpoints" / "epoch_001.ckpt").is_file()  # it trained on and saved


@pytest.mark.parametrize(
    "entry,kind",
    [
        ("tensorboard", "symlink"),
        ("checkpoints/last.ckpt", "symlink"),
        ("summary.json", "symlink"),
        ("checkpoints/last.ckpt", "hardlink"),  # (a folder cannot be hard-linked)
        ("summary.json", "hardlink"),
    ],
)
def test_links_in_a_run_dir_are_refused(sent, data_dir, tmp_path, entry, kind):
    """A link in a sent run dir would carry a resume's or an evaluation's writes to the file
    or folder it names (another run's checkpoint, say)."""
    outside = tmp_path / "outside"
    path = sent / entry
    target = outside / "victim.ckpt"
    if kind == "symlink":
        if path.is_dir():
            shutil.rmtree(path)
            target = outside
        else:
            shutil.copy(path, target) if entry.endswith(".ckpt") else None
            path.unlink()
        path.symlink_to(target)
    else:
        path.unlink()
        os.link(target, path)
    before = snapshot(outside)
    with pytest.raises(CheckpointError, match="symbolic link|hard-linked"):
        resume(sent, data_dir)
    with pytest.raises(CheckpointError, match="symbolic link|hard-linked"):
        evaluate_run(sent, data_dir, tmp_path)
    assert snapshot(outside) == before


def test_what_hydra_writes_first_is_not_written_through_links(sent, data_dir, tmp_path):
    """Hydra opens train.log and writes .hydra/ before vaelab's run starts: a Hydra callback
    (vaelab.run.dirs.RunDirCheck) refuses the linked dir in one line before either happens."""
    outside = tmp_path / "outside"
    (outside / "hydra").mkdir()
    (sent / "train.log").unlink(missing_ok=True)
    (sent / "train.log").symlink_to(outside / "victim.ckpt")
    shutil.rmtree(sent / ".hydra", ignore_errors=True)
    (sent / ".hydra").symlink_to(outside / "hydra")
    before = snapshot(outside)
    result = run_script("train.py", [f"resume={sent}", f"paths.data_dir={data_dir}"], tmp_path)
    assert_one_line_error(result, "symbolic link")
    assert snapshot(outside) == before and not any((outside / "hydra").iterdir())


def test_a_data_folder_from_a_file_is_never_read(sent, data_dir, tmp_path):
    """A saved data.root pointing at pickles the attacker put in the run dir."""
    poison(sent, set_config("data.root", str(sent / "evil")))
    with pytest.raises(ConfigError, match="never names a folder on this machine"):
        evaluate_run(sent, data_dir, tmp_path)
    with pytest.raises(ConfigError, match="never names a folder on this machine"):
        resume(sent, data_dir)


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (code(self.marker),))


def test_pickled_data_files_build_arrays_only(tmp_path):
    """CIFAR-10's python batches are pickles: with verification off (the user's own command
    line), a planted batch still runs no code."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    for name, _ in CIFAR10.FILES["train"]:
        (folder / name).write_bytes(pickle.dumps({"data": Exploit(marker), "labels": [0]}))
    with pytest.raises(DataError, match="refusing the global builtins.exec"):
        CIFAR10(verify=False).read(tmp_path, "train")
    assert not marker.exists()


def test_a_new_run_never_writes_into_a_used_or_busy_run_dir(sent, data_dir, tmp_path):
    cfg = compose_train([*small(data_dir), f"paths.log_dir={tmp_path}"], output_dir=sent)
    before = snapshot(sent / "checkpoints")
    with pytest.raises(CheckpointError, match="already holds a run.*resume="):
        train_module.run(cfg)
    assert snapshot(sent / "checkpoints") == before
    with claimed(sent, fresh=False):  # another process training in it
        with pytest.raises(CheckpointError, match=r"another process \(pid \d+\) is training"):
            resume(sent, data_dir)
    assert snapshot(sent / "checkpoints") == before

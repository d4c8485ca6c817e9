"""The run's config in one pure step: (this command, the saved run it names, if any) -> plan.

No Lightning, no file access: `vaelab.run.checkpoints` reads the saved run (`source` says
which), this module decides. What a command can ask for:

- a new run: the command's config, in a new (empty) run dir;
- `resume=<run dir>`: the saved run's config (read as data, `vaelab.run.trust`) in its own dir,
  from its newest loadable checkpoint; the command may change `trainer.*` and its own keys;
- a SLURM requeue of itself (`SLURM_RESTART_COUNT` > 0): the same command, from its run dir's
  newest checkpoint when it wrote one;
- `ckpt_path=<file>`: the command's config, starting from that checkpoint's training state;
- a second stage (`stage.run=<run dir>`, e.g. `experiment=vqvae_prior autoencoder_run=...`):
  the command's config with the groups `stage.groups` taken from that run (but the keys in
  `stage.own`), starting from its weights; the model family must be the same.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaelab.errors import CheckpointError, ConfigError
from vaelab.run.trust import COMMAND_KEYS, SITE_KEYS, Site, localise

#: Where the data are on this machine: a resume takes them from the command line.
DATA_SITE = ("data.root", "data.download", "data.source.verify")
#: What an evaluation builds from a saved run; the rest of it is never instantiated.
BUILT_GROUPS = (
    "data",
    "model",
    "likelihood",
    "prior",
    "posterior",
    "objective",
    "optimizer",
    "scheduler",
)
REQUIRED_GROUPS = ("data", "model", "likelihood", "prior", "objective", "optimizer")


@dataclass(frozen=True)
class Invocation:
    """What this process was asked: the command's composed config (resolved, plain data, no
    `hydra` node), the keys its command line set, the run dir it was given, and how many times
    SLURM restarted the job."""

    config: dict[str, Any]
    overrides: tuple[str, ...] = ()
    run_dir: Path = Path(".")
    restart_count: int = 0

    def site(self, where: str) -> Site:
        data = self.config.get("data") or {}
        return Site(
            run_dir=self.run_dir,
            data_dir=self.config["paths"]["data_dir"],
            data_root=data.get("root"),
            download=bool(data.get("download", False)),
            where=where,
            verify=bool((data.get("source") or {}).get("verify", True)),
            mlflow_uri=self.config["paths"].get("mlflow_uri"),
        )


@dataclass(frozen=True)
class SavedRun:
    """A checkpoint read and checked: its file, its run config (plain data that passed
    `trust.check_saved`), its global step, and newer files that did not load (file, why)."""

    checkpoint: Path
    config: dict[str, Any]
    step: int = 0
    skipped: tuple[tuple[Path, str], ...] = ()


@dataclass(frozen=True)
class Plan:
    """The run's config; the checkpoint whose training state Lightning restores; the weights a
    second stage starts from; whether the run dir must be new; lines to log."""

    config: dict[str, Any]
    ckpt_path: Path | None = None
    init_from: Path | None = None
    fresh: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)


def source(invocation: Invocation) -> tuple[str, Path] | None:
    """Which saved run this command reads: (kind, run dir), kind resume | requeue | stage."""
    command = invocation.config
    if command.get("resume"):
        return "resume", Path(str(command["resume"])).expanduser()
    stage = command.get("stage") or {}
    if stage.get("run"):
        return "stage", Path(str(stage["run"])).expanduser()
    if invocation.restart_count > 0 and not command.get("ckpt_path"):
        return "requeue", invocation.run_dir
    return None


def plan(invocation: Invocation, saved: SavedRun | None) -> Plan:
    """The run this command asks for (see the module docstring)."""
    command = invocation.config
    kind = (source(invocation) or ("new", None))[0]
    notes = tuple(
        f"{path.name} did not load ({why}); skipped"
        for path, why in (saved.skipped if saved else ())
    )
    if kind == "resume":
        return resumed(invocation, require_saved(saved, f"resume={command['resume']}"), notes)
    if kind == "requeue":
        if saved is None:  # requeued before its first checkpoint: start again
            return Plan(copy.deepcopy(command), fresh=False, notes=("requeued with no checkpoint",))
        note = (
            f"requeued job (SLURM_RESTART_COUNT={invocation.restart_count}): continuing from "
            f"{saved.checkpoint} (step {saved.step})"
        )
        return Plan(copy.deepcopy(command), saved.checkpoint, fresh=False, notes=(*notes, note))
    if kind == "stage":
        return second_stage(
            invocation, require_saved(saved, f"stage.run={command['stage']['run']}")
        )
    ckpt = command.get("ckpt_path")
    return Plan(copy.deepcopy(command), Path(str(ckpt)).expanduser() if ckpt else None)


def require_saved(saved: SavedRun | None, what: str) -> SavedRun:
    if saved is None:
        raise CheckpointError(
            f"{what}: no loadable checkpoint in its checkpoints/ (is it a run dir of train.py "
            "that wrote one?)"
        )
    return saved


def resumed(invocation: Invocation, saved: SavedRun, notes: tuple[str, ...]) -> Plan:
    command = invocation.config
    keys = [override_key(o) for o in invocation.overrides]
    refused = [o for o in invocation.overrides if not allowed_with_resume(override_key(o))]
    own = sorted(COMMAND_KEYS - {"hydra"})
    if refused:
        raise ConfigError(
            f"resume keeps the run's saved config; cannot change {', '.join(refused)} (allowed "
            f"with resume: trainer.*, {', '.join(DATA_SITE)}, {', '.join(own)})"
        )
    config = localise(saved.config, invocation.site(str(saved.checkpoint)))
    config.update({key: copy.deepcopy(command[key]) for key in COMMAND_KEYS if key in command})
    for key in keys:
        if key.startswith("trainer."):
            set_path(config, key, copy.deepcopy(get_path(command, key)))
    note = f"resuming from {saved.checkpoint} (step {saved.step})"
    return Plan(config, saved.checkpoint, fresh=False, notes=(*notes, note))


def allowed_with_resume(key: str) -> bool:
    """The command's own keys, where the data are here, and how long and how to train
    (`trainer.*`, but its places and plugins, which a resume derives)."""
    if key.split(".")[0] in COMMAND_KEYS or key in DATA_SITE:
        return True
    return key.startswith("trainer.") and key.rsplit(".", 1)[-1] not in {*SITE_KEYS, "_target_"}


def second_stage(invocation: Invocation, saved: SavedRun) -> Plan:
    """The command's config with `stage.groups` from the first run, `stage.own` kept."""
    command = invocation.config
    stage = command["stage"]
    first = localise(saved.config, invocation.site(str(saved.checkpoint)))
    theirs, ours = first.get("model", {}).get("_target_"), command["model"].get("_target_")
    if theirs != ours:
        raise ConfigError(
            f"stage.run={stage['run']} trained {theirs}; this stage continues a {ours} run"
        )
    config = copy.deepcopy(command)
    for group in stage.get("groups") or []:
        config[group] = copy.deepcopy(first[group])
    for key in stage.get("own") or []:
        set_path(config, key, copy.deepcopy(get_path(command, key)))
    note = f"second stage on {stage['run']} (its {', '.join(stage.get('groups') or [])})"
    return Plan(config, init_from=saved.checkpoint, notes=(note,))


def evaluation(saved: SavedRun, site: Site, batch_size: int | None = None) -> dict[str, Any]:
    """What an evaluation builds from a saved run: its `BUILT_GROUPS`, localised to `site`."""
    missing = [group for group in REQUIRED_GROUPS if group not in saved.config]
    if missing:
        raise CheckpointError(
            f"{saved.checkpoint} was not written by vaelab's train.py (its config lacks "
            f"{', '.join(missing)})"
        )
    built = {key: saved.config[key] for key in (*BUILT_GROUPS, "monitor") if key in saved.config}
    config = localise(built, site)
    if batch_size is not None:
        config["data"]["eval_batch_size"] = batch_size
    return config


def override_key(override: str) -> str:
    """`trainer.max_epochs` of `+trainer.max_epochs=5` (also `~key`, `key@pkg=...`)."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def get_path(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_path(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


# --- run dirs ----------------------------------------------------------------------------------
UNSAFE = re.compile(r"[^A-Za-z0-9_.=+,-]")


def run_dir_name(
    time: str, environ: dict[str, str], existing: list[str], token: str | None = None
) -> str:
    """A new run dir's name, unique for runs started in the same second: `<time>_<token>`, and
    under SLURM `<time>_job<id>_<token>` (`<array job>_<task>` in an array). A requeued SLURM
    job (SLURM_RESTART_COUNT > 0) gets back the newest dir of its job id in `existing`."""
    token = token or os.urandom(3).hex()
    job = environ.get("SLURM_JOB_ID")
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return f"{time}_{token}"
    job = UNSAFE.sub("-", job)
    if int(environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        mine = sorted(name for name in existing if f"_job{job}_" in name)
        if mine:
            return mine[-1]
    return f"{time}_job{job}_{token}"

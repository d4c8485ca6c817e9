"""A saved config is data: what may be read back from a checkpoint, and what never is.

The rule, in one place. A file (a checkpoint, a run dir) says *what* was trained and how; it
never says *where* anything is on this machine, and never *how much* is checked. Reading one:

1. It must be plain data: no interpolation anywhere (configs are saved resolved), only None,
   booleans, numbers, strings, lists and string-keyed dicts; every `_target_` one of the exact
   trusted names (vaelab's own configs, `SAFE_CLASSES`, and what this command's
   `trusted_targets` adds); no Hydra key but `_target_` and `_partial_`; every key a known one
   (a top-level key of vaelab's configs, or a parameter the node's class names).
2. `SITE_KEYS`, wherever they appear, are never taken from the file: places (`default_root_dir`,
   `save_dir`, `dirpath`, `run_dir`, `data_dir`, `root`, an MLflow `tracking_uri`) are derived
   from this run's dir, this command's data root and its `paths.mlflow_uri`, switches
   (`download`, `verify`, `plugins`) come from this command or their safe value, and names of
   files inside those places (`filename`, `name`, `version`, `sub_dir`) are kept only as plain
   names. `COMMAND_KEYS` (paths, what to trust, what to check, what to
   resume from) belong to the invocation and are dropped from a file.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_object

from vaelab.errors import ConfigError

#: The project's config groups, next to train.py and evaluate.py (their `config_path`).
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
#: Classes without side effects that a user may swap in from the command line.
SAFE_CLASSES = frozenset(
    [f"torch.nn.{n}" for n in ("ELU", "GELU", "Identity", "LeakyReLU", "Mish", "SELU", "SiLU")]
    + [f"torch.nn.{n}" for n in ("Sigmoid", "Softplus")]
    + [f"torch.optim.{n}" for n in ("SGD", "RMSprop", "NAdam", "RAdam", "Adamax")]
    + [
        f"lightning.pytorch.callbacks.{name}"
        for name in (
            "TQDMProgressBar",
            "RichProgressBar",
            "ModelSummary",
            "EarlyStopping",
            "EMAWeightAveraging",
        )
    ]
)
#: Hydra keys a saved node may carry; `_args_`, `_recursive_`, `_convert_` would pass values
#: around the known-key check.
HYDRA_KEYS = frozenset({"_target_", "_partial_"})
#: Keys of the invocation, not of the run: dropped from a file, taken from the command.
COMMAND_KEYS = frozenset(
    {
        "paths",
        "hydra",
        "resume",
        "ckpt_path",
        "trusted_targets",
        "check_finite",
        "validate_args",
        "stage",
        "autoencoder_run",
        "task_name",
    }
)
#: Top-level nodes without a `_target_` whose keys are fixed (final_evaluation: evaluate.yaml's
#: `eval` settings, added by `plain_nodes`).
PLAIN_NODES = {"monitor": frozenset({"metric", "mode"})}
#: Keys of an objective's config that describe how its runs are judged (not constructor args).
OBJECTIVE_META = ("monitor", "report")


def plain_name(value: object) -> bool:
    """A file name, not a place: no separator, not `.` or `..`."""
    return (
        isinstance(value, str)
        and "/" not in value
        and "\\" not in value
        and "\0" not in value
        and value not in (".", "..")
    )


#: key -> how its value is decided when a config comes from a file: a function of (the site,
#: the file's value) that returns the value to use (`DROP` to leave the key out).
DROP = object()
SITE_KEYS = {
    "default_root_dir": lambda site, value: str(site.run_dir),
    "run_dir": lambda site, value: str(site.run_dir),
    "tracking_uri": lambda site, value: site.mlflow_uri or site.refuse(value),
    "save_dir": lambda site, value: str(site.run_dir),
    "dirpath": lambda site, value: str(site.run_dir / "checkpoints"),
    "data_dir": lambda site, value: str(site.data_dir),
    "root": lambda site, value: site.data_root_for(value),
    "download": lambda site, value: site.download,
    "verify": lambda site, value: site.verify,
    "plugins": lambda site, value: DROP,
    **dict.fromkeys(
        ("filename", "name", "version", "sub_dir"),
        lambda site, value: value if plain_name(value) or value is None else site.refuse(value),
    ),
}


class Site:
    """This machine and this command: the run dir, the data root and the data switches a
    config read from a file gets."""

    def __init__(
        self,
        run_dir: str | Path,
        data_dir: str | Path,
        data_root: str | None = None,
        download: bool = False,
        where: str = "a saved run",
        verify: bool = True,
        mlflow_uri: str | None = None,
    ) -> None:
        self.run_dir, self.data_dir = Path(run_dir), Path(data_dir)
        self.mlflow_uri = mlflow_uri
        self.data_root, self.download, self.verify = data_root, download, verify
        self.where = where

    def data_root_for(self, saved: object) -> str | None:
        if saved is not None and self.data_root is None:
            raise ConfigError(
                f"{self.where}: the run read its images from data.root={saved}; a saved run "
                "never names a folder on this machine: pass data.root=<that folder here>"
            )
        return self.data_root

    def refuse(self, value: object) -> None:
        raise ConfigError(
            f"{self.where}: refusing {value!r}: a file may name a file inside the run dir, "
            "never another place"
        )


@functools.cache
def project_targets(config_dir: Path = CONFIG_DIR) -> frozenset[str]:
    """Every `_target_` vaelab's own configs name (configs/hydra/ aside): a class added with its
    YAML is trusted with no other edit."""
    return frozenset(t for _, node in config_files(config_dir) for t in targets(node))


@functools.cache
def top_level_keys(config_dir: Path = CONFIG_DIR) -> frozenset[str]:
    """What a run config may hold at its top: the groups, and the keys of train.yaml and of the
    global presets (experiment/, hparams_search/), plus `choices` (the group options)."""
    keys = {"choices"} | {p.name for p in config_dir.iterdir() if p.is_dir()}
    for path, node in config_files(config_dir):
        top = path.relative_to(config_dir).parts[0]
        if isinstance(node, Mapping) and top in ("train.yaml", "experiment", "hparams_search"):
            keys |= {str(key) for key in node if key != "defaults"}
    return frozenset(keys)


@functools.cache
def plain_nodes(config_dir: Path = CONFIG_DIR) -> dict[str, frozenset[str]]:
    evaluation = yaml.safe_load((config_dir / "evaluate.yaml").read_text())
    return {**PLAIN_NODES, "final_evaluation": frozenset(evaluation["eval"])}


def config_files(config_dir: Path) -> list[tuple[Path, Any]]:
    if not config_dir.is_dir():
        raise ConfigError(
            f"vaelab's configs are not at {config_dir}; reinstall with pip install -e"
        )
    return [
        (path, yaml.safe_load(path.read_text()))
        for path in sorted(config_dir.rglob("*.yaml"))
        if path.relative_to(config_dir).parts[0] != "hydra"
    ]


def targets(node: Any) -> set[str]:
    """The `_target_`s in a parsed YAML file, except those of Hydra's own nodes (`hydra:`: the
    sweeper, launcher and callbacks Hydra builds, never part of a run's config)."""
    if isinstance(node, Mapping):
        found = {node["_target_"]} if isinstance(node.get("_target_"), str) else set()
        return found.union(*(targets(v) for k, v in node.items() if k != "hydra"))
    if isinstance(node, list):
        return set().union(*(targets(value) for value in node))
    return set()


def is_trusted(target: object, extra: Iterable[str] = ()) -> bool:
    if not isinstance(target, str):
        return False
    if target in SAFE_CLASSES or target in project_targets():
        return True
    return any(target == name or target.startswith(f"{name}.") for name in extra if name)


@functools.cache
def parameters(target: str) -> frozenset[str]:
    """The parameters `target` names (a **kwargs catch-all admits none beyond them)."""
    try:
        signature = inspect.signature(get_object(target))
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise ConfigError(f"_target_={target} cannot be imported here ({e})") from e
    return frozenset(
        name
        for name, p in signature.parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    )


def check_saved(config: object, where: str, trusted: Iterable[str] = ()) -> dict[str, Any]:
    """`config` if it is a run config that may be read back (rule 1 of the module docstring);
    else a ConfigError naming the first offending key."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where} holds no run config (found {type(config).__name__})")
    extra = [str(name).rstrip(".") for name in trusted]
    unknown = sorted(str(k) for k in config if k not in top_level_keys())
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} in its config; refusing it")
    for key, value in config.items():
        known = plain_nodes().get(key)
        if known is not None and isinstance(value, dict):
            refuse_unknown(value, known, f"{where}: {key}")
        check_node(value, key, where, extra)
    return config


def refuse_unknown(node: Mapping, known: Iterable[str], where: str) -> None:
    unknown = sorted(str(k) for k in node if k not in known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: not a known key; refusing it")


def check_node(node: object, at: str, where: str, extra: list[str]) -> None:
    if node is None or isinstance(node, bool | int | float):
        return
    if isinstance(node, str):
        if "${" in node:
            raise ConfigError(
                f"{where}: refusing the interpolation {node[:80]!r} at {at}: a saved config is "
                "data (vaelab writes it resolved)"
            )
        return
    if isinstance(node, list):
        for i, value in enumerate(node):
            check_node(value, f"{at}[{i}]", where, extra)
        return
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: {at} holds a {type(node).__name__}; a config holds data")
    if any(not isinstance(key, str) for key in node):
        raise ConfigError(f"{where}: {at} has a key that is not a string")
    if "_target_" in node:
        target = node["_target_"]
        if not is_trusted(target, extra):
            raise ConfigError(
                f"{where}: refusing to instantiate _target_={target!r} at {at}: not one of "
                f"vaelab's own targets; or add its package to trusted_targets (now {extra})"
            )
        meta = OBJECTIVE_META if at == "objective" else ()
        refuse_unknown(node, HYDRA_KEYS | parameters(target) | set(meta), f"{where}: {at}")
    else:
        hydra_keys = sorted(k for k in node if k.startswith("_") and k.endswith("_"))
        if hydra_keys:
            raise ConfigError(f"{where}: {at}.{hydra_keys[0]} without a _target_; refusing it")
    for key, value in node.items():
        check_node(value, f"{at}.{key}", where, extra)


def localise(config: dict[str, Any], site: Site) -> dict[str, Any]:
    """The saved config without its command keys, with every site key decided by `SITE_KEYS`
    (rule 2 of the module docstring)."""
    return {key: localised(value, site) for key, value in config.items() if key not in COMMAND_KEYS}


def localised(node: Any, site: Site) -> Any:
    if isinstance(node, list):
        return [localised(value, site) for value in node]
    if not isinstance(node, dict):
        return node
    result = {}
    for key, value in node.items():
        if key in SITE_KEYS:
            value = SITE_KEYS[key](site, value)
            if value is DROP:
                continue
        result[key] = localised(value, site)
    return result

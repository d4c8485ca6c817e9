"""Which `_target_`s a config read back from a run dir or checkpoint may instantiate.

A saved config is untrusted input: `_target_` can name any callable, and torch's namespace alone
holds functions that load and run code (`torch.load`, `torch.hub.load`, ...). So trust goes by
exact name: the classes the project's own configs produce (`project_targets()`, read from
configs/, so a class added with its YAML is trusted with no other edit), a few harmless classes
a user may pick on the command line (`SAFE_TORCH_CLASSES`, `SAFE_LIGHTNING_CLASSES`), and what
the user names in `trusted_targets` for their own extension package (a package prefix,
`mypackage`, or an exact class, `mypackage.priors.MyPrior`). That list comes from the command
line of the evaluation or resume, never from the file being read. Interpolations may only
reference other nodes or call the resolvers in `SAFE_RESOLVERS`: `${oc.create:...}` or
`${oc.decode:...}` would build a node (and a `_target_`) that this check never saw.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from vaelab.errors import ConfigError

#: The project's config groups, next to train.py and evaluate.py (their `config_path`).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _targets(node: Any, under_hydra: bool = False) -> set[str]:
    """The `_target_`s in a parsed YAML file, except those of Hydra's own nodes (`hydra:`: the
    sweeper, launcher and callbacks Hydra builds, never part of a run's saved config)."""
    if isinstance(node, Mapping):
        found = {node["_target_"]} if "_target_" in node and not under_hydra else set()
        for key, value in node.items():
            found |= _targets(value, under_hydra or key == "hydra")
        return found
    if isinstance(node, list):
        return set().union(*(_targets(value, under_hydra) for value in node))
    return set()


@functools.cache
def project_targets(config_dir: Path = CONFIG_DIR) -> frozenset[str]:
    """Every `_target_` vaelab's own configs name (configs/hydra/ aside): a class added with its
    YAML is trusted with no other edit."""
    if not config_dir.is_dir():
        raise ConfigError(
            f"vaelab's configs are not at {config_dir}; reinstall with pip install -e"
        )
    found: set[str] = set()
    for path in sorted(config_dir.rglob("*.yaml")):
        if path.relative_to(config_dir).parts[0] != "hydra":
            found |= _targets(yaml.safe_load(path.read_text()))
    return frozenset(found)


#: Classes without side effects that a user may swap in from the command line.
SAFE_TORCH_CLASSES = frozenset(
    f"torch.nn.{name}"
    for name in (
        "ELU",
        "GELU",
        "Identity",
        "LeakyReLU",
        "Mish",
        "SELU",
        "SiLU",
        "Sigmoid",
        "Softplus",
    )
) | frozenset(f"torch.optim.{name}" for name in ("SGD", "RMSprop", "NAdam", "RAdam", "Adamax"))
#: Lightning callbacks a user may swap in (and that runs saved before vaelab had its own bar name).
SAFE_LIGHTNING_CLASSES = frozenset(
    f"lightning.pytorch.callbacks.{name}"
    for name in (
        "TQDMProgressBar",
        "RichProgressBar",
        "ModelSummary",
        "EarlyStopping",
        "EMAWeightAveraging",
    )
)
#: Resolvers a saved config may call: none of them turns a string into a config node.
SAFE_RESOLVERS = frozenset(
    {"oc.env", "oc.select", "hydra", "vaelab.run_name", "vaelab.first_set", "vaelab.config_subdir"}
)
RESOLVER_CALL = re.compile(r"\$\{\s*([\w.\-]+)\s*:")


def is_trusted(target: object, extra: Iterable[str] = ()) -> bool:
    if not isinstance(target, str):
        return False
    if target in SAFE_TORCH_CLASSES | SAFE_LIGHTNING_CLASSES or target in project_targets():
        return True
    return any(target == name or target.startswith(f"{name}.") for name in extra if name)


def check_targets(config: Mapping[str, Any] | list, where: str, extra: Iterable[str] = ()) -> None:
    """Refuse any `_target_` that is not trusted by name (see the module docstring)."""
    extra = [str(name).rstrip(".") for name in extra]
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        if key == "_target_" and not is_trusted(value, extra):
            allowed = f"; or add its package to trusted_targets (now {extra})"
            raise ConfigError(
                f"{where}: refusing to instantiate _target_={value!r}: not one of vaelab's own "
                f"targets{allowed}"
            )
        if isinstance(value, str):
            unsafe = sorted(set(RESOLVER_CALL.findall(value)) - SAFE_RESOLVERS)
            if unsafe:
                raise ConfigError(
                    f"{where}: refusing the interpolation {value[:80]!r} at {key!r}: resolver "
                    f"{unsafe[0]} is not one of {', '.join(sorted(SAFE_RESOLVERS))}"
                )
        if isinstance(value, Mapping | list):
            check_targets(value, where, extra)

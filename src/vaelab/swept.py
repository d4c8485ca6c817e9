"""What a sweep varies: the keys a multirun sweeps (comma lists, ranges and other sweeps on its
command line, and the sweeper's params), as the sweep dir's `multirun.yaml` records them (Hydra's
sweeper writes it before any job starts); and the run names made of them."""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

UNSAFE = re.compile(r"[^A-Za-z0-9_.=+,-]")


def recorded_sweep(sweep_dir: str | Path) -> tuple[list[str] | None, dict[str, str]]:
    """(the sweep's command-line overrides, the sweeper's params) from its multirun.yaml;
    (None, {}) where it has none."""
    recorded = Path(sweep_dir) / "multirun.yaml"
    if not recorded.is_file():
        return None, {}
    hydra = OmegaConf.to_container(OmegaConf.load(recorded)).get("hydra") or {}
    overrides = [str(o) for o in (hydra.get("overrides") or {}).get("task") or []]
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return overrides, {str(k): str(v) for k, v in params.items()}


def swept_keys(overrides: list[str], params: dict[str, str] | None = None) -> list[str]:
    """The keys (or groups) that take several values: sweeps among `overrides`, and `params`."""
    swept = [f"{key}={value}" for key, value in (params or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*overrides, *swept])
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


def sweep_run_name(
    number: int,
    job_overrides: list[str],
    varying: list[str] | None,
    limit: int = 200,
) -> str:
    """A sweep's run subdir: `<number>_<key>=<value>,...` for the `varying` keys, each by its
    last part unless two would clash (`latent_dim=2,beta=0.5`); filesystem-safe, cut at `limit`
    characters at a key boundary, unique by its number. `varying` None: every override of the
    job."""
    parsed = OverridesParser.create().parse_overrides(list(job_overrides))
    own = {o.key_or_group: o.value() for o in parsed}
    varying = list(own) if varying is None else varying
    short = {key: key.rsplit(".", 1)[-1].rsplit("/", 1)[-1] for key in varying}
    clashes = {name for name in short.values() if list(short.values()).count(name) > 1}
    parts = [
        f"{key if short[key] in clashes else short[key]}={own[key]}"
        for key in varying
        if key in own
    ]
    name = UNSAFE.sub("-", f"{number}_{','.join(parts)}" if parts else str(number))
    if len(name) > limit:
        name = name[: name.rfind(",", 0, limit)] + ",..."
    return name

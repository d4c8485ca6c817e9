"""A loaded checkpoint's state, before Lightning acts on it.

- `confine_state`: the paths in callback states (ModelCheckpoint deletes the files its best-k
  bookkeeping names) are kept only as regular files of this run's checkpoints/.
- `apply_optimizer_settings`: the config's optimizer settings over the checkpoint's.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from vaelab.run.trust import plain_name

log = logging.getLogger(__name__)


def confine_state(checkpoint: dict[str, Any], path: Path, folder: Path) -> list[str]:
    """Paths in the checkpoint's callback states, before Lightning acts on them (ModelCheckpoint
    deletes the files its best-k bookkeeping names). A checkpoint of this run's `folder` keeps
    its bookkeeping, each path mapped by file name to a regular file of `folder` (a moved run dir
    resumes with its own files); anything else is dropped, and "best" is recomputed from what
    remains. Returns one line per dropped path."""
    own = path.resolve().parent == folder.resolve()
    here = os.path.realpath(folder)  # ModelCheckpoint compares its realpath'd dirpath
    monitor = (checkpoint.get("hyper_parameters") or {}).get("monitor") or {}
    dropped: list[str] = []

    def local(value: object) -> str | None:
        if not isinstance(value, str) or not value:
            return None
        name = Path(value).name
        candidate = Path(here) / name
        if own and plain_name(name) and candidate.is_file() and not candidate.is_symlink():
            return str(candidate)
        dropped.append(value)
        return None

    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, dict):
            continue
        for key, value in list(state.items()):
            if key == "dirpath":
                state[key] = here
            elif key.endswith("_path"):
                state[key] = local(value) or ""
            elif key == "best_k_models" and isinstance(value, dict):
                kept = {local(p): s for p, s in value.items()}
                state[key] = {p: s for p, s in kept.items() if p is not None}
        if isinstance(state.get("best_k_models"), dict):
            recompute_best(state, monitor.get("mode"))
    if dropped:
        log.warning(
            "%s: dropped %d path(s) from its callback state that are not files of this run's "
            "checkpoints/ (first: %s)",
            path,
            len(dropped),
            dropped[0],
        )
    return dropped


def recompute_best(state: dict[str, Any], mode: object) -> None:
    models = state["best_k_models"]
    if not models or mode not in ("max", "min"):
        state["best_model_path"], state["best_model_score"] = "", None
        return

    def score(p: str) -> float:
        value = float(models[p])
        return value if math.isfinite(value) else (-math.inf if mode == "max" else math.inf)

    ordered = sorted(models, key=score, reverse=mode == "max")
    state["best_model_path"], state["best_model_score"] = ordered[0], models[ordered[0]]
    state["kth_best_model_path"], state["kth_value"] = ordered[-1], models[ordered[-1]]


# --- writing -------------------------------------------------------------------------------------


def apply_optimizer_settings(checkpoint: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The config's optimizer settings over those a checkpoint restores (Lightning would keep
    the checkpoint's: `ckpt_path=... optimizer.lr=...` would train at the old rate). The model's
    parameter group only (an objective's own groups keep theirs); a changed learning rate
    rescales the schedule's place (`lr`, `initial_lr`, the schedulers' `base_lrs` and last rate).
    Returns one line per changed setting."""
    states = checkpoint.get("optimizer_states") or []
    if len(states) != 1 or not states[0].get("param_groups"):
        return []
    group, notes = states[0]["param_groups"][0], []
    for key, value in settings.items():
        if key.startswith("_") or key == "params" or key not in group:
            continue
        old = group.get("initial_lr", group[key]) if key == "lr" else group[key]
        same = list(old) == list(value) if isinstance(old, list | tuple) else old == value
        if same:
            continue
        if key == "lr":
            factor = value / old if old else 1.0
            group["lr"] = value if not old else group["lr"] * factor
            if "initial_lr" in group:
                group["initial_lr"] = value
            for schedule in checkpoint.get("lr_schedulers") or []:
                if schedule.get("base_lrs"):
                    schedule["base_lrs"][0] = value
                if schedule.get("_last_lr"):
                    schedule["_last_lr"][0] = group["lr"]
        else:
            group[key] = tuple(value) if isinstance(old, tuple) else value
        notes.append(f"optimizer.{key}={value} replaces the checkpoint's {old}")
    return notes

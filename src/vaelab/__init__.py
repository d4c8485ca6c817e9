"""vaelab: variational autoencoder experiments with PyTorch Lightning and Hydra."""

import os
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from vaelab import quiet

__version__ = "0.1.0"


def _config_subdir(resume: str | None) -> str:
    """Hydra's output_subdir: `.hydra`, or for resume=<run dir> a subfolder of it, so that the
    run's original config stays as it was."""
    return ".hydra" if resume is None else f".hydra/resume_{datetime.now():%Y-%m-%d_%H-%M-%S}"


def _run_dir(resume: str | None, parent: str) -> str:
    """Hydra's run (or sweep) dir: resume=<run dir> itself, else a new, unique dir under
    `parent` (vaelab.run.plan.run_dir_name)."""
    if resume is not None:
        return resume
    from vaelab.run.plan import run_dir_name

    existing = [p.name for p in Path(parent).iterdir()] if Path(parent).is_dir() else []
    return str(
        Path(parent)
        / run_dir_name(f"{datetime.now():%Y-%m-%d_%H-%M-%S}", dict(os.environ), existing)
    )


def _run_name(number: int, job_overrides, sweep_dir: str) -> str:
    """A sweep's run subdir, named by the keys its sweep varies (vaelab.swept)."""
    from vaelab.swept import recorded_sweep, sweep_run_name, swept_keys

    overrides, params = recorded_sweep(sweep_dir)
    varying = None if overrides is None else swept_keys(overrides, params)
    return sweep_run_name(int(number), list(job_overrides), varying)


def _gpus_per_node(accelerator: str, devices: int | str) -> int:
    """The SLURM launcher's GPUs per node: none for a CPU trainer, else one per device."""
    return 0 if str(accelerator) == "cpu" else int(devices)


OmegaConf.register_new_resolver("vaelab.run_name", _run_name, replace=True)
OmegaConf.register_new_resolver("vaelab.gpus_per_node", _gpus_per_node, replace=True)
OmegaConf.register_new_resolver("vaelab.run_dir", _run_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver(
    "vaelab.config_subdir", _config_subdir, use_cache=True, replace=True
)
quiet.install()

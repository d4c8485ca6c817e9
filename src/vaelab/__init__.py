"""vaelab: variational autoencoder experiments with PyTorch Lightning and Hydra."""

from datetime import datetime

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _config_subdir(resume: str | None) -> str:
    """Hydra's output_subdir: `.hydra`, or for resume=<run dir> a subfolder of it, so that the
    run's original config stays as it was."""
    return ".hydra" if resume is None else f".hydra/resume_{datetime.now():%Y-%m-%d_%H-%M-%S}"


def _first_set(value: str | None, default: str) -> str:
    """`value` unless it is null, else `default` (oc.select only falls back for missing keys)."""
    return default if value is None else value


OmegaConf.register_new_resolver("vaelab.first_set", _first_set, replace=True)
OmegaConf.register_new_resolver(
    "vaelab.config_subdir", _config_subdir, use_cache=True, replace=True
)

"""A second training stage on a first run's frozen model: `experiment=vqvae_prior
autoencoder_run=<run dir>` trains a PixelCNN prior over the codes of a trained VQ-VAE.

The second run takes the first run's model, likelihood and data settings from its saved config
(trusted by name, like a resume), switches on the code prior of this config and freezes the
rest; its own run dir then holds the whole model (the frozen weights too), so evaluate.py and a
resume need only that run dir.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from vaelab.errors import CheckpointError, ConfigError
from vaelab.trust import check_targets

#: the keys of the second stage's model config that it sets; the rest comes from the first run
PRIOR_KEYS = ("code_prior", "prior_channels", "prior_layers")
VQVAE_TARGET = "vaelab.models.VQVAE"


def second_stage_config(cfg: DictConfig) -> DictConfig:
    if OmegaConf.is_missing(cfg, "autoencoder_run"):
        raise ConfigError(
            "experiment=vqvae_prior needs autoencoder_run=<run dir of a model=vqvae run>"
        )
    run_dir = Path(str(cfg.autoencoder_run)).expanduser()
    saved_file, last = run_dir / ".hydra" / "config.yaml", run_dir / "checkpoints" / "last.ckpt"
    for path in (saved_file, last):
        if not path.is_file():
            raise CheckpointError(
                f"autoencoder_run={cfg.autoencoder_run}: no {path.relative_to(run_dir)} there "
                "(is it the run dir of a finished model=vqvae run?)"
            )
    saved = OmegaConf.load(saved_file)
    check_targets(
        OmegaConf.to_container(saved), str(saved_file), list(cfg.get("trusted_targets") or [])
    )
    if saved.model.get("_target_") != VQVAE_TARGET:
        raise ConfigError(
            f"autoencoder_run={cfg.autoencoder_run} trained {saved.model.get('_target_')}; "
            f"a code prior needs a model=vqvae run"
        )
    model = saved.model.copy()
    with open_dict(model):
        for key in PRIOR_KEYS:
            model[key] = cfg.model[key]
        model.freeze_autoencoder = True
    with open_dict(cfg):
        cfg.model = model
        cfg.likelihood = saved.likelihood
        cfg.data = saved.data
        cfg.autoencoder_checkpoint = str(last)
    return cfg


def load_autoencoder(model: nn.Module, checkpoint: str | Path) -> None:
    """The first run's weights into every part of `model` but the code prior."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    own = {
        key.removeprefix("model."): value
        for key, value in state.items()
        if key.startswith("model.") and not key.startswith("model.code_prior.")
    }
    try:
        missing, unexpected = model.load_state_dict(own, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"{checkpoint} holds another VQ-VAE than its config builds ({str(e).split(chr(10))[0]})"
        ) from e
    missing = [key for key in missing if not key.startswith("code_prior.")]
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint} does not match the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )

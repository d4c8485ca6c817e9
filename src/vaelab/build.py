"""Build the run's objects from a composed config with Hydra's `instantiate`.

Data flows one way: the DataModule knows the image shape, the likelihood says how many parameters
per pixel the decoder must emit, and the encoder and decoder are told their sizes here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from vaelab.data import MNISTFamilyDataModule
from vaelab.errors import ConfigError, require
from vaelab.likelihoods import Likelihood
from vaelab.module import VAEModule
from vaelab.vae import VAE

#: Packages whose classes a config read back from a run dir or checkpoint may instantiate.
TRUSTED_PACKAGES = ("vaelab.", "torch.")


def build_datamodule(cfg: DictConfig) -> MNISTFamilyDataModule:
    return instantiate(cfg.data)


def build_vae(cfg: DictConfig, image_shape: Iterable[int]) -> VAE:
    c, h, w = image_shape
    latent_dim = cfg.model.latent_dim
    require(
        isinstance(latent_dim, int) and not isinstance(latent_dim, bool) and latent_dim >= 1,
        f"model.latent_dim must be an integer >= 1, got {latent_dim!r}",
    )
    likelihood: Likelihood = instantiate(cfg.likelihood)
    prior = instantiate(cfg.prior, latent_dim=latent_dim)
    encoder = instantiate(cfg.model.encoder, in_shape=(c, h, w), out_dim=2 * latent_dim)
    decoder = instantiate(
        cfg.model.decoder,
        latent_dim=latent_dim,
        out_shape=(likelihood.params_per_pixel * c, h, w),
    )
    if cfg.model.get("compile"):
        # In place (nn.Module.compile), so parameter names and checkpoints do not change.
        encoder.compile()
        decoder.compile()
    return VAE(encoder, decoder, likelihood, prior, (c, h, w), latent_dim)


def build_module(
    cfg: DictConfig,
    datamodule: MNISTFamilyDataModule,
    run_config: dict[str, Any] | None = None,
) -> VAEModule:
    vae = build_vae(cfg, datamodule.image_shape)
    if vae.likelihood.binary_data and datamodule.binarize == "none":
        raise ConfigError(
            f"likelihood {vae.likelihood!r} is a distribution over binary pixels but "
            "data.binarize=none; use data.binarize=dynamic or static, or a likelihood for "
            "[0, 1] values (gaussian, gaussian_fixed, continuous_bernoulli)"
        )
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return VAEModule(
        check_finite=bool(cfg.get("check_finite", True)),
        vae=vae,
        objective=instantiate(cfg.objective),
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        bpd_offset=datamodule.bpd_offset,
        run_config=run_config,
    )


def check_targets(
    config: Mapping[str, Any] | list, where: str, packages: tuple[str, ...] = TRUSTED_PACKAGES
) -> None:
    """Refuse any `_target_` outside `packages` (configs read back are untrusted input)."""
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        if key == "_target_" and not (isinstance(value, str) and value.startswith(packages)):
            raise ConfigError(
                f"{where}: refusing to instantiate _target_={value!r}; only classes from "
                f"{', '.join(p.rstrip('.') for p in packages)} are allowed"
            )
        if isinstance(value, Mapping | list):
            check_targets(value, where, packages)

"""Model families on one protocol (`LatentVariableModel`): each is one class + one YAML."""

from vaelab.models.base import LatentVariableModel, rate, rate_per_dim
from vaelab.models.categorical import CategoricalVAE
from vaelab.models.cvae import ConditionalVAE
from vaelab.models.hvae import HierarchicalVAE
from vaelab.models.vae import VAE
from vaelab.models.vqvae import VQVAE

__all__ = [
    "VAE",
    "VQVAE",
    "CategoricalVAE",
    "ConditionalVAE",
    "HierarchicalVAE",
    "LatentVariableModel",
    "rate",
    "rate_per_dim",
]

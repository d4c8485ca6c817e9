"""Model families on one protocol (`LatentVariableModel`): each is one class + one YAML."""

from vaelab.models.base import LatentVariableModel, rate, rate_per_dim
from vaelab.models.cvae import ConditionalVAE
from vaelab.models.hvae import HierarchicalVAE
from vaelab.models.vae import VAE

__all__ = [
    "VAE",
    "ConditionalVAE",
    "HierarchicalVAE",
    "LatentVariableModel",
    "rate",
    "rate_per_dim",
]

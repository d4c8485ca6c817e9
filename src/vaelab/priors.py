"""Priors p(z) as torch.distributions objects; nn.Modules so their buffers follow the device."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from vaelab.errors import require


class StandardNormal(nn.Module):
    """p(z) = N(0, I) over `latent_dim` dimensions (Kingma & Welling 2013)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        require(latent_dim >= 1, f"model.latent_dim must be >= 1, got {latent_dim}")
        self.register_buffer("loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("scale", torch.ones(latent_dim), persistent=False)

    def forward(self) -> Distribution:  # event shape (latent_dim,)
        return Independent(Normal(self.loc, self.scale), 1)

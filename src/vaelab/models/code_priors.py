"""Distributions over a VQ-VAE's code grids: the point-mass posterior (`CodeGrid`), the uniform
prior, and the autoregressive PixelCNN prior (van den Oord et al. 2016) with masked
convolutions (`AutoregressiveCodes`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, constraints

from vaelab.errors import ConfigError, require_int
from vaelab.likelihoods import at_least_float32

EMPTY = torch.Size()


class CodeGrid(Distribution):
    """q(z|x) = a point mass on the code grid k(x) (B, h, w): every draw is k(x), log q = 0
    there (and -inf elsewhere), so log p(x, z) - log q(z|x) is the same for every draw."""

    arg_constraints: dict = {}
    support = constraints.integer_interval(0, 2**62)
    has_rsample = False
    #: every draw is the same: an importance-sampled estimate is exact with one draw
    point_mass = True

    def __init__(self, indices: Tensor) -> None:
        self.indices = indices
        super().__init__(indices.shape[:1], indices.shape[1:], validate_args=None)

    def sample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        return self.indices.expand(*sample_shape, *self.indices.shape)

    def rsample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        raise ConfigError(
            "model=vqvae has a point-mass posterior on discrete codes, which has no "
            "reparameterised draws: train it with objective=vq (straight-through gradients)"
        )

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        same = (value == self.indices).flatten(-2).all(-1)
        return torch.where(same, 0.0, -math.inf).to(torch.float32)

    @property
    def mean(self) -> Tensor:
        return self.indices


def uniform_codes(n_codes: int, grid: tuple[int, int], like: Tensor) -> Distribution:
    """p(k) = 1/K at every position, independently: log p = -h w log K."""
    logits = like.new_zeros(*grid, n_codes)
    return Independent(Categorical(logits=logits), 2)


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the positions before the centre in raster order (type A),
    or those and the centre (type B) (van den Oord et al. 2016, PixelCNN)."""

    def __init__(self, mask_type: str, n_in: int, n_out: int, kernel: int) -> None:
        super().__init__(n_in, n_out, kernel, padding=kernel // 2)
        mask = torch.ones_like(self.weight)
        centre = kernel // 2
        mask[:, :, centre, centre + (mask_type == "B") :] = 0
        mask[:, :, centre + 1 :] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """Logits (N, K, h, w) of each position's code given the codes before it: an embedding of
    the codes, a 7x7 type-A masked convolution, `n_layers` residual blocks of ReLU + 3x3 type-B
    masked convolutions, and 1x1 convolutions to K logits."""

    def __init__(self, n_codes: int, channels: int = 64, n_layers: int = 6) -> None:
        super().__init__()
        require_int("model.prior_channels", channels, 1)
        require_int("model.prior_layers", n_layers, 0)
        self.n_codes = n_codes
        self.embed = nn.Embedding(n_codes, channels)
        self.first = MaskedConv2d("A", channels, channels, 7)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), MaskedConv2d("B", channels, channels, 3))
            for _ in range(n_layers)
        )
        self.out = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, n_codes, 1)
        )

    def forward(self, codes: Tensor) -> Tensor:  # (N, h, w) -> (N, K, h, w)
        h = self.first(self.embed(codes).movedim(-1, 1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class AutoregressiveCodes(Distribution):
    """p(k) = prod_i p(k_i | k_<i) over the grid in raster order, from a PixelCNN."""

    arg_constraints: dict = {}
    support = constraints.integer_interval(0, 2**62)

    def __init__(self, net: PixelCNN, grid: tuple[int, int]) -> None:
        self.net, self.grid = net, grid
        super().__init__(EMPTY, torch.Size(grid), validate_args=None)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        codes = value.long().reshape(-1, *self.grid)  # (N, h, w)
        log_p = torch.log_softmax(at_least_float32(self.net(codes)), dim=1)
        picked = log_p.gather(1, codes[:, None]).squeeze(1)  # (N, h, w)
        return picked.flatten(1).sum(1).view(value.shape[:-2])

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        """Ancestral sampling, one position at a time (h w network passes)."""
        n = math.prod(sample_shape)
        device = self.net.embed.weight.device
        codes = torch.zeros(n, *self.grid, dtype=torch.long, device=device)
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                logits = at_least_float32(self.net(codes)[:, :, i, j])
                codes[:, i, j] = Categorical(logits=logits).sample()
        return codes.view(*sample_shape, *self.grid)


# --- networks -----------------------------------------------------------------------------------

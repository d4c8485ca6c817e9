"""Images with ground-truth factors of variation: the factor grid and the sources built on it.

A factor source holds every combination of its factors once, in grid order (the last factor
varies fastest), so the image with factor indices (i_1, ..., i_F) is row `FactorSpace.index(...)`
of the grid: the disentanglement metrics (vaelab.evaluation.disentanglement) draw images with
chosen factors by indexing, as disentanglement_lib does. A source's labels are the factor
indices, (N, F) int64; `factors` names them and gives their values. Such sources have no test
split of their own (the literature evaluates on the training distribution): `test` is a fixed
sample of `test_size` grid images (seed 0), which training also sees. The sources:
vaelab.data.dsprites.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vaelab.data.sources import ImageSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FactorSpace:
    """Named discrete factors: `values[f]` are factor f's values, in index order."""

    names: tuple[str, ...]
    values: tuple[Tensor, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.values)

    def __len__(self) -> int:
        return math.prod(self.sizes)

    def index(self, factors: Tensor) -> Tensor:
        """Rows of the grid of factor indices (..., F): the last factor varies fastest."""
        flat = torch.zeros(factors.shape[:-1], dtype=torch.long, device=factors.device)
        for f, size in enumerate(self.sizes):
            flat = flat * size + factors[..., f]
        return flat

    def grid(self) -> Tensor:
        """Every combination's factor indices, (len(self), F), in grid order."""
        axes = [torch.arange(n) for n in self.sizes]
        return torch.cartesian_prod(*axes).reshape(len(self), len(self.sizes))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n factor-index vectors drawn uniformly, (n, F)."""
        columns = [torch.randint(size, (n,), generator=generator) for size in self.sizes]
        return torch.stack(columns, dim=1)

    def value(self, factors: Tensor) -> Tensor:
        """Factor values of factor indices (..., F), float64."""
        columns = [self.values[f].double()[factors[..., f]] for f in range(len(self.sizes))]
        return torch.stack(columns, dim=-1)


class FactorSource(ImageSource):
    """An image source over a full factor grid: `grid_images(data_dir)` is every image in grid
    order (read once and kept); `read("train")` is the whole grid with its factor indices,
    `read("test")` a fixed sample of `test_size` of them."""

    factors: FactorSpace
    test_size: int = 10000
    _grid: Tensor | None = None

    def grid_images(self, data_dir: str | Path) -> Tensor:
        """(len(factors), C, H, W) uint8, in grid order."""
        if self._grid is None:
            self._grid = self.load_grid(data_dir)
        return self._grid

    def load_grid(self, data_dir: str | Path) -> Tensor:
        raise NotImplementedError

    def read(self, data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
        images = self.grid_images(data_dir)  # first: a file may carry the factors' values
        factors = self.factors.grid()
        if split == "train":
            return images, factors
        n = min(self.test_size, len(images))
        rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
        return images[rows], factors[rows]

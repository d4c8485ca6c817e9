"""dSprites and a dSprites-like grid (factor sources, vaelab.data.factors).

- `DSprites` (Matthey et al. 2017): the real file, dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz
  (737,280 binary 64x64 images; shape 3 x scale 6 x orientation 40 x posX 32 x posY 32), read from
  `<data_dir>/dsprites/` and checked against the official file's git blob hash.
- `DSpritesLike`: the same factor grid rendered here (square, ellipse, heart; scales 0.5-1; 40
  orientations over [0, 2 pi]; 32 x 32 positions), deterministic, at 64x64 or any other size,
  cached in `<data_dir>/dsprites_like/`. It is dSprites-like, not dSprites: the original renderer
  was never released, so the shapes' outlines and the position range differ from the file's;
  figures on it are not comparable with papers' dSprites figures digit for digit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import urllib.error
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from vaelab.data.factors import FactorSource, FactorSpace
from vaelab.errors import DataError, one_line, require, require_int

log = logging.getLogger(__name__)
DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_URL = f"https://github.com/google-deepmind/dsprites-dataset/raw/master/{DSPRITES_FILE}"
#: git's blob hash of the official file (sha1 of "blob <size>\0" + its bytes)
DSPRITES_BLOB = "d98996d3f8ee1550e06b9d4ed78d0beb478910d5"
DSPRITES_FACTORS = ("shape", "scale", "orientation", "posX", "posY")
DSPRITES_SIZES = (3, 6, 40, 32, 32)


def git_blob_hash(path: Path) -> str:
    """The hash git gives the file's contents (what GitHub shows for it), read in chunks."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class DSprites(FactorSource):
    """The dSprites file (see the module docstring); `verify=false` reads a file whose hash
    differs (a re-saved copy, or a small file in its format for tests)."""

    name = "dsprites"
    image_shape = (1, 64, 64)
    sizes: ClassVar[tuple[int, ...]] = DSPRITES_SIZES

    def __init__(self, verify: bool = True, test_size: int = 10000) -> None:
        require_int("data.source.test_size", test_size, 1)
        self.verify = verify
        self.test_size = test_size
        self._factors: FactorSpace | None = None

    @property
    def factors(self) -> FactorSpace:  # the values come from the file
        if self._factors is None:
            raise DataError("dsprites: the factors are known once its file is read")
        return self._factors

    def path(self, data_dir) -> Path:
        return self.folder(data_dir) / DSPRITES_FILE

    def missing(self, data_dir) -> list[str]:
        return [] if self.path(data_dir).is_file() else [DSPRITES_FILE]

    def download(self, data_dir) -> None:
        from torchvision.datasets.utils import download_url

        try:
            download_url(DSPRITES_URL, str(self.folder(data_dir)), DSPRITES_FILE)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise DataError(
                f"dsprites file missing in {self.folder(data_dir)}: {DSPRITES_FILE}, and the "
                f"download failed ({type(e).__name__}: {one_line(e)}); set VAELAB_DATA_DIR or "
                "paths.data_dir to the data root that holds dsprites/, or use "
                "data=dsprites_like (rendered here, no download)"
            ) from e

    def load_grid(self, data_dir) -> Tensor:
        path = self.path(data_dir)
        if not path.is_file():
            raise DataError(f"dsprites file missing: {path}")
        if self.verify:
            actual = git_blob_hash(path)
            if actual != DSPRITES_BLOB:
                raise DataError(
                    f"{path} has git blob hash {actual}, the official file has {DSPRITES_BLOB}: "
                    "it is corrupt or not the original (download it again, or "
                    "data.source.verify=false to read it anyway)"
                )
        try:
            with np.load(path, allow_pickle=False) as data:
                images = data["imgs"]
                classes = data["latents_classes"]
                values = data["latents_values"]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(
                f"{path} is not the dSprites file (needs arrays imgs, latents_classes, "
                f"latents_values; {type(e).__name__}: {e})"
            ) from e
        if images.ndim != 3 or classes.ndim != 2 or classes.shape[1] != 6:
            raise DataError(
                f"{path}: imgs {images.shape} and latents_classes {classes.shape} are not "
                "dSprites' (N, 64, 64) and (N, 6)"
            )
        sizes = tuple(int(n) for n in classes[:, 1:].max(0) + 1)
        if self.verify and sizes != self.sizes:
            raise DataError(f"{path}: factor sizes {sizes}, dSprites has {self.sizes}")
        names = DSPRITES_FACTORS
        factor_values = []
        for f in range(len(names)):
            column = torch.zeros(sizes[f], dtype=torch.float64)
            column[torch.as_tensor(classes[:, f + 1])] = torch.as_tensor(values[:, f + 1])
            factor_values.append(column)
        self._factors = FactorSpace(names, tuple(factor_values))
        order = self._factors.index(torch.as_tensor(classes[:, 1:], dtype=torch.long))
        if len(order) != len(self._factors) or not torch.equal(
            torch.sort(order).values, torch.arange(len(order))
        ):
            raise DataError(
                f"{path}: its {len(order)} images are not one of each of the "
                f"{'x'.join(map(str, sizes))} factor combinations"
            )
        grid = torch.empty((len(order), 1, *images.shape[1:]), dtype=torch.uint8)
        grid[order] = torch.as_tensor(images, dtype=torch.uint8).unsqueeze(1) * 255
        self.image_shape = (1, *images.shape[1:])
        return grid


# --- the procedural dSprites-like grid -----------------------------------------------------------

SHAPES = ("square", "ellipse", "heart")


def inside(shape: str, u: Tensor, v: Tensor) -> Tensor:
    """Whether local coordinates (u right, v down; the sprite's radius is 1) are in the shape."""
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.75
    if shape == "ellipse":
        return u.square() + (v / 0.5).square() <= 1
    x, y = 1.2 * u, 0.12 - 1.2 * v  # the heart curve (x^2 + y^2 - 1)^3 = x^2 y^3, y up
    return (x.square() + y.square() - 1).pow(3) - x.square() * y.pow(3) <= 0


class DSpritesLike(FactorSource):
    """The dSprites factor grid rendered procedurally (see the module docstring).

    Geometry, in units of the image width: a sprite of scale s has radius 0.16 s; position p in
    [0, 1] puts its centre at 0.2 + 0.6 p; orientation t rotates it by t. A pixel is on when its
    centre lies inside the shape (binary images, like dSprites). `n_scales`, `n_orientations`,
    `n_positions` shrink the grid (tests; the defaults are dSprites' 6, 40, 32); the image size
    is `data.image_size` (default 64)."""

    name = "dsprites_like"
    image_shape = (1, 64, 64)

    def __init__(
        self,
        n_scales: int = 6,
        n_orientations: int = 40,
        n_positions: int = 32,
        test_size: int = 10000,
        cache: bool = True,
    ) -> None:
        for key, value in (
            ("n_scales", n_scales),
            ("n_orientations", n_orientations),
            ("n_positions", n_positions),
            ("test_size", test_size),
        ):
            require_int(f"data.source.{key}", value, 1)
        self.cache = cache
        self.test_size = test_size
        self.factors = FactorSpace(
            DSPRITES_FACTORS,
            (
                torch.arange(len(SHAPES), dtype=torch.float64) + 1,  # dSprites' shape values 1-3
                torch.linspace(0.5, 1, n_scales, dtype=torch.float64),
                torch.linspace(0, 2 * math.pi, n_orientations, dtype=torch.float64),
                torch.linspace(0, 1, n_positions, dtype=torch.float64),
                torch.linspace(0, 1, n_positions, dtype=torch.float64),
            ),
        )

    def resize(self, size: int) -> None:
        require(size >= 8, f"data.image_size={size}: dsprites_like renders 8x8 or larger")
        self.image_shape = (1, size, size)

    def missing(self, data_dir) -> list[str]:
        return []  # rendered on first use

    def cache_path(self, data_dir) -> Path:
        sizes = "x".join(map(str, self.factors.sizes))
        return self.folder(data_dir) / f"dsprites_like_{sizes}_{self.image_shape[1]}px.npz"

    def load_grid(self, data_dir) -> Tensor:
        path = self.cache_path(data_dir)
        shape = (len(self.factors), *self.image_shape)
        if self.cache and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    bits = np.unpackbits(data["bits"])[: math.prod(shape)]
                return torch.from_numpy(bits.reshape(shape) * np.uint8(255))
            except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
                log.warning("dsprites_like: %s is unreadable (%s); rendering again", path, e)
        images = self.render()
        if self.cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                packed = np.packbits(images.numpy().astype(bool))
                np.savez(path.with_suffix(".tmp.npz"), bits=packed)
                path.with_suffix(".tmp.npz").replace(path)
            except OSError as e:  # a read-only data root: render again next time
                log.warning("dsprites_like: cannot cache the rendered grid at %s (%s)", path, e)
        return images * 255

    def render(self) -> Tensor:
        """Every image of the grid, (N, 1, H, W) uint8 in {0, 1}, in grid order."""
        size = self.image_shape[1]
        pixels = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres
        _, scales, orientations, xs, ys = (v.float() for v in self.factors.values)
        cx, cy = 0.2 + 0.6 * xs, 0.2 + 0.6 * ys
        n_x, n_y = len(xs), len(ys)
        out = torch.empty((len(self.factors), 1, size, size), dtype=torch.uint8)
        row = 0
        for shape in SHAPES:
            for s in scales:
                radius = 0.16 * s
                dx = (pixels[None, :] - cx[:, None]) / radius  # (Px, W)
                dy = (pixels[None, :] - cy[:, None]) / radius  # (Py, H)
                for t in orientations:
                    c, sn = math.cos(t), math.sin(t)
                    ddx, ddy = dx[:, None, None, :], dy[None, :, :, None]  # (Px, Py, H, W)
                    u, v = c * ddx + sn * ddy, c * ddy - sn * ddx
                    block = inside(shape, u, v).reshape(n_x * n_y, 1, size, size)
                    out[row : row + len(block)] = block
                    row += len(block)
        return out

    def __repr__(self) -> str:
        return f"DSpritesLike(sizes={self.factors.sizes}, image={self.image_shape})"


__all__ = ["DSprites", "DSpritesLike", "FactorSource", "FactorSpace", "git_blob_hash"]

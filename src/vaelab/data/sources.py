"""Image sources: the one thing a dataset must provide to the generic `ImageDataModule`.

A source reads a dataset's files into memory as uint8 images (N, C, H, W) and int64 labels (N,)
(`read`), says which files are missing (`missing`), fetches them where it knows how
(`download`), and may offer a per-sample dataset for data that do not fit in memory
(`per_sample`). Splits, binarisation and dequantisation, device caching, resumable loading and
DDP shards are the DataModule's; a new dataset is one small class here and one YAML in
configs/data/ (on the shared base, `configs/data/base/image.yaml`).
"""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import ClassVar

import torch
import torchvision
from torch import Tensor

from vaelab.data.datasets import load_split, missing_files, raw_folder
from vaelab.errors import DataError, one_line


class ImageSource:
    """Base class. `name` names the dataset in messages and file paths; `image_shape` is
    (C, H, W) of every image; `splits` are the splits the files hold ("train", "test"; a
    "val" split is carved from train by the DataModule unless the source has one).

    `root` (the DataModule's `data.root`) is the dataset's own folder when the user names it;
    otherwise `folder(data_dir)` finds it under the data root (`default_folder`). `resize(size)`
    (the DataModule's `data.image_size`) asks for size x size images: a source of fixed-size
    files accepts only its own size; one that resizes (CelebA, image folders) overrides it."""

    name: ClassVar[str]
    image_shape: tuple[int, int, int]
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    root: Path | None = None
    #: The ground-truth factors of the images (vaelab.data.factors.FactorSpace) where the
    #: source has them (its labels are then factor indices, and it has `grid_images`), else None.
    factors = None

    def default_folder(self, data_dir: str | Path) -> Path:
        """Where this dataset's files live under the data root."""
        return Path(data_dir).expanduser().resolve() / self.name

    def folder(self, data_dir: str | Path) -> Path:
        """The folder the files are read from: `root` when set, else under the data root."""
        if self.root is not None:
            return Path(self.root).expanduser().resolve()
        return self.default_folder(data_dir)

    def resize(self, size: int) -> None:
        """Serve size x size images (the DataModule's `data.image_size`)."""
        _, h, w = self.image_shape
        if (h, w) != (size, size):
            raise DataError(
                f"data.image_size={size}: {self.name} images are {h}x{w} and this source does "
                f"not resize them (celeba and image_folder do); leave data.image_size null"
            )

    def missing(self, data_dir: str | Path) -> list[str]:
        """Names of the files that are absent (empty: ready to read)."""
        raise NotImplementedError

    def download(self, data_dir: str | Path) -> None:
        """Fetch the files (raise DataError naming what failed)."""
        raise DataError(
            f"{self.name} cannot be downloaded; put its files in {self.folder(data_dir)}"
        )

    def read(self, data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
        """(images (N, C, H, W) uint8, labels (N,) int64) of one split."""
        raise NotImplementedError

    def per_sample(self, data_dir: str | Path, split: str) -> torch.utils.data.Dataset:
        """A map-style dataset of (uint8 image (C, H, W), label), read one file at a time."""
        raise NotImplementedError(f"{self.name} has no per-sample path; use data.in_memory=true")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IDXSource(ImageSource):
    """28x28 grayscale datasets in torchvision's `<Name>/raw/` IDX layout (gzip-compressed or
    not), read directly; torchvision downloads and md5-checks them when they are absent."""

    torchvision_class: ClassVar[type[torchvision.datasets.MNIST]]
    image_shape = (1, 28, 28)

    def default_folder(self, data_dir: str | Path) -> Path:
        return raw_folder(data_dir, self.name)

    def missing(self, data_dir: str | Path) -> list[str]:
        return missing_files(data_dir, self.name, self.folder(data_dir))

    def download(self, data_dir: str | Path) -> None:
        folder = self.folder(data_dir)
        missing = self.missing(data_dir)
        try:
            for train in (True, False):
                self.torchvision_class(str(folder.parent.parent), train=train, download=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise DataError(
                f"{self.name} files missing in {folder}: {', '.join(missing)} (or .gz), and "
                f"the download failed ({type(e).__name__}: {one_line(e)}); set VAELAB_DATA_DIR or "
                f"paths.data_dir to the folder that holds {self.name}/raw/"
            ) from e

    def read(self, data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
        return load_split(
            data_dir, self.name, split == "train", self.image_shape[1:], self.folder(data_dir)
        )

    def per_sample(self, data_dir: str | Path, split: str) -> torch.utils.data.Dataset:
        """torchvision's dataset (one PIL image at a time); it needs the uncompressed files."""
        try:
            return self.torchvision_class(
                str(data_dir),
                train=split == "train",
                download=False,
                transform=torchvision.transforms.PILToTensor(),
            )
        except RuntimeError as e:
            raise DataError(
                f"data.in_memory=false reads through torchvision, which needs the uncompressed "
                f"files in {self.folder(data_dir)} ({e}); run once with data.download=true on a "
                "writable data root, or use data.in_memory=true"
            ) from e


class MNIST(IDXSource):
    """LeCun et al. (1998) handwritten digits."""

    name = "MNIST"
    torchvision_class = torchvision.datasets.MNIST


class FashionMNIST(IDXSource):
    """Xiao et al. (2017) Zalando article images."""

    name = "FashionMNIST"
    torchvision_class = torchvision.datasets.FashionMNIST


__all__ = ["FashionMNIST", "IDXSource", "ImageSource", "MNIST"]

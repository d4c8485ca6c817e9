"""Sources of natural images decoded from files (vaelab.data.decoding): CelebA, in the layout
torchvision downloads, and any folder of PNG / JPEG files, in torchvision's `ImageFolder`
conventions. They decode one file at a time (`per_sample`, in DataLoader worker processes with
`data.num_workers`), which `data.in_memory=false` uses for data that do not fit in memory, or
all at once into memory (`read`). (CIFAR-10 and SVHN, read whole: vaelab.data.official.)
"""

from __future__ import annotations

import logging
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import torch
import torchvision
from torch import Tensor

from vaelab.data.decoding import ImageFiles
from vaelab.data.sources import ImageSource
from vaelab.errors import DataError, one_line, require, require_int

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DOWNLOAD_ERRORS = (urllib.error.URLError, OSError, RuntimeError)


def download_failed(source: ImageSource, data_dir, missing: list[str], error: Exception):
    return DataError(
        f"{source.name} files missing in {source.folder(data_dir)}: {', '.join(missing)}, and "
        f"the download failed ({type(error).__name__}: {one_line(error)}); set VAELAB_DATA_DIR or "
        f"paths.data_dir to the data root that holds them, or data.root to their folder"
    )


class ResizingSource(ImageSource):
    """A source whose images are decoded from files at a chosen `image_size`."""

    image_size: int
    channels: int = 3

    def resize(self, size: int) -> None:
        require_int("data.image_size", size, 1)
        self.image_size = size
        self.image_shape = (self.channels, size, size)

    def per_sample(self, data_dir, split: str) -> ImageFiles:
        raise NotImplementedError

    def read(self, data_dir, split: str) -> tuple[Tensor, Tensor]:
        return self.per_sample(data_dir, split).read_all()


class CelebA(ResizingSource):
    """Liu et al. (2015) aligned celebrity faces, 202,599 178x218 JPEGs, in torchvision's
    layout: `<data root>/celeba/img_align_celeba/*.jpg` and `list_eval_partition.txt` (the
    official train / valid / test partition: 162,770 / 19,867 / 19,962). The usual 64x64
    protocol: a centred 148x148 crop resized to 64x64 (`crop: 148`, `data.image_size: 64`);
    `crop: null` resizes the whole aligned image's shorter side and crops the centre square.
    At 64x64 the set is 2.4 GB as uint8: the CelebA config reads it per sample (in_memory=false)
    with worker processes."""

    name = "CelebA"
    splits = ("train", "val", "test")
    PARTITIONS: ClassVar[dict[str, str]] = {"0": "train", "1": "val", "2": "test"}

    def __init__(self, image_size: int = 64, crop: int | None = 148) -> None:
        if crop is not None:
            require_int("data.source.crop", crop, 1)
        self.crop = crop
        self.resize(image_size)

    def default_folder(self, data_dir) -> Path:
        return Path(data_dir).expanduser().resolve() / "celeba"

    def missing(self, data_dir) -> list[str]:
        folder = self.folder(data_dir)
        wanted = ["img_align_celeba", "list_eval_partition.txt"]
        return [name for name in wanted if not (folder / name).exists()]

    def download(self, data_dir) -> None:
        missing = self.missing(data_dir)
        try:
            torchvision.datasets.CelebA(
                str(self.folder(data_dir).parent), split="all", target_type=[], download=True
            )
        except DOWNLOAD_ERRORS as e:
            raise download_failed(self, data_dir, missing, e) from e

    def per_sample(self, data_dir, split: str) -> ImageFiles:
        folder = self.folder(data_dir)
        partition = folder / "list_eval_partition.txt"
        names = []
        for number, line in enumerate(partition.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or fields[1] not in self.PARTITIONS:
                raise DataError(f"{partition} line {number} is {line!r}, expected '<file> <0|1|2>'")
            if self.PARTITIONS[fields[1]] == split:
                names.append(fields[0])
        paths = [folder / "img_align_celeba" / name for name in names]
        return ImageFiles(paths, [0] * len(paths), "RGB", self.image_size, self.crop)

    def __repr__(self) -> str:
        return f"CelebA(image_size={self.image_size}, crop={self.crop})"


class ImageFolder(ResizingSource):
    """Any folder tree of PNG / JPEG files, in torchvision's `ImageFolder` conventions: with
    class sub-folders, the label of an image is the index of its sub-folder in sorted order
    (files directly in the root are then left out); without, every image has label 0. Each
    image is converted to grey (`channels: 1`) or RGB, its shorter side resized to
    `data.image_size` and the centre square kept. Held-out splits: a permutation of the sorted
    files seeded by `split_seed`, `test_fraction` of them for test, `val_fraction` for
    validation. An image that fails to decode stops the run with one line naming it
    (`on_error: raise`), or (`on_error: skip`) every file is decoded once up front and the ones
    that fail are left out, with one warning that counts them."""

    name = "ImageFolder"
    splits = ("train", "val", "test")
    ON_ERROR = ("raise", "skip")

    def __init__(
        self,
        channels: int = 3,
        image_size: int = 64,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        on_error: str = "raise",
    ) -> None:
        require(channels in (1, 3), f"data.source.channels must be 1 or 3, got {channels!r}")
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            require(
                isinstance(value, int | float) and 0 < value < 1,
                f"data.source.{key} must be in (0, 1), got {value!r}",
            )
        require(
            on_error in self.ON_ERROR,
            f"data.source.on_error must be raise or skip, got {on_error!r}",
        )
        require_int("data.source.split_seed", split_seed, 0)
        self.channels = channels
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed = split_seed
        self.on_error = on_error
        self.resize(image_size)
        self._listing: tuple[Path, dict[str, tuple[list[Path], list[int]]]] | None = None

    def default_folder(self, data_dir) -> Path:
        return Path(data_dir).expanduser().resolve() / "images"

    def missing(self, data_dir) -> list[str]:
        folder = self.folder(data_dir)
        return [] if folder.is_dir() and any(self._images_in(folder)) else [str(folder)]

    def download(self, data_dir) -> None:
        raise DataError(
            f"no images in {self.folder(data_dir)} (looked for "
            f"{', '.join(IMAGE_EXTENSIONS)}, in sub-folders too); an image folder is not "
            "downloaded: set data.root to the folder that holds your images"
        )

    @staticmethod
    def _images_in(folder: Path, recursive: bool = True):
        pattern = "**/*" if recursive else "*"
        return (
            p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )

    def _files(self, folder: Path) -> tuple[list[Path], list[int]]:
        classes = sorted(d for d in folder.iterdir() if d.is_dir() and any(self._images_in(d)))
        if classes:
            paths, labels = [], []
            for label, sub in enumerate(classes):
                found = sorted(self._images_in(sub))
                paths += found
                labels += [label] * len(found)
            left_out = sum(1 for _ in self._images_in(folder, recursive=False))
            if left_out:
                log.warning(
                    "%d images directly in %s left out: with class sub-folders, images go in them",
                    left_out,
                    folder,
                )
            return paths, labels
        paths = sorted(self._images_in(folder, recursive=False))
        return paths, [0] * len(paths)

    def _skip_undecodable(self, paths: list[Path], labels: list[int]):
        good = ImageFiles(paths, labels, self.mode, self.image_size, None)

        def ok(i: int) -> bool:
            try:
                good[i]
                return True
            except DataError:
                return False

        with ThreadPoolExecutor(max_workers=8) as pool:
            keep = list(pool.map(ok, range(len(paths))))
        bad = [p for p, k in zip(paths, keep, strict=True) if not k]
        if bad:
            log.warning(
                "skipped %d of %d images that cannot be decoded (data.source.on_error=skip), "
                "the first: %s",
                len(bad),
                len(paths),
                bad[0],
            )
        pairs = [(p, y) for p, y, k in zip(paths, labels, keep, strict=True) if k]
        return [p for p, _ in pairs], [y for _, y in pairs]

    def _splits(self, data_dir) -> dict[str, tuple[list[Path], list[int]]]:
        folder = self.folder(data_dir)
        if self._listing is not None and self._listing[0] == folder:
            return self._listing[1]
        if not folder.is_dir():
            raise DataError(f"data.root={folder} is not a folder")
        paths, labels = self._files(folder)
        if self.on_error == "skip":
            paths, labels = self._skip_undecodable(paths, labels)
        if not paths:
            raise DataError(
                f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}, in class "
                "sub-folders or directly in it)"
            )
        n = len(paths)
        n_test, n_val = round(self.test_fraction * n), round(self.val_fraction * n)
        if min(n_test, n_val, n - n_test - n_val) < 1:
            raise DataError(
                f"{n} images in {folder} cannot be split into test_fraction="
                f"{self.test_fraction}, val_fraction={self.val_fraction} and a training set, "
                "each non-empty"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        parts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        splits = {
            split: ([paths[i] for i in index.tolist()], [labels[i] for i in index.tolist()])
            for split, index in parts.items()
        }
        self._listing = (folder, splits)
        return splits

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def per_sample(self, data_dir, split: str) -> ImageFiles:
        paths, labels = self._splits(data_dir)[split]
        return ImageFiles(paths, labels, self.mode, self.image_size, None)

    def __repr__(self) -> str:
        return (
            f"ImageFolder(channels={self.channels}, image_size={self.image_size}, "
            f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction})"
        )


__all__ = ["CelebA", "ImageFolder"]

"""LightningDataModules for the MNIST family.

The DataModule is the one place that knows the data: its image shape (the model is built from
it), its pixel model (binary or 8-bit, and so how bits per dimension are computed) and how stored
pixels become model inputs. Splits: validation carved from the training set with a fixed seed;
the real test set for testing.

Binarisation (`binarize`):
- `dynamic`: training images are resampled x ~ Bernoulli(intensity) every time they are drawn
  (on the device, per batch); validation and test images are binarised once with `binarize_seed`
  so evaluation numbers are deterministic.
- `static`: every split binarised once with `binarize_seed`.
- `none`: 8-bit intensities; with `dequantize` (default) x = (pixel + u) / 256, u ~ U(0, 1), so a
  density on [0, 1] bounds the probability of the 8-bit image (Theis et al. 2016) and bits per
  dimension are comparable with the literature; without it x = pixel / 255 and bpd is undefined.
"""

from __future__ import annotations

import math
import urllib.error
from typing import ClassVar

import lightning as L
import torch
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader

from vaelab.data.datasets import (
    InMemoryImages,
    as_batch,
    load_split,
    missing_files,
    raw_folder,
)
from vaelab.errors import DataError, require

BINARIZE_MODES = ("dynamic", "static", "none")


class MNISTFamilyDataModule(L.LightningDataModule):
    """28x28 grayscale datasets stored in torchvision's `<Name>/raw/` IDX layout."""

    torchvision_class: ClassVar[type[torchvision.datasets.MNIST]]
    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 128,
        binarize: str = "dynamic",
        dequantize: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        binarize_seed: int = 0,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        require(
            binarize in BINARIZE_MODES,
            f"data.binarize must be one of {', '.join(BINARIZE_MODES)}; got {binarize!r}",
        )
        require(batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}")
        require(
            eval_batch_size is None or eval_batch_size >= 1,
            f"data.eval_batch_size must be >= 1 or null, got {eval_batch_size}",
        )
        require(val_size >= 1, f"data.val_size must be >= 1, got {val_size}")
        require(num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}")
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.binarize = binarize
        self.dequantize = dequantize
        self.val_size = val_size
        self.split_seed = split_seed
        self.binarize_seed = binarize_seed
        self.num_workers = num_workers
        self.download = download
        self.splits: dict[str, InMemoryImages] = {}

    @property
    def name(self) -> str:
        return self.torchvision_class.__name__

    # --- what the model and the metrics need to know --------------------------------------
    @property
    def num_dims(self) -> int:
        """D, the number of pixel values per example."""
        return math.prod(self.image_shape)

    @property
    def bpd_offset(self) -> float | None:
        """Nats per dimension added to -log p(x)/D before converting to bits (None: undefined).

        Binary data: 0 (log p is already a log-probability). Dequantised 8-bit data: ln 256, the
        log of the bin width 1/256 that turns a density into the probability of a pixel value.
        """
        if self.binarize != "none":
            return 0.0
        return math.log(256) if self.dequantize else None

    @property
    def pixel_model(self) -> str:
        """How the numbers should be read; printed beside bits per dimension."""
        if self.binarize != "none":
            return f"binary pixels ({self.binarize} binarisation); bpd = nll / (D ln 2)"
        if self.dequantize:
            return "8-bit pixels, uniformly dequantised; bpd = (nll / D + ln 256) / ln 2"
        return "continuous pixels in [0, 1] without dequantisation; bpd undefined"

    # --- Lightning hooks --------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download once (rank zero) if files are missing and downloading is allowed."""
        missing = missing_files(self.data_dir, self.name)
        if not missing:
            return
        folder = raw_folder(self.data_dir, self.name)
        hint = f"set VAELAB_DATA_DIR or paths.data_dir to the folder that holds {self.name}/raw/"
        if not self.download:
            raise DataError(
                f"{self.name} files missing in {folder}: {', '.join(missing)} (or .gz), "
                f"and data.download=false; {hint}"
            )
        try:
            for train in (True, False):
                self.torchvision_class(str(folder.parent.parent), train=train, download=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise DataError(
                f"{self.name} files missing in {folder}: {', '.join(missing)} (or .gz), and "
                f"the download failed ({type(e).__name__}: {e}); {hint}"
            ) from e

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and "train" not in self.splits:
            images, labels = load_split(self.data_dir, self.name, True, self.image_shape[1:])
            require(
                self.val_size < len(images),
                f"data.val_size={self.val_size} leaves no training images "
                f"({len(images)} in the {self.name} training set)",
            )
            order = torch.randperm(
                len(images), generator=torch.Generator().manual_seed(self.split_seed)
            )
            val, train = order[: self.val_size], order[self.val_size :]
            self.splits["train"] = self._pixels(images[train], labels[train], "train")
            self.splits["val"] = self._pixels(images[val], labels[val], "val")
        if stage in ("test", None) and "test" not in self.splits:
            images, labels = load_split(self.data_dir, self.name, False, self.image_shape[1:])
            self.splits["test"] = self._pixels(images, labels, "test")
        if "train" in self.splits:
            n_train = len(self.splits["train"])
            require(
                self.batch_size <= n_train,
                f"data.batch_size={self.batch_size} is larger than the training split "
                f"({n_train} images)",
            )

    def _pixels(self, images: Tensor, labels: Tensor, split: str) -> InMemoryImages:
        """Binarise once where the mode says so (stored as bool), else keep uint8."""
        fixed = self.binarize == "static" or (self.binarize == "dynamic" and split != "train")
        if fixed:
            seed = 3 * self.binarize_seed + ("train", "val", "test").index(split)
            g = torch.Generator().manual_seed(seed)
            images = torch.bernoulli(images.float() / 255, generator=g).bool()
        return InMemoryImages(images, labels)

    def preprocess(self, images: Tensor) -> Tensor:
        """Stored pixels (bool or uint8, on any device) -> float model inputs in [0, 1]."""
        if images.dtype == torch.bool:
            return images.float()
        intensity = images.float()
        if self.binarize == "dynamic":
            return torch.bernoulli(intensity / 255)
        if self.dequantize:
            # u in [0, 1); the clamp stops float32 rounding pixel + u up to pixel + 1.
            noisy = intensity + torch.rand_like(intensity)
            return torch.minimum(noisy, intensity + (1 - 2**-16)) / 256
        return intensity / 255

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int):
        images, labels = batch
        return self.preprocess(images), labels

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def _loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=as_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class MNISTDataModule(MNISTFamilyDataModule):
    """LeCun et al. (1998) handwritten digits; binarised for Bernoulli likelihoods."""

    torchvision_class = torchvision.datasets.MNIST


class FashionMNISTDataModule(MNISTFamilyDataModule):
    """Xiao et al. (2017) Zalando article images."""

    torchvision_class = torchvision.datasets.FashionMNIST

"""The splits of a dataset, for the DataModule: validation carved from the training set with a
fixed seed (unless the source has its own split), the real test set for testing; images binarised
once where the mode says so (`static`, and the evaluation splits of `dynamic`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vaelab.data.datasets import FixedBinarization, InMemoryImages
from vaelab.data.sources import ImageSource
from vaelab.errors import DataError, require

SPLITS = ("train", "val", "test")


@dataclass
class Splitter:
    source: ImageSource
    data_dir: str
    image_shape: tuple[int, ...]
    val_size: int
    split_seed: int
    binarize: str
    binarize_seed: int

    def in_memory(self, stage: str | None, splits: dict[str, InMemoryImages]) -> None:
        """The splits `stage` needs, read whole into `splits`."""
        if stage in ("fit", "validate", None) and "train" not in splits:
            if "val" in self.source.splits:  # the dataset's own validation split
                for split in ("train", "val"):
                    splits[split] = self.pixels(*self.read(split), split)
            else:
                images, labels = self.read("train")
                val, train = self.validation_indices(len(images))
                splits["train"] = self.pixels(images[train], labels[train], "train")
                splits["val"] = self.pixels(images[val], labels[val], "val")
        if stage in ("test", None) and "test" not in splits:
            splits["test"] = self.pixels(*self.read("test"), "test")

    def per_sample(self, stage: str | None, splits: dict[str, torch.utils.data.Dataset]) -> None:
        """in_memory=false: the splits as per-sample datasets; nothing is read whole, the
        validation split is carved from the indices exactly as the in-memory path carves it."""
        if stage in ("fit", "validate", None) and "train" not in splits:
            if "val" in self.source.splits:
                for split in ("train", "val"):
                    n = len(self.source.per_sample(self.data_dir, split))
                    splits[split] = self.subset(split, torch.arange(n), split)
            else:
                n = len(self.source.per_sample(self.data_dir, "train"))
                val, train = self.validation_indices(n)
                splits["train"] = self.subset("train", train, "train")
                splits["val"] = self.subset("train", val, "val")
        if stage in ("test", None) and "test" not in splits:
            n = len(self.source.per_sample(self.data_dir, "test"))
            splits["test"] = self.subset("test", torch.arange(n), "test")

    def validation_indices(self, n: int) -> tuple[Tensor, Tensor]:
        """(validation, training) indices of a training set of n images, seeded by split_seed."""
        require(
            self.val_size < n,
            f"data.val_size={self.val_size} leaves no training images "
            f"({n} in the {self.source.name} training set)",
        )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        return order[: self.val_size], order[self.val_size :]

    def read(self, split: str) -> tuple[Tensor, Tensor]:
        images, labels = self.source.read(self.data_dir, split)
        if tuple(images.shape[1:]) != self.image_shape or images.dtype != torch.uint8:
            raise DataError(
                f"{self.source.name} {split} images are {images.dtype} "
                f"{tuple(images.shape[1:])}, expected uint8 {self.image_shape}"
            )
        return images, labels

    def binarised_once(self, split: str) -> bool:
        return self.binarize == "static" or (self.binarize == "dynamic" and split != "train")

    def seed(self, split: str) -> int:
        return 3 * self.binarize_seed + SPLITS.index(split)

    def pixels(self, images: Tensor, labels: Tensor, split: str) -> InMemoryImages:
        """Binarise once where the mode says so (stored as bool), else keep uint8."""
        if self.binarised_once(split):
            g = torch.Generator().manual_seed(self.seed(split))
            images = torch.bernoulli(images.float() / 255, generator=g).bool()
        return InMemoryImages(images, labels)

    def subset(self, source_split: str, indices: Tensor, split: str) -> torch.utils.data.Dataset:
        """The source's per-sample dataset restricted to the split's indices."""
        dataset = self.source.per_sample(self.data_dir, source_split)
        subset = torch.utils.data.Subset(dataset, indices.tolist())
        if self.binarised_once(split):
            return FixedBinarization(subset, self.seed(split))
        return subset

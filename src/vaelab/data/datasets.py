"""MNIST-family datasets read straight from torchvision's file layout, held in memory.

Files live in `<data_dir>/<Name>/raw/` (torchvision's layout), gzip-compressed or not. They are
parsed here rather than through torchvision's dataset class because torchvision insists on
unpacking `.gz` files next to themselves, which fails on a read-only data folder; torchvision is
still what downloads and md5-checks them when they are absent and downloading is allowed.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
from torch import Tensor

from vaelab.errors import DataError

IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes; magic = 0x0000 08 <ndim>
SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def raw_folder(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir).expanduser().resolve() / name / "raw"


def find_file(folder: Path, stem: str) -> Path | None:
    """The uncompressed file if present, else the .gz one, else None."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def missing_files(data_dir: str | Path, name: str, folder: Path | None = None) -> list[str]:
    folder = folder or raw_folder(data_dir, name)
    stems = SPLIT_FILES[True] + SPLIT_FILES[False]
    return [stem for stem in stems if find_file(folder, stem) is None]


def read_idx(path: Path, ndim: int) -> Tensor:
    """Parse an IDX file of unsigned bytes with `ndim` dimensions into a uint8 tensor."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} is corrupt ({e}); delete it and download it again") from e
    expected_magic = (IDX_UBYTE << 8) | ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != expected_magic:
        raise DataError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes "
            f"(magic number {magic}, expected {expected_magic})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    body = memoryview(data)[header:]
    if len(body) != prod(dims):
        raise DataError(
            f"{path} is truncated or padded: its header says {'x'.join(map(str, dims))} = "
            f"{prod(dims)} bytes of data, the file holds {len(body)}"
        )
    if not body:
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*dims)


def load_split(
    data_dir: str | Path,
    name: str,
    train: bool,
    image_size: tuple[int, int],
    folder: Path | None = None,
) -> tuple[Tensor, Tensor]:
    """(images (N, 1, H, W) uint8, labels (N,) int64) of one split, from `folder` (default
    <data_dir>/<name>/raw)."""
    folder = folder or raw_folder(data_dir, name)
    image_stem, label_stem = SPLIT_FILES[train]
    image_path, label_path = find_file(folder, image_stem), find_file(folder, label_stem)
    if image_path is None or label_path is None:
        raise DataError(f"{name} files missing in {folder}: {image_stem}, {label_stem} (or .gz)")
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if tuple(images.shape[1:]) != image_size:
        raise DataError(
            f"{image_path} holds images of {images.shape[1]}x{images.shape[2]} pixels, "
            f"{name} images are {image_size[0]}x{image_size[1]}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels"
        )
    return images.unsqueeze(1), labels.long()


class InMemoryImages(torch.utils.data.Dataset):
    """Images (N, C, H, W) and labels (N,) as tensors; a batch is one indexing operation.

    `__getitems__` lets the DataLoader fetch a whole batch by advanced indexing instead of
    collating N single images (use `collate_fn=as_batch`). Images are uint8 intensities, or bool
    when already binarised; the DataModule turns them into model inputs on the device.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def as_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """collate_fn for InMemoryImages: the batch is already stacked."""
    return batch


@dataclass
class IndexBatch:
    """A batch as indices into one split's tensors, which stay on the training device
    (`data.device_cache`): only the indices travel per step. Lightning moves the dataclass's
    tensors to the device like any batch."""

    split: str
    index: Tensor


class SplitIndices(torch.utils.data.Dataset):
    """The indices 0..n-1 of a split, fetched a batch at a time as an IndexBatch."""

    def __init__(self, split: str, n: int) -> None:
        self.split = split
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> IndexBatch:
        return IndexBatch(self.split, torch.tensor([index]))

    def __getitems__(self, indices: list[int]) -> IndexBatch:
        return IndexBatch(self.split, torch.as_tensor(indices))


class FixedBinarization(torch.utils.data.Dataset):
    """Per-example binarisation of a per-sample dataset that is the same on every read: image i
    uses a generator seeded with (seed, i). For the torchvision path (`data.in_memory=false`)."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[index]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.bernoulli(image.float() / 255, generator=g).bool(), label

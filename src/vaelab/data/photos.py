"""Sources of natural images: CIFAR-10, SVHN, CelebA and any folder of PNG / JPEG files.

Each reads its files in the layout torchvision downloads (so torchvision's download code is the
one users get) or, for an image folder, torchvision's `ImageFolder` conventions, into uint8
images (N, C, H, W); see `vaelab.data.sources.ImageSource` for the contract. CIFAR-10 and SVHN
are small (150 MB and 180 MB as uint8) and are read whole; CelebA and image folders decode one
file at a time (`per_sample`, in DataLoader worker processes with `data.num_workers`), which
`data.in_memory=false` uses for data that do not fit in memory. Decoding is deterministic (a
centre crop and an antialiased resize, no random transform), so the same seed gives the same
batches on either path.
"""

from __future__ import annotations

import codecs
import logging
import pickle
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.datasets.utils import calculate_md5

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


def check_md5(path: Path, expected: str) -> None:
    """The file's md5 against torchvision's record of the official file."""
    actual = calculate_md5(str(path))
    if actual != expected:
        raise DataError(
            f"{path} has md5 {actual}, the official file has {expected}: it is corrupt or "
            "not the original (delete it and download it again, or data.source.verify=false "
            "to read it anyway)"
        )


class TensorSamples(torch.utils.data.Dataset):
    """The per-sample view of images held in memory: (uint8 image (C, H, W), int label)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded one at a time: converted to grey ("L") or "RGB", centre-cropped to
    `crop` x `crop` (None: the largest centred square, after resizing the shorter side), resized
    to `size` x `size`; (uint8 (C, H, W), int label). Picklable, for worker processes."""

    def __init__(
        self, paths: list[Path], labels: list[int], mode: str, size: int, crop: int | None
    ) -> None:
        self.paths, self.labels = paths, labels
        self.mode, self.size, self.crop = mode, size, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return decode(self.paths[index], self.mode, self.size, self.crop), self.labels[index]

    def read_all(self) -> tuple[Tensor, Tensor]:
        """Every image decoded (threads: PIL releases the GIL while decoding)."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            images = list(pool.map(lambda i: self[i][0], range(len(self))))
        return torch.stack(images), torch.tensor(self.labels, dtype=torch.int64)


def decode(path: Path, mode: str, size: int, crop: int | None) -> Tensor:
    try:
        with Image.open(path) as image:
            image = eight_bit(image, path).convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path} cannot be decoded as an image ({type(e).__name__}: {e})") from e
    if crop is not None:
        image = TF.center_crop(image, [crop, crop])
        image = TF.resize(image, [size, size], antialias=True)
    else:
        image = TF.resize(image, size, antialias=True)  # the shorter side to size
        image = TF.center_crop(image, [size, size])
    return TF.pil_to_tensor(image)


def eight_bit(image: Image.Image, path: Path) -> Image.Image:
    """8 bits per channel: a 16-bit grey image (PIL mode I;16) rescaled, v -> round(v * 255 /
    65535) (PIL's own conversion would clip every value above 255 to white); 16-bit colour PIL
    already reads as 8-bit; 32-bit integer or float pixels are refused."""
    if image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode in ("I", "F"):
        raise DataError(
            f"{path} has 32-bit {'integer' if image.mode == 'I' else 'float'} pixels; vaelab "
            "reads 8-bit and 16-bit images: convert it to an 8-bit PNG"
        )
    return image


RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array reconstructor, wherever it lives


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, numbers, bytes and strings, and nothing that runs
    code: the only globals it finds are numpy's array and dtype constructors."""

    ALLOWED: ClassVar[dict[tuple[str, str], object]] = {
        ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes, as Python 3 pickles them
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing the global {module}.{name}")
        return self.ALLOWED[module, name]


class OfficialFiles(ImageSource):
    """A small source read whole from official files that torchvision records the md5 of
    (checked unless `verify=false`); its per-sample view indexes the images held in memory."""

    verify: bool = True

    def official_file(self, data_dir, name: str, md5: str) -> Path:
        """The path of one of the source's files, there and (if verify) with its official md5."""
        path = self.folder(data_dir) / name
        if not path.is_file():
            raise DataError(f"{self.name} file missing: {path}")
        if self.verify:
            check_md5(path, md5)
        return path

    def per_sample(self, data_dir, split: str) -> torch.utils.data.Dataset:
        return TensorSamples(*self.read(data_dir, split))


class CIFAR10(OfficialFiles):
    """Krizhevsky (2009): 50,000 training and 10,000 test 32x32 colour images of 10 classes, in
    torchvision's `cifar-10-batches-py/` (the official python pickles), md5-checked against
    torchvision's record of the official files unless `verify=false`; read with
    `ArrayUnpickler`, which builds arrays and plain values only (a pickle can run code)."""

    name = "CIFAR10"
    image_shape = (3, 32, 32)
    folder_name: ClassVar[str] = "cifar-10-batches-py"

    def __init__(self, verify: bool = True) -> None:
        self.verify = verify

    def default_folder(self, data_dir) -> Path:
        return Path(data_dir).expanduser().resolve() / self.folder_name

    #: (file, md5) of each split: torchvision's record of the official files
    FILES: ClassVar[dict[str, list]] = {
        "train": [tuple(f) for f in torchvision.datasets.CIFAR10.train_list],
        "test": [tuple(f) for f in torchvision.datasets.CIFAR10.test_list],
    }

    def files(self, split: str) -> list[tuple[str, str]]:
        return self.FILES[split]

    def missing(self, data_dir) -> list[str]:
        folder = self.folder(data_dir)
        names = [name for split in self.splits for name, _ in self.files(split)]
        return [name for name in names if not (folder / name).is_file()]

    def download(self, data_dir) -> None:
        missing = self.missing(data_dir)
        try:
            for train in (True, False):
                torchvision.datasets.CIFAR10(
                    str(self.folder(data_dir).parent), train, download=True
                )
        except DOWNLOAD_ERRORS as e:
            raise download_failed(self, data_dir, missing, e) from e

    def read(self, data_dir, split: str) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for name, md5 in self.files(split):
            path = self.official_file(data_dir, name, md5)
            try:
                with open(path, "rb") as f:
                    entry = ArrayUnpickler(f, encoding="latin1").load()
                if not isinstance(entry, dict):
                    raise TypeError(f"a {type(entry).__name__}, not a dict")
                data = torch.as_tensor(entry["data"], dtype=torch.uint8).view(-1, 3, 32, 32)
                label = torch.as_tensor(entry.get("labels", entry.get("fine_labels")))
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
                raise DataError(
                    f"{path} is not a CIFAR-10 batch ({type(e).__name__}: {e}); delete it and "
                    "download it again"
                ) from e
            except RuntimeError as e:  # view: wrong number of bytes
                raise DataError(f"{path} holds no 3x32x32 images ({e})") from e
            if len(label) != len(data):
                raise DataError(f"{path} has {len(data)} images but {len(label)} labels")
            images.append(data)
            labels.append(label.long())
        return torch.cat(images), torch.cat(labels)

    def __repr__(self) -> str:
        return f"CIFAR10(verify={self.verify})"


class SVHN(OfficialFiles):
    """Netzer et al. (2011) street-view house numbers: 73,257 training and 26,032 test 32x32
    colour digits (`extra=true` adds the 531,131 easier `extra` images to training), from
    torchvision's `train_32x32.mat`, `test_32x32.mat` (and `extra_32x32.mat`) in `<data
    root>/SVHN/`, md5-checked; label 10 is the digit 0, as torchvision maps it."""

    name = "SVHN"
    image_shape = (3, 32, 32)

    def __init__(self, extra: bool = False, verify: bool = True) -> None:
        self.extra = extra
        self.verify = verify

    def parts(self, split: str) -> list[str]:
        return ["train", "extra"] if split == "train" and self.extra else [split]

    def missing(self, data_dir) -> list[str]:
        split_list = torchvision.datasets.SVHN.split_list
        names = [split_list[p][1] for split in self.splits for p in self.parts(split)]
        return [name for name in names if not (self.folder(data_dir) / name).is_file()]

    def download(self, data_dir) -> None:
        missing = self.missing(data_dir)
        try:
            for part in {p for split in self.splits for p in self.parts(split)}:
                torchvision.datasets.SVHN(str(self.folder(data_dir)), split=part, download=True)
        except DOWNLOAD_ERRORS as e:
            raise download_failed(self, data_dir, missing, e) from e

    def read(self, data_dir, split: str) -> tuple[Tensor, Tensor]:
        import scipy.io
        from scipy.io.matlab import MatReadError

        images, labels = [], []
        for part in self.parts(split):
            path = self.official_file(data_dir, *torchvision.datasets.SVHN.split_list[part][1:])
            try:
                mat = scipy.io.loadmat(str(path))
                x, y = mat["X"], mat["y"]
            except (
                MatReadError,
                ValueError,
                OSError,
                KeyError,
                TypeError,
                NotImplementedError,
            ) as e:
                raise DataError(
                    f"{path} is not an SVHN .mat file ({type(e).__name__}: {e}); delete it and "
                    "download it again"
                ) from e
            if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size:
                raise DataError(
                    f"{path} holds X of shape {x.shape} and {y.size} labels, expected "
                    "(32, 32, 3, N) and N labels"
                )
            images.append(torch.from_numpy(x.astype("uint8")).permute(3, 2, 0, 1).contiguous())
            label = torch.from_numpy(y.reshape(-1).astype("int64"))
            labels.append(torch.where(label == 10, 0, label))
        return torch.cat(images), torch.cat(labels)

    def __repr__(self) -> str:
        return f"SVHN(extra={self.extra}, verify={self.verify})"


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


__all__ = ["CIFAR10", "SVHN", "CelebA", "ImageFolder"]

"""Small image datasets read whole from their official files, in the layout torchvision
downloads (so torchvision's download code is the one users get), md5-checked against
torchvision's record: CIFAR-10 (the python pickles, read by an unpickler that builds arrays
only) and SVHN (the .mat files)."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torchvision
from torch import Tensor
from torchvision.datasets.utils import calculate_md5

from vaelab.data.photos import DOWNLOAD_ERRORS, download_failed
from vaelab.data.sources import ImageSource
from vaelab.errors import DataError


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


__all__ = ["CIFAR10", "SVHN"]

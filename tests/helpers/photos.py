"""Tiny fake datasets in the real on-disk formats of CIFAR-10 (python pickles), SVHN (.mat),
CelebA (a folder of JPEGs and the partition file) and an image folder (PNGs)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar10(data_dir: Path, per_batch: int = 20, n_test: int = 30) -> Path:
    """<data_dir>/cifar-10-batches-py/ with 5 training batches and the test batch; image i of a
    file has all its pixels equal to (i * 7 + file number) % 256, its label i % 10."""
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", n_test)]
    for number, (name, n) in enumerate(names):
        value = (np.arange(n) * 7 + number) % 256
        data = np.repeat(value[:, None], 3072, axis=1).astype(np.uint8)
        data[:, 1024:2048] //= 2  # green half as bright: channels differ
        entry = {"batch_label": name, "labels": [i % 10 for i in range(n)], "data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def write_svhn(data_dir: Path, n_train: int = 40, n_test: int = 20, extra: int = 0) -> Path:
    """<data_dir>/SVHN/*_32x32.mat; labels 1..10 (10 is the digit 0), image i's pixels i % 256."""
    import scipy.io

    folder = data_dir / "SVHN"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test), ("extra", extra)):
        if not n:
            continue
        x = np.zeros((32, 32, 3, n), dtype=np.uint8)
        x[:] = (np.arange(n) % 256).astype(np.uint8)
        x[:, :, 2] = 255 - x[:, :, 2]  # a blue channel unlike the others
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)
        scipy.io.savemat(folder / f"{name}_32x32.mat", {"X": x, "y": y})
    return folder


def random_image(rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def write_celeba(data_dir: Path, partition: tuple[int, int, int] = (8, 3, 2)) -> Path:
    """<data_dir>/celeba/ with 178x218 JPEGs and list_eval_partition.txt (train, valid, test)."""
    folder = data_dir / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    number = 0
    for code, count in enumerate(partition):
        for _ in range(count):
            number += 1
            name = f"{number:06d}.jpg"
            random_image(rng, (178, 218)).save(images / name, quality=95)
            lines.append(f"{name} {code}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("cats", "dogs"), per_class: int = 10
) -> Path:
    """PNGs of assorted sizes in class sub-folders (or directly in root when classes is ())."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(classes or ("",)):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (40 + 3 * i, 36 + 5 * c)
            random_image(rng, size).save(folder / f"{i:03d}.png")
    return root

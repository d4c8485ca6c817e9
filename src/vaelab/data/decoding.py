"""Image files decoded one at a time into uint8 tensors: converted to 8 bits per channel, grey
or RGB, centre-cropped and resized. Deterministic (no random transform), so the same seed gives
the same batches whether the images are read per sample or all at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from vaelab.errors import DataError


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

"""The image LightningDataModule: one class for every image dataset, over an image source.

The DataModule is the one place that knows the data: its image shape (the model is built from
it), its pixel model (what it supplies: binary pixels, dequantised or discrete 8-bit values; the
likelihood says whether it accepts them and how bits per dimension follow) and how stored pixels
become model inputs. The dataset itself is an `ImageSource` (vaelab.data.sources) that only reads
files into uint8 tensors. Splits: validation carved from the training set with a fixed seed
(unless the source has its own), the real test set for testing.

Binarisation and dequantisation (`binarize`, `dequantize`): vaelab.data.pixels.

Data paths:
- `in_memory=true` (default; MNIST-family splits are 47 MB): each split is one uint8 tensor. With
  `device_cache=true` (default) it is copied to the training device once, the DataLoader yields
  only index batches, and a batch is one indexing operation on the device; with
  `device_cache=false` the batch is indexed on the CPU and copied each step. Either way
  binarisation / dequantisation run per batch on the device: no per-sample PIL or ToTensor.
- `in_memory=false`: the source's per-sample dataset (one image read at a time, in `num_workers`
  worker processes; for the IDX sources torchvision's, which needs the uncompressed files), for
  data that do not fit in memory (CelebA, a large image folder): nothing is read whole, the
  validation split is carved from the indices, and the batches are those of the in-memory path
  for the same seed.

`root` names the dataset's own folder (default: found under `data_dir`); `image_size` asks the
source for size x size images (CelebA and image folders resize; others accept their own size).
Both are plain map-style datasets, so under DDP Lightning's DistributedSampler gives each process
its own shard.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vaelab.data import pixels
from vaelab.data.datasets import (
    IndexBatch,
    InMemoryImages,
    SplitIndices,
    as_batch,
)
from vaelab.data.loaders import EpochSampler, ResumableLoader
from vaelab.data.sources import ImageSource
from vaelab.data.splits import Splitter
from vaelab.errors import DataError, require, require_int, require_number

BINARIZE_MODES = ("dynamic", "static", "none")
NOISE_KINDS = ("none", "gaussian", "salt_and_pepper", "mask")


class ImageDataModule(L.LightningDataModule):
    """Any image dataset: `source` reads it, this class serves it (see the module docstring)."""

    def __init__(
        self,
        source: ImageSource,
        data_dir: str,
        batch_size: int = 128,
        binarize: str = "dynamic",
        dequantize: bool | str = "auto",
        val_size: int = 5000,
        split_seed: int = 0,
        binarize_seed: int = 0,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        download: bool = True,
        in_memory: bool = True,
        device_cache: bool = True,
        noise: str = "none",
        noise_std: float = 0.3,
        noise_prob: float = 0.25,
        shuffle_seed: int | None = None,
        root: str | None = None,
        image_size: int | None = None,
        accepts: tuple[str, ...] | None = None,
    ) -> None:
        """`accepts`: the pixel models the likelihood accepts (build.py passes them), which
        `dequantize: auto` follows: dequantised values for a density, k / 255 for a likelihood
        over the 256 values (without them, dequantised)."""
        super().__init__()
        require(
            binarize in BINARIZE_MODES,
            f"data.binarize must be one of {', '.join(BINARIZE_MODES)}; got {binarize!r}",
        )
        require_int("data.batch_size", batch_size, 1)
        if eval_batch_size is not None:
            require_int("data.eval_batch_size", eval_batch_size, 1)
        require_int("data.val_size", val_size, 1)
        require_int("data.num_workers", num_workers, 0)
        require_int("data.split_seed", split_seed, 0)
        require_int("data.binarize_seed", binarize_seed, 0)
        require(
            noise in NOISE_KINDS,
            f"data.noise must be one of {', '.join(NOISE_KINDS)}; got {noise!r}",
        )
        require_number("data.noise_std", noise_std, 0)
        require(0 < noise_prob < 1, f"data.noise_prob must be in (0, 1), got {noise_prob}")
        require(
            isinstance(source, ImageSource),
            f"data.source must be an image source (vaelab.data.sources.ImageSource), got "
            f"{source!r}",
        )
        require(
            dequantize in (True, False, "auto"),
            f"data.dequantize must be true, false or auto; got {dequantize!r}",
        )
        if root is not None:
            source.root = root
        if image_size is not None:
            require_int("data.image_size", image_size, 1)
            source.resize(image_size)
        self.source = source
        self.image_shape = tuple(source.image_shape)
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.binarize = binarize
        if dequantize == "auto":
            dequantize = accepts is None or "dequantized" in accepts or "discrete" not in accepts
        self.dequantize = dequantize
        self.val_size = val_size
        self.split_seed = split_seed
        self.binarize_seed = binarize_seed
        self.num_workers = num_workers
        self.download = download
        self.in_memory = in_memory
        self.device_cache = device_cache
        self.noise = noise
        self.noise_std = noise_std
        self.noise_prob = noise_prob
        self.shuffle_seed = shuffle_seed
        self.train_loader: ResumableLoader | None = None
        self.splits: dict[str, InMemoryImages] = {}
        self.per_sample: dict[str, torch.utils.data.Dataset] = {}  # in_memory=false
        self.splitter = Splitter(
            source, data_dir, self.image_shape, val_size, split_seed, binarize, binarize_seed
        )
        self._resident: dict[str, tuple[Tensor, Tensor]] = {}  # device_cache copies

    @property
    def name(self) -> str:
        return self.source.name

    # --- what the model and the metrics need to know --------------------------------------
    @property
    def num_dims(self) -> int:
        """D, the number of pixel values per example."""
        return math.prod(self.image_shape)

    @property
    def train_size(self) -> int:
        """Images in the training split (after setup)."""
        split = self.splits.get("train") or self.per_sample.get("train")
        require(split is not None, f"{self.name}: the training split is not set up")
        return len(split)

    @property
    def factors(self):
        """The ground-truth factors (vaelab.data.factors.FactorSpace) of a source that has them
        (dsprites, dsprites_like: its labels are then factor indices, (N, F)), else None."""
        return self.source.factors

    def factor_grid(self) -> Tensor:
        """A factor source's every image in grid order (uint8; `preprocess` makes inputs)."""
        require(self.factors is not None, f"{self.name} has no ground-truth factors")
        return self.source.grid_images(self.data_dir)

    @torch.no_grad()
    def pixel_means(self) -> Tensor:
        """The mean of each pixel value over the training split (after setup), (C, H, W) on
        the model inputs' [0, 1] scale: for binarised pixels the probability of a 1 (the grey
        level itself under dynamic binarisation), for dequantised ones E[(k + u) / 256]. One
        pass over the split (in chunks; read image by image with in_memory=false)."""
        split = self.splits.get("train") or self.per_sample.get("train")
        require(split is not None, f"{self.name}: the training split is not set up")
        if isinstance(split, InMemoryImages):
            chunks = split.images.split(4096)
        else:
            chunks = (split[i][0][None] for i in range(len(split)))
        total = torch.zeros(self.image_shape, dtype=torch.float64)
        for chunk in chunks:
            total += chunk.to(torch.float64).sum(0)
            stored = chunk.dtype  # bool once binarised, else uint8
        mean = total / len(split)  # bool -> 0/1, uint8 -> k
        if stored == torch.bool:
            return mean.float()
        if self.binarize == "none" and self.dequantize:
            return ((mean + 0.5) / 256).float()
        return (mean / 255).float()

    @property
    def pixel_model(self) -> str:
        """What the model inputs are (vaelab.likelihoods.PIXEL_MODELS): `binary`, `dequantized`
        (8-bit values as (k + u) / 256) or `discrete` (8-bit values as k / 255)."""
        if self.binarize != "none":
            return "binary"
        return "dequantized" if self.dequantize else "discrete"

    @property
    def pixel_description(self) -> str:
        """How the numbers should be read; printed beside bits per dimension."""
        if self.binarize != "none":
            return f"binary pixels ({self.binarize} binarisation)"
        if self.dequantize:
            return "8-bit pixels, uniformly dequantised to (k + u) / 256"
        return "8-bit pixels as k / 255, not dequantised"

    # --- Lightning hooks --------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download once (rank zero) if files are missing and downloading is allowed."""
        missing = self.source.missing(self.data_dir)
        if not missing:
            return
        if not self.download:
            raise DataError(
                f"{self.name} files missing in {self.source.folder(self.data_dir)}: "
                f"{', '.join(missing)}, and data.download=false; set VAELAB_DATA_DIR or "
                f"paths.data_dir to the data root that holds {self.name}"
            )
        self.source.download(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        splits = self.splits if self.in_memory else self.per_sample
        (self.splitter.in_memory if self.in_memory else self.splitter.per_sample)(stage, splits)
        if "train" in splits:
            require(
                self.batch_size <= len(splits["train"]),
                f"data.batch_size={self.batch_size} is larger than the training split "
                f"({len(splits['train'])} images)",
            )

    def preprocess(self, images: Tensor) -> Tensor:
        """Stored pixels (bool or uint8, on any device) -> float model inputs in [0, 1]."""
        return pixels.model_inputs(images, self.binarize == "dynamic", bool(self.dequantize))

    def stored(self, batch: IndexBatch | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """(stored images, labels) of a loader's batch, on the batch's device."""
        if not isinstance(batch, IndexBatch):
            return batch
        device = batch.index.device
        resident = self._resident.get(batch.split)
        if resident is None or resident[0].device != device:
            split = self.splits[batch.split]
            resident = (split.images.to(device), split.labels.to(device))  # once per device
            self._resident[batch.split] = resident
        images, labels = resident
        return images.index_select(0, batch.index), labels.index_select(0, batch.index)

    def fetch(self, batch: IndexBatch | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(encoder inputs, clean targets, labels) of a loader's batch already on the device.

        The inputs are the targets unless `noise` corrupts them (denoising autoencoder)."""
        images, labels = self.stored(batch)
        targets = self.preprocess(images)
        return self.corrupt(targets), targets, labels

    def corrupt(self, x: Tensor) -> Tensor:
        """The encoder's view of clean inputs x (vaelab.data.pixels.corrupted)."""
        return pixels.corrupted(x, self.noise, self.noise_std, self.noise_prob)

    def _trainer_layout(self) -> tuple[int, int, int] | None:
        """(epoch, number of processes, this process's rank) while a trainer runs."""
        trainer = self.trainer
        if trainer is None:
            return None
        return trainer.current_epoch, trainer.world_size, trainer.global_rank

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """An IndexBatch moves its one index tensor (Lightning's generic path copies the
        dataclass through `deepcopy` at every step); other batches as Lightning moves them."""
        if isinstance(batch, IndexBatch):
            return IndexBatch(batch.split, batch.index.to(device, non_blocking=True))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        if self.trainer is not None and self.trainer.training and self.train_loader is not None:
            self.train_loader.taken += 1  # reached a training step: part of the resume position
        return self.fetch(batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def _loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        """Training: a ResumableLoader (its epoch order depends on shuffle_seed and the epoch only,
        and it can restart mid-epoch from a checkpoint); evaluation: the split in order."""
        if not self.in_memory:
            dataset, collate = self.per_sample[split], None  # default collate: stack samples
        elif self.device_cache:
            dataset, collate = SplitIndices(split, len(self.splits[split])), as_batch
        else:
            dataset, collate = self.splits[split], as_batch
        common = dict(
            batch_size=batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if not shuffle:
            # its own generator (for the workers' base seed): evaluation draws nothing from the
            # global random state, which drives the training noise
            return DataLoader(dataset, generator=torch.Generator().manual_seed(0), **common)
        seed = torch.initial_seed() if self.shuffle_seed is None else self.shuffle_seed
        sampler = EpochSampler(len(dataset), seed, layout=self._trainer_layout)
        self.train_loader = ResumableLoader(dataset, sampler=sampler, **common)
        return self.train_loader

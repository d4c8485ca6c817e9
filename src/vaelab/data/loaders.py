"""A training DataLoader that can resume in the middle of an epoch, exactly.

The order of epoch e is a permutation drawn from (shuffle_seed, e) alone, never from the global
random state, so it is the same in an interrupted and an uninterrupted run. The loader reports
Lightning how many batches of the epoch the training loop has taken (`state_dict`), and on
resume (`load_state_dict`) starts the epoch's permutation after them. Lightning stores this state
in every checkpoint because the loader implements the `state_dict` / `load_state_dict` pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """Shuffled indices 0..n-1: epoch e uses the permutation seeded with (seed, e), starting at
    `start` (set when resuming mid-epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)[self.start :].tolist()
        self.epoch += 1  # the next epoch, unless set_epoch says otherwise
        self.start = 0
        yield from order


class ResumableLoader(DataLoader):
    """DataLoader over an EpochSampler whose position within the epoch survives a checkpoint.

    `taken` counts the batches the training step has received this epoch; the DataModule
    increments it as batches reach the device, so batches Lightning merely prefetched are not
    counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken = 0

    def __iter__(self):
        sampler = self.sampler
        self.taken = sampler.start // self.batch_size if isinstance(sampler, EpochSampler) else 0
        self._epoch = sampler.epoch if isinstance(sampler, EpochSampler) else 0
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self, "_epoch", 0), "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochSampler):  # under DDP the sampler is Lightning's own
            self.sampler.epoch = state["epoch"]
            self.sampler.start = state["taken"] * self.batch_size

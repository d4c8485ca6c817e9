"""A training DataLoader that can resume in the middle of an epoch, exactly.

The order of epoch e is a permutation drawn from (shuffle_seed, e) alone, never from the global
random state, so it is the same in an interrupted and an uninterrupted run. So is the base seed of
the loader's worker processes: a DataLoader draws it from the global random state each time an
epoch's iterator is made, and Lightning makes the first one of a resumed run before the
checkpoint's random state is restored, so a run resumed from an epoch's end would start its next
epoch one draw off the uninterrupted run (different binarisation and reparameterisation noise).
The loader reports Lightning how many batches of the epoch the training loop has taken
(`state_dict`), and on resume (`load_state_dict`) starts the epoch's permutation after them.
Lightning stores this state in every checkpoint because the loader implements the
`state_dict` / `load_state_dict` pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochSampler(DistributedSampler):
    """Shuffled indices 0..n-1: epoch e uses the permutation seeded with (seed, e); with W
    processes, process r takes every W-th index from position r (padded to a multiple of W as
    DistributedSampler does), so the union of the shards of one step is the batch a single
    process would take. Starts at `start` when resuming mid-epoch.

    The epoch and the process layout come from `layout` when it gives them (the trainer's epoch
    counter, world size and rank), else from `set_epoch` (or counting passes) and one process.
    It is a DistributedSampler, so Lightning uses it as it is instead of wrapping it in its own
    (which would reshuffle and lose the position inside the epoch).
    """

    def __init__(
        self, n: int, seed: int, layout: Callable[[], tuple[int, int, int] | None] | None = None
    ) -> None:  # no super().__init__: it needs a process group, which may not exist yet
        self.n = n
        self.seed = seed
        self.layout = layout
        self.epoch = 0
        self.start = 0
        self.start_epoch = 0  # `start` applies to this epoch only
        self.num_replicas, self.rank = 1, 0

    def refresh(self) -> None:
        """Take epoch, world size and rank from the layout source, if it gives them."""
        current = self.layout() if self.layout is not None else None
        if current is not None:
            self.epoch, self.num_replicas, self.rank = current

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        self.refresh()
        return math.ceil(self.n / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        self.refresh()
        # modulo 2^63: an unseeded run (seed: null) has a 64-bit torch.initial_seed()
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = torch.randperm(self.n, generator=generator).tolist()
        if self.num_replicas > 1:
            total = math.ceil(self.n / self.num_replicas) * self.num_replicas
            order = (order + order[: total - self.n])[self.rank : total : self.num_replicas]
        # A checkpoint taken after the epoch's last batch resumes at the next epoch's beginning.
        start = self.start if self.epoch == self.start_epoch else 0
        self.start = 0
        self.epoch += 1  # the next epoch, unless the layout or set_epoch says otherwise
        yield from order[start:]


class ResumableLoader(DataLoader):
    """DataLoader over an EpochSampler whose position within the epoch survives a checkpoint.

    `taken` counts the batches the training step has received this epoch; the DataModule
    increments it as batches reach the device, so batches Lightning merely prefetched are not
    counted. The workers' base seed comes from the loader's own generator, seeded from
    (shuffle seed, epoch) at each epoch, not from the global random state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self.taken = 0

    def __iter__(self):
        sampler = self.sampler
        if isinstance(sampler, EpochSampler):
            sampler.refresh()
            resuming = sampler.epoch == sampler.start_epoch
            self.taken = sampler.start // self.batch_size if resuming else 0
            self._epoch = sampler.epoch
            self.generator.manual_seed((sampler.seed * 1_000_003 + sampler.epoch + 2**40) % 2**63)
        else:
            self.taken, self._epoch = 0, 0
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self, "_epoch", 0), "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochSampler):
            self.sampler.epoch = self.sampler.start_epoch = state["epoch"]
            self.sampler.start = state["taken"] * self.batch_size

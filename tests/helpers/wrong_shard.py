"""A deliberately wrong DDP shard, to show the equivalence test catches one: every process takes
rank 0's part of each epoch, so two processes see the same examples twice and half the batch
is never seen."""

from __future__ import annotations

from vaelab.data import ImageDataModule


class SameShardEverywhere(ImageDataModule):
    def _trainer_layout(self) -> tuple[int, int, int] | None:
        layout = super()._trainer_layout()
        return None if layout is None else (layout[0], layout[1], 0)

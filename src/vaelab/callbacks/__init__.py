"""Callbacks: side effects (images, reports) that stay out of the LightningModule."""

from vaelab.callbacks.checkpointing import LastCheckpoint
from vaelab.callbacks.hparams import HParamsLogger
from vaelab.callbacks.images import ImageLogger

__all__ = ["HParamsLogger", "ImageLogger", "LastCheckpoint"]

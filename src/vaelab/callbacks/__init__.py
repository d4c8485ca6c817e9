"""Callbacks: side effects (images, reports) that stay out of the LightningModule."""

from vaelab.callbacks.images import ImageLogger

__all__ = ["ImageLogger"]

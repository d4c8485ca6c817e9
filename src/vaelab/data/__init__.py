"""Data: one image LightningDataModule over small image sources."""

from vaelab.data.datamodule import ImageDataModule
from vaelab.data.sources import MNIST, FashionMNIST, ImageSource

__all__ = ["MNIST", "FashionMNIST", "ImageDataModule", "ImageSource"]

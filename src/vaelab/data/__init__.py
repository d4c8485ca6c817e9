"""Data: one image LightningDataModule over small image sources."""

from vaelab.data.datamodule import ImageDataModule
from vaelab.data.factors import DSprites, DSpritesLike, FactorSpace
from vaelab.data.photos import CIFAR10, SVHN, CelebA, ImageFolder
from vaelab.data.sources import MNIST, FashionMNIST, ImageSource

__all__ = [
    "CIFAR10",
    "MNIST",
    "SVHN",
    "CelebA",
    "DSprites",
    "DSpritesLike",
    "FactorSpace",
    "FashionMNIST",
    "ImageDataModule",
    "ImageFolder",
    "ImageSource",
]

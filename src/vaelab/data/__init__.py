"""Data: one image LightningDataModule over small image sources."""

from vaelab.data.datamodule import ImageDataModule
from vaelab.data.dsprites import DSprites, DSpritesLike
from vaelab.data.factors import FactorSpace
from vaelab.data.official import CIFAR10, SVHN
from vaelab.data.photos import CelebA, ImageFolder
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

"""Data: LightningDataModules that know image shape, pixel model and splits."""

from vaelab.data.datamodule import FashionMNISTDataModule, MNISTDataModule, MNISTFamilyDataModule

__all__ = ["FashionMNISTDataModule", "MNISTDataModule", "MNISTFamilyDataModule"]

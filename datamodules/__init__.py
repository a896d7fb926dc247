"""LightningDataModules that pair a labeled source domain with an unlabeled target domain."""

from datamodules.base import DomainAdaptationDataModule, UnlabeledDataset
from datamodules.bundled import BundledDigitsDataModule
from datamodules.digits import DigitsDataModule

__all__ = [
    "BundledDigitsDataModule",
    "DigitsDataModule",
    "DomainAdaptationDataModule",
    "UnlabeledDataset",
]

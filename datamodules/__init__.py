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

from datamodules.amazon import AmazonReviewsDataModule  # noqa: E402
from datamodules.image_folders import ImageFolderDataModule  # noqa: E402
from datamodules.mnist_m import MNISTMDataModule  # noqa: E402

__all__ += ["AmazonReviewsDataModule", "ImageFolderDataModule", "MNISTMDataModule"]

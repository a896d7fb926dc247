"""Small models and loaders shared by the tests."""

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datamodules.base import DomainAdaptationDataModule


class TinyFeatures(nn.Module):
    """Linear feature extractor over 8-dimensional inputs, exposing ``out_features``."""

    out_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, self.out_features), nn.ReLU())

    def forward(self, inputs):
        return self.layers(inputs)


def two_stream_loader(num_source: int = 64, num_target: int = 48, batch_size: int = 16, seed: int = 0):
    """Return a CombinedLoader of a labeled source and an unlabeled, shifted target (8-d Gaussian data)."""
    generator = torch.Generator().manual_seed(seed)
    source_inputs = torch.randn(num_source, 8, generator=generator)
    source_labels = (source_inputs[:, 0] > 0).long()
    target_inputs = torch.randn(num_target, 8, generator=generator) + 1.0
    source = DataLoader(TensorDataset(source_inputs, source_labels), batch_size=batch_size, shuffle=True)
    target = DataLoader(target_inputs, batch_size=batch_size, shuffle=True)
    return CombinedLoader({"source": source, "target": target}, mode="max_size_cycle")


def cpu_trainer(**kwargs) -> Trainer:
    """Return a quiet single-process CPU Trainer without checkpoints or loggers."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return Trainer(**options)


class GaussianBlobsDataModule(DomainAdaptationDataModule):
    """Gaussian class blobs in 8-d, the target shifted by ``shift``; a small, fast two-domain task.

    Args:
        num_classes: number of blobs (classes).
        samples_per_domain: training samples per domain; validation and test sets have half as many.
        shift: offset added to every target input.
        seed: seed of the generated data.
        **kwargs: the arguments of ``DomainAdaptationDataModule``.
    """

    def __init__(
        self, num_classes: int = 3, samples_per_domain: int = 96, shift: float = 0.5, seed: int = 0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _make_split(self, generator, size: int, shift: float) -> TensorDataset:
        centers = torch.eye(self._num_classes, 8, dtype=torch.float32) * 3
        labels = torch.arange(size) % self._num_classes
        inputs = centers[labels] + torch.randn(size, 8, generator=generator) + shift
        return TensorDataset(inputs, labels)

    def _build_datasets(self) -> None:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        size, shift = self.hparams.samples_per_domain, self.hparams.shift
        self.source_train = self._make_split(generator, size, 0.0)
        self.target_train = self._make_split(generator, size, shift)
        self.source_val = self._make_split(generator, size // 2, 0.0)
        self.target_val = self._make_split(generator, size // 2, shift)
        self.source_test = self._make_split(generator, size // 2, 0.0)
        self.target_test = self._make_split(generator, size // 2, shift)

    def _domain_num_classes(self) -> dict[str, int]:
        return {
            "source": int(self.source_train.tensors[1].max()) + 1,
            "target": int(self.target_train.tensors[1].max()) + 1,
        }


class RandomImagesDataModule(DomainAdaptationDataModule):
    """Random images in [-1, 1] with a bright row band whose position is the class; the target is brighter.

    A small image task for algorithms that need (B, C, 28, 28) inputs, such as PixelDA.

    Args:
        num_classes: number of classes (row bands).
        samples_per_domain: training samples per domain; validation and test sets have half as many.
        source_channels: channels of the source images.
        target_channels: channels of the target images.
        seed: seed of the generated data.
        **kwargs: the arguments of ``DomainAdaptationDataModule``.
    """

    def __init__(
        self,
        num_classes: int = 3,
        samples_per_domain: int = 32,
        source_channels: int = 1,
        target_channels: int = 1,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _make_split(self, generator, size: int, channels: int, brightness: float) -> TensorDataset:
        labels = torch.arange(size) % self._num_classes
        images = torch.rand(size, channels, 28, 28, generator=generator) * 0.5 - 1 + brightness
        band_height = 28 // self._num_classes
        for label in range(self._num_classes):
            images[labels == label, :, label * band_height : (label + 1) * band_height] += 1.0
        return TensorDataset(images.clamp(-1, 1), labels)

    def _build_datasets(self) -> None:
        hparams = self.hparams
        generator = torch.Generator().manual_seed(hparams.seed)
        size = hparams.samples_per_domain
        for split, split_size in (("train", size), ("val", size // 2), ("test", size // 2)):
            source = self._make_split(generator, split_size, hparams.source_channels, 0.0)
            target = self._make_split(generator, split_size, hparams.target_channels, 0.4)
            setattr(self, f"source_{split}", source)
            setattr(self, f"target_{split}", target)

    def _domain_num_classes(self) -> dict[str, int]:
        return {domain: int(getattr(self, f"{domain}_train").tensors[1].max()) + 1 for domain in self.eval_domains}


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one intra-op thread: for tiny networks the thread pool costs more than it saves.

    Autouse in every test module that imports it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

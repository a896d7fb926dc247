"""Small models and loaders shared by the tests."""

import torch
from lightning import Trainer
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


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

"""Train each algorithm with Lightning's DDP strategy on CPU processes and record what every process saw.

Run by ``tests/test_ddp.py``; Lightning starts the other processes by running this script again::

    python tests/ddp_worker.py --devices 2 --output DIR [--algorithms NAME ...]

For every algorithm, each process writes ``DIR/<algorithm>_rank<rank>.json`` with the ids of the
source and target samples of each of its training batches and the validation and test metrics,
and ``DIR/<algorithm>_rank<rank>.pt`` with its final weights.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning import Callback, Trainer, seed_everything
from torch.utils.data import TensorDataset

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from datamodules.base import DomainAdaptationDataModule  # noqa: E402
from tests.algorithms import algorithm_cases, optimizers_per_batch  # noqa: E402
from tests.helpers import RandomImagesDataModule  # noqa: E402

NUM_CLASSES = 2
TARGET_ID_OFFSET = 100.0  # target sample i carries the id 100 + i


class IndexedDataModule(DomainAdaptationDataModule):
    """Random inputs whose first element is the sample's id, so each process can report which samples it drew.

    Source ids are 0..num_source-1 and target ids 100..100+num_target-1, in every split.
    Labels alternate 0, 1, 0, ...

    Args:
        input_shape: shape of one input, e.g. ``(8,)`` or ``(1, 28, 28)``.
        num_source: samples in each source split.
        num_target: samples in each target split.
        **kwargs: the arguments of ``DomainAdaptationDataModule``.
    """

    def __init__(self, input_shape: tuple[int, ...] = (8,), num_source: int = 8, num_target: int = 6, **kwargs):
        super().__init__(**kwargs)

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def _make_split(self, generator, size: int, id_offset: float) -> TensorDataset:
        inputs = torch.rand(size, *self.hparams.input_shape, generator=generator) * 2 - 1
        inputs.view(size, -1)[:, 0] = torch.arange(size) + id_offset
        return TensorDataset(inputs, torch.arange(size) % NUM_CLASSES)

    def _build_datasets(self) -> None:
        generator = torch.Generator().manual_seed(0)
        num_source, num_target = self.hparams.num_source, self.hparams.num_target
        for split in ("train", "val", "test"):
            setattr(self, f"source_{split}", self._make_split(generator, num_source, 0.0))
            setattr(self, f"target_{split}", self._make_split(generator, num_target, TARGET_ID_OFFSET))

    def _domain_num_classes(self) -> dict[str, int]:
        return {"source": NUM_CLASSES, "target": NUM_CLASSES}


def sample_ids(inputs: torch.Tensor, offset: float = 0.0) -> list[int]:
    """Return the ids stored in the first element of each input."""
    return [round(value - offset) for value in inputs.flatten(1)[:, 0].tolist()]


class SampleIdRecorder(Callback):
    """Record the source and target sample ids of every training batch this process runs."""

    def __init__(self):
        self.source_ids: list[int] = []
        self.target_ids: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.source_ids += sample_ids(batch["source"][0])
        self.target_ids += sample_ids(batch["target"], TARGET_ID_OFFSET)


def make_datamodule(case) -> IndexedDataModule:
    """Return the indexed datamodule with the input shape the case's algorithm expects."""
    input_shape = (1, 28, 28) if case.make_datamodule is RandomImagesDataModule else (8,)
    return IndexedDataModule(input_shape=input_shape, batch_size=1, eval_batch_size=1)


def evaluate(trainer: Trainer, model, datamodule) -> dict[str, float]:
    """Return the validation and test metrics of ``model``, all dataloaders merged into one dict."""
    metrics = {}
    for results in (
        trainer.validate(model, datamodule=datamodule, verbose=False),
        trainer.test(model, datamodule=datamodule, verbose=False),
    ):
        # one dict per dataloader: source, then target
        for dataloader_metrics in results:
            metrics.update(dataloader_metrics)
    return metrics


def run(case, devices: int, output: Path) -> None:
    """Train ``case`` for one epoch with DDP, then validate and test, writing what this process saw."""
    seed_everything(0)
    model = case.make_model(NUM_CLASSES)
    recorder = SampleIdRecorder()
    # With several optimizers, each backward pass reaches only the parameters of one optimizer,
    # which DDP accepts only when it looks for unused parameters.
    strategy = "ddp_find_unused_parameters_true" if optimizers_per_batch(model) > 1 else "ddp"
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    datamodule = make_datamodule(case)
    trainer.fit(model, datamodule=datamodule)
    metrics = evaluate(trainer, model, datamodule)

    record = {
        "world_size": trainer.world_size,
        "num_training_batches": trainer.num_training_batches,
        "source_ids": recorder.source_ids,
        "target_ids": recorder.target_ids,
        "metrics": metrics,
    }
    rank = trainer.global_rank
    (output / f"{case.name}_rank{rank}.json").write_text(json.dumps(record))
    torch.save(model.state_dict(), output / f"{case.name}_rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="number of CPU processes")
    parser.add_argument("--output", type=Path, required=True, help="folder for the per-process records")
    parser.add_argument("--algorithms", nargs="*", help="case names from tests/algorithms.py; all by default")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cases = [case for case in algorithm_cases() if not args.algorithms or case.name in args.algorithms]
    for case in cases:
        run(case, args.devices, args.output)


if __name__ == "__main__":
    main()

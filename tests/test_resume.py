"""Exact resume and determinism: a run stopped at a checkpoint and resumed ends as an uninterrupted run, bit for bit."""

import math
import os
from pathlib import Path

import pytest
import torch
from lightning import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.algorithms import algorithm_cases, optimizers_per_batch
from tests.helpers import cpu_trainer
from tests.helpers import single_thread  # noqa: F401 (autouse fixture)
from train import DomainAdaptationCLI

ALGORITHMS = algorithm_cases()
NUM_CLASSES = 3
# 24 source and 18 target samples in batches of 4: 6 batches an epoch, and the target
# loader starts its second pass at the last batch of every epoch (max_size_cycle).
DATA_OPTIONS = dict(num_classes=NUM_CLASSES, samples_per_domain=24, batch_size=4, eval_batch_size=8)
BATCHES_PER_EPOCH = 6


class TrainingRecorder(Callback):
    """Record, for every training batch, its global index, the logged train/* values and the schedule phase."""

    def __init__(self):
        self.batches = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        total_batch_idx = trainer.fit_loop.epoch_loop.total_batch_idx
        logged = {
            "source_first_input": batch["source"][0].flatten()[0].item(),
            "target_first_input": batch["target"].flatten()[0].item(),
            "training_progress": module.training_progress,
        }
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train/"):
                logged[name] = value.item()
        if hasattr(module, "in_warmup"):
            logged["in_warmup"] = module.in_warmup
        self.batches[total_batch_idx] = logged


def fit(case, max_batches: int, callbacks, ckpt_path=None, seed: int = 0):
    """Seed, build the case's model and data, and train for ``max_batches`` batches."""
    seed_everything(seed)
    model = case.make_model(NUM_CLASSES)
    datamodule = case.make_datamodule(**DATA_OPTIONS)
    trainer = cpu_trainer(
        max_steps=max_batches * optimizers_per_batch(model),
        callbacks=callbacks,
        enable_checkpointing=True,
        limit_val_batches=2,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, trainer


def assert_same_nested(expected, actual, path: str) -> None:
    """Assert two nested structures of dicts, lists and tensors are equal, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert torch.equal(expected, actual), f"{path} differs"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{path}: keys {sorted(expected)} != {sorted(actual)}"
        for key in expected:
            assert_same_nested(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), f"{path}: lengths differ"
        for index, (left, right) in enumerate(zip(expected, actual)):
            assert_same_nested(left, right, f"{path}[{index}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), f"{path}: {expected} != {actual}"
    else:
        assert expected == actual, f"{path}: {expected} != {actual}"


# k = 4 stops mid-epoch (the resumed run finishes epoch 0, the target loader's second pass
# and two batches of epoch 1); k = 6 stops at the end of epoch 0.
@pytest.mark.parametrize("stop_batch", [4, BATCHES_PER_EPOCH], ids=["mid_epoch", "epoch_end"])
@pytest.mark.parametrize("case", ALGORITHMS, ids=[case.name for case in ALGORITHMS])
def test_resumed_run_matches_uninterrupted(case, stop_batch, tmp_path):
    total_batches = 2 * stop_batch
    steps_per_batch = optimizers_per_batch(case.make_model(NUM_CLASSES))
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=stop_batch * steps_per_batch, save_top_k=-1
    )
    uninterrupted = TrainingRecorder()
    full_model, full_trainer = fit(case, total_batches, [uninterrupted, checkpoint])
    checkpoint_path = tmp_path / f"step={stop_batch * steps_per_batch}.ckpt"
    assert checkpoint_path.is_file(), sorted(path.name for path in tmp_path.iterdir())

    # Another seed: everything the second half depends on must come from the checkpoint.
    resumed = TrainingRecorder()
    resumed_model, resumed_trainer = fit(case, total_batches, [resumed], ckpt_path=checkpoint_path, seed=1)

    assert sorted(resumed.batches) == list(range(stop_batch, total_batches))
    for batch_idx in range(stop_batch, total_batches):
        assert_same_nested(uninterrupted.batches[batch_idx], resumed.batches[batch_idx], f"batch {batch_idx}")
    assert resumed_trainer.global_step == full_trainer.global_step
    assert resumed_trainer.current_epoch == full_trainer.current_epoch
    assert_same_nested(full_model.state_dict(), resumed_model.state_dict(), "weights")
    for index, (full, resumed_optimizer) in enumerate(zip(full_trainer.optimizers, resumed_trainer.optimizers)):
        assert_same_nested(full.state_dict(), resumed_optimizer.state_dict(), f"optimizer {index}")
    full_schedulers = [config.scheduler for config in full_trainer.lr_scheduler_configs]
    resumed_schedulers = [config.scheduler for config in resumed_trainer.lr_scheduler_configs]
    for index, (full, resumed_scheduler) in enumerate(zip(full_schedulers, resumed_schedulers)):
        assert_same_nested(full.state_dict(), resumed_scheduler.state_dict(), f"scheduler {index}")


def run_cli(tmp_path: Path, *extra_args: str) -> DomainAdaptationCLI:
    """Run ``train.py fit`` in this process on a small DANN task; fit ends with a test of the final weights."""
    args = [
        "fit",
        "--model=lightning_uda.DANN",
        "--model.feature_extractor=lightning_uda.MLP",
        "--model.feature_extractor.in_features=8",
        "--model.feature_extractor.hidden_features=[16]",
        "--model.feature_extractor.dropout=0.2",
        "--data=tests.helpers.GaussianBlobsDataModule",
        "--data.batch_size=8",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=6",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        *extra_args,
    ]
    return DomainAdaptationCLI(args=args)


def test_same_seed_same_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)
    first = run_cli(tmp_path / "first")
    # train.py's default seed also seeds DataLoader workers (seed_everything(..., workers=True)).
    assert first.config["fit"]["seed_everything"] == 0
    assert os.environ.get("PL_SEED_WORKERS") == "1"
    torch.manual_seed(12345)  # the second run must not depend on the generator state it starts from
    second = run_cli(tmp_path / "second")
    other_seed = run_cli(tmp_path / "other_seed", "--seed_everything=1")

    first_metrics = {name: value.item() for name, value in first.trainer.callback_metrics.items()}
    second_metrics = {name: value.item() for name, value in second.trainer.callback_metrics.items()}
    assert "test/target_acc" in first_metrics
    assert first_metrics == second_metrics
    assert_same_nested(first.model.state_dict(), second.model.state_dict(), "weights")
    other_weights = other_seed.model.state_dict()
    assert any(not torch.equal(value, other_weights[name]) for name, value in first.model.state_dict().items())

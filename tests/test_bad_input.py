"""Bad inputs and the error each one raises; the README's troubleshooting table lists the same cases.

Every case must fail early with an error that names the bad input, never with a silent
zero-step epoch, a skipped file or a traceback from deep inside torch.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning import seed_everything
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset

from datamodules.digits import DigitsDataModule
from lightning_uda import DANN, SourceOnly
from tests.algorithms import small_features
from tests.helpers import GaussianBlobsDataModule, RandomImagesDataModule, cpu_trainer
from tests.helpers import single_thread  # noqa: F401 (autouse fixture)
from train import DomainAdaptationCLI

NUM_CLASSES = 3


class CorruptedBlobsDataModule(GaussianBlobsDataModule):
    """Gaussian blobs with one value of one dataset replaced by ``value`` (NaN or infinity).

    Args:
        corrupted_dataset: name of the dataset to corrupt, e.g. ``"source_train"``.
        value: the value written into the first feature of sample 5.
        **kwargs: the arguments of ``GaussianBlobsDataModule``.
    """

    def __init__(self, corrupted_dataset: str = "source_train", value: float = float("nan"), **kwargs) -> None:
        super().__init__(**kwargs)

    def _build_datasets(self) -> None:
        super()._build_datasets()
        getattr(self, self.hparams.corrupted_dataset).tensors[0][5, 0] = self.hparams.value


class FewerTargetClassesDataModule(GaussianBlobsDataModule):
    """Gaussian blobs whose target data covers only classes 0 and 1 of three."""

    def _build_datasets(self) -> None:
        super()._build_datasets()
        for name in ("target_train", "target_val", "target_test"):
            getattr(self, name).tensors[1].remainder_(2)


class EmptyTargetDataModule(GaussianBlobsDataModule):
    """Gaussian blobs without target training samples."""

    def _build_datasets(self) -> None:
        super()._build_datasets()
        self.target_train = TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))


def fit_source_only(datamodule, **trainer_options) -> None:
    """Train SourceOnly for one epoch, so every training sample is loaded once."""
    seed_everything(0)
    model = SourceOnly(feature_extractor=small_features(), num_classes=NUM_CLASSES)
    cpu_trainer(max_epochs=1, **trainer_options).fit(model, datamodule=datamodule)


def missing_data_root(tmp_path: Path) -> None:
    DigitsDataModule(root=str(tmp_path / "no_such_folder"), download=False).setup("fit")


def missing_data_files(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    DigitsDataModule(root=str(tmp_path), source="usps", target="mnist", download=False).setup("fit")


def different_class_counts(tmp_path: Path) -> None:
    FewerTargetClassesDataModule(num_classes=NUM_CLASSES).setup("fit")


def empty_target(tmp_path: Path) -> None:
    EmptyTargetDataModule(num_classes=NUM_CLASSES).setup("fit")


def batch_larger_than_domain(tmp_path: Path) -> None:
    datamodule = GaussianBlobsDataModule(
        num_classes=NUM_CLASSES, samples_per_domain=6, batch_size=8, drop_last=True
    )
    datamodule.setup("fit")


def nan_source_features(tmp_path: Path) -> None:
    fit_source_only(CorruptedBlobsDataModule(
        num_classes=NUM_CLASSES, samples_per_domain=24, batch_size=4, corrupted_dataset="source_train"
    ))


def infinite_target_features(tmp_path: Path) -> None:
    datamodule = CorruptedBlobsDataModule(
        num_classes=NUM_CLASSES,
        samples_per_domain=24,
        batch_size=4,
        corrupted_dataset="target_train",
        value=float("inf"),
    )
    fit_source_only(datamodule)


def nan_target_validation_features(tmp_path: Path) -> None:
    datamodule = CorruptedBlobsDataModule(
        num_classes=NUM_CLASSES, samples_per_domain=24, batch_size=4, corrupted_dataset="target_val"
    )
    fit_source_only(datamodule, num_sanity_val_steps=-1)


def grey_source_colour_target_datamodule(tmp_path: Path) -> None:
    RandomImagesDataModule(source_channels=1, target_channels=3).setup("fit")


def grey_source_colour_target_loaders(tmp_path: Path) -> None:
    # Loaders passed to the Trainer directly bypass the datamodule's check; the module checks each batch.
    grey_images = TensorDataset(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    source = DataLoader(grey_images, batch_size=4)
    target = DataLoader(torch.zeros(8, 3, 28, 28), batch_size=4)
    loader = CombinedLoader({"source": source, "target": target}, mode="max_size_cycle")
    model = DANN(feature_extractor=small_features(28 * 28), num_classes=NUM_CLASSES)
    cpu_trainer(max_steps=2).fit(model, loader)


def saved_source_only_checkpoint(tmp_path: Path, num_classes: int = NUM_CLASSES) -> Path:
    seed_everything(0)
    model = SourceOnly(feature_extractor=small_features(), num_classes=num_classes)
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(model, datamodule=GaussianBlobsDataModule(num_classes=num_classes, batch_size=8))
    path = tmp_path / "source_only.ckpt"
    trainer.save_checkpoint(path)
    return path


def checkpoint_of_other_algorithm(tmp_path: Path) -> None:
    path = saved_source_only_checkpoint(tmp_path)
    DANN.load_from_checkpoint(path, feature_extractor=small_features())


def resume_from_other_algorithm(tmp_path: Path) -> None:
    path = saved_source_only_checkpoint(tmp_path)
    model = DANN(feature_extractor=small_features(), num_classes=NUM_CLASSES)
    datamodule = GaussianBlobsDataModule(num_classes=NUM_CLASSES)
    cpu_trainer(max_steps=4).fit(model, datamodule=datamodule, ckpt_path=path)


def checkpoint_with_other_num_classes(tmp_path: Path) -> None:
    path = saved_source_only_checkpoint(tmp_path)
    SourceOnly.load_from_checkpoint(path, feature_extractor=small_features(), num_classes=NUM_CLASSES + 1)


def unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n"
        "  class_path: lightning_uda.SourceOnly\n"
        "  init_args:\n"
        "    feature_extractor: {class_path: lightning_uda.MLP, init_args: {in_features: 8}}\n"
        "    learning_rate: 0.1\n"
        "data:\n"
        "  class_path: tests.helpers.GaussianBlobsDataModule\n"
    )
    DomainAdaptationCLI(args=["fit", "--config", str(config)], run=True)


@dataclass(frozen=True)
class BadInput:
    """One row of the table: how to produce the bad input and the error it must raise."""

    name: str
    trigger: Callable[[Path], None]
    error: type[BaseException]
    message: str  # regular expression that the error message must match


BAD_INPUTS = [
    BadInput(
        "missing_data_root",
        missing_data_root,
        FileNotFoundError,
        r"MNIST test split not found.*no_such_folder.*download=True",
    ),
    BadInput(
        "missing_data_files",
        missing_data_files,
        FileNotFoundError,
        r"USPS test split not found.*usps\.t\.bz2.*download=True",
    ),
    BadInput(
        "different_class_counts",
        different_class_counts,
        ValueError,
        r"classes per domain \{'source': 3, 'target': 2\}",
    ),
    BadInput(
        "empty_target",
        empty_target,
        ValueError,
        r"target_train is empty",
    ),
    BadInput(
        "batch_larger_than_domain",
        batch_larger_than_domain,
        ValueError,
        r"source_train has 6 samples, fewer than batch_size=8",
    ),
    BadInput(
        "nan_source_features",
        nan_source_features,
        ValueError,
        r"source training batch \d+ contains NaN or infinite",
    ),
    BadInput(
        "infinite_target_features",
        infinite_target_features,
        ValueError,
        r"target training batch \d+ contains NaN or infinite",
    ),
    BadInput(
        "nan_target_validation_features",
        nan_target_validation_features,
        ValueError,
        r"target validation batch contains NaN or infinite",
    ),
    BadInput(
        "grey_source_colour_target",
        grey_source_colour_target_datamodule,
        ValueError,
        r"differ in shape.*'source_train': \(1, 28, 28\).*'target_train': \(3, 28, 28\)",
    ),
    BadInput(
        "grey_source_colour_target_loaders",
        grey_source_colour_target_loaders,
        ValueError,
        r"source inputs have per-sample shape \(1, 28, 28\) but target inputs \(3, 28, 28\)",
    ),
    BadInput(
        "checkpoint_of_other_algorithm",
        checkpoint_of_other_algorithm,
        ValueError,
        r"saved by SourceOnly, but is being loaded into DANN",
    ),
    BadInput(
        "resume_from_other_algorithm",
        resume_from_other_algorithm,
        ValueError,
        r"saved by SourceOnly, but is being loaded into DANN",
    ),
    BadInput(
        "checkpoint_with_other_num_classes",
        checkpoint_with_other_num_classes,
        ValueError,
        r"saved with num_classes=3, but this SourceOnly has num_classes=4",
    ),
    BadInput(
        "unknown_config_key",
        unknown_config_key,
        SystemExit,
        r"2",
    ),
]


@pytest.mark.parametrize("bad_input", BAD_INPUTS, ids=[bad_input.name for bad_input in BAD_INPUTS])
def test_bad_input_raises_clear_error(bad_input, tmp_path, capsys):
    with pytest.raises(bad_input.error, match=bad_input.message):
        bad_input.trigger(tmp_path)
    if bad_input.error is SystemExit:
        # jsonargparse prints the reason before exiting with status 2
        assert "Option 'learning_rate' is not accepted" in capsys.readouterr().err

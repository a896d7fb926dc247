from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from datamodules.digits import DigitsDataModule
from lightning_uda import DANN, LeNet
from tests.helpers import cpu_trainer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MNIST_DATA = PROJECT_ROOT.parent / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(not MNIST_DATA.is_dir(), reason=f"MNIST test split not found at {MNIST_DATA}")

IMAGES_PER_SPLIT = 100
# Every generated image is one grey level that encodes its file and its SVHN label (1-10, 10 is digit 0).
LEVEL_PER_LABEL = 20
TEST_FILE_OFFSET = 5


def write_svhn_split(folder: Path, split: str) -> None:
    """Write `<split>_32x32.mat` in SVHN's format: X (32, 32, 3, N) uint8 and y (N, 1) with labels 1-10."""
    labels = np.arange(IMAGES_PER_SPLIT) % 10 + 1
    levels = LEVEL_PER_LABEL * labels + (TEST_FILE_OFFSET if split == "test" else 0)
    images = np.broadcast_to(levels.astype(np.uint8), (32, 32, 3, IMAGES_PER_SPLIT)).copy()
    scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": images, "y": labels.reshape(-1, 1)})


@pytest.fixture
def digits_root(tmp_path):
    (tmp_path / "svhn").mkdir()
    for split in ("train", "test"):
        write_svhn_split(tmp_path / "svhn", split)
    (tmp_path / "mnist").symlink_to(MNIST_DATA)
    return tmp_path


def grey_levels(dataset) -> torch.Tensor:
    """Return the grey level 0-255 of each constant image, as stored before normalization."""
    return dataset.images.float().mean(dim=(1, 2, 3))


def decode(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the SVHN label (1-10) and whether each image came from the test file.

    Levels are snapped to the nearest multiple of 5, the spacing of the encoding, because the
    RGB to grey conversion may lower a level by one.
    """
    levels = (levels / TEST_FILE_OFFSET).round() * TEST_FILE_OFFSET
    from_test = levels % LEVEL_PER_LABEL == TEST_FILE_OFFSET
    svhn_labels = (levels - TEST_FILE_OFFSET * from_test) // LEVEL_PER_LABEL
    return svhn_labels.long(), from_test


@pytest.mark.parametrize("channels", [1, 3])
def test_svhn_to_mnist_format_and_labels(digits_root, channels):
    datamodule = DigitsDataModule(
        str(digits_root), "svhn", "mnist", source_split="train", target_split="test", channels=channels
    )
    datamodule.setup()

    for name in ("source_train", "source_val", "source_test"):
        dataset = getattr(datamodule, name)
        assert dataset.images.shape[1:] == (channels, 28, 28), name
        # Constant images stay constant through the grey conversion and the resize to 28x28.
        assert torch.all(dataset.images == dataset.images[:, :1, :1, :1]), name
        svhn_labels, _ = decode(grey_levels(dataset))
        assert torch.equal(dataset.labels, svhn_labels % 10), f"{name}: SVHN label 10 must become 0"
    assert 0 in datamodule.source_train.labels.tolist()

    inputs, label = datamodule.target_test[0]
    assert inputs.shape == (channels, 28, 28)
    assert len(datamodule.target_test) == 10000


def test_svhn_grey_conversion_keeps_levels(digits_root):
    datamodule = DigitsDataModule(str(digits_root), "svhn", "mnist", source_split="train", target_split="test")
    datamodule.setup()

    levels = grey_levels(datamodule.source_train)
    assert torch.equal(levels % TEST_FILE_OFFSET, torch.zeros_like(levels))


def test_svhn_splits_come_from_their_files(digits_root):
    datamodule = DigitsDataModule(str(digits_root), "svhn", "mnist", source_split="train", target_split="test")
    datamodule.setup()

    _, train_from_test = decode(grey_levels(datamodule.source_train))
    _, val_from_test = decode(grey_levels(datamodule.source_val))
    _, test_from_test = decode(grey_levels(datamodule.source_test))
    assert not train_from_test.any()
    assert not val_from_test.any()
    assert test_from_test.all()
    assert len(datamodule.source_train) + len(datamodule.source_val) == IMAGES_PER_SPLIT
    assert len(datamodule.source_test) == IMAGES_PER_SPLIT


def test_missing_svhn_file_named(tmp_path):
    datamodule = DigitsDataModule(str(tmp_path), "svhn", "mnist", source_split="train", target_split="test")

    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        datamodule.setup()


def test_dann_trains_on_svhn_to_mnist(digits_root):
    torch.manual_seed(0)
    datamodule = DigitsDataModule(
        str(digits_root), "svhn", "mnist", source_split="train", target_split="test", channels=3, batch_size=16
    )
    model = DANN(feature_extractor=LeNet(in_channels=3), num_classes=datamodule.num_classes)
    weights_before = model.feature_extractor.conv[0].weight.detach().clone()

    trainer = cpu_trainer(max_steps=3, limit_val_batches=1, limit_test_batches=1)
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)

    assert not torch.equal(weights_before, model.feature_extractor.conv[0].weight)
    assert "test/target_acc" in trainer.callback_metrics

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.digits import load_mnist
from datamodules.mnist_m import MNISTMDataModule, blend_with_photos, load_photos
from lightning_uda import DANN, LeNet
from train import DomainAdaptationCLI

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
needs_mnist = pytest.mark.skipif(
    not (SHARED_DATA / "mnist").is_dir(), reason=f"MNIST test split not found at {SHARED_DATA / 'mnist'}"
)


def random_digits(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)


def test_blend_is_absolute_difference():
    digits = random_digits(20)
    colour = np.array([200, 100, 0], dtype=np.uint8)
    photo = np.broadcast_to(colour, (40, 50, 3)).copy()

    blended = blend_with_photos(digits, [photo], seed=0)

    assert blended.shape == (20, 3, 28, 28)
    assert blended.dtype == torch.uint8
    for channel in range(3):
        expected = (digits.int() - int(colour[channel])).abs().to(torch.uint8)
        assert torch.equal(blended[:, channel], expected), f"channel {channel}"


def test_blend_patch_is_crop_of_photo():
    # Each pixel stores its own row and column, so a patch shows where it was cut from.
    height, width = 60, 80
    rows, cols = np.indices((height, width))
    first = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    second = np.stack([rows, cols, np.full_like(rows, 255)], axis=-1).astype(np.uint8)
    digits = torch.zeros(200, 28, 28, dtype=torch.uint8)

    patches = blend_with_photos(digits, [first, second], seed=3).int()

    tops = patches[:, 0, 0, 0]
    lefts = patches[:, 1, 0, 0]
    assert torch.equal(patches[:, 0], tops[:, None, None] + torch.arange(28)[None, :, None].expand(-1, -1, 28))
    assert torch.equal(patches[:, 1], lefts[:, None, None] + torch.arange(28)[None, None, :].expand(-1, 28, -1))
    assert tops.max() <= height - 28
    assert lefts.max() <= width - 28
    assert len(torch.unique(tops)) > 10
    assert set(torch.unique(patches[:, 2]).tolist()) == {0, 255}, "both photographs should be drawn"


def test_blend_deterministic_for_seed():
    digits = random_digits(50)
    photos = load_photos(None)

    first = blend_with_photos(digits, photos, seed=7)
    again = blend_with_photos(digits, photos, seed=7)
    other = blend_with_photos(digits, photos, seed=8)

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_default_photos_are_sklearn_samples():
    photos = load_photos(None)

    assert len(photos) == 2
    for photo in photos:
        assert photo.shape == (427, 640, 3)
        assert photo.dtype == np.uint8


def test_photo_folder_loaded_as_rgb(tmp_path):
    Image.new("L", (40, 30), 90).save(tmp_path / "grey.png")
    Image.new("RGB", (30, 40), (1, 2, 3)).save(tmp_path / "colour.png")
    (tmp_path / "notes.txt").write_text("not a photograph")

    photos = load_photos(str(tmp_path))

    assert [photo.shape for photo in photos] == [(40, 30, 3), (30, 40, 3)]
    assert photos[0][0, 0].tolist() == [1, 2, 3]
    assert photos[1][0, 0].tolist() == [90, 90, 90]


def test_photo_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Photograph folder not found"):
        load_photos(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="contains no image files"):
        load_photos(str(tmp_path))
    Image.new("RGB", (20, 40)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"small.png is 20x40 pixels"):
        load_photos(str(tmp_path))


@needs_mnist
def test_domains_built_from_disjoint_digits(tmp_path):
    # On a white photograph the blend is 255 - digit, so every target digit can be recovered exactly.
    Image.new("RGB", (28, 28), (255, 255, 255)).save(tmp_path / "white.png")
    datamodule = MNISTMDataModule(str(SHARED_DATA), photos_root=str(tmp_path))
    datamodule.setup()

    source_images = torch.cat([getattr(datamodule, f"source_{split}").images for split in ("train", "val", "test")])
    target_images = torch.cat([getattr(datamodule, f"target_{split}").images for split in ("train", "val", "test")])
    assert source_images.shape == (5000, 3, 28, 28)
    assert target_images.shape == (5000, 3, 28, 28)
    assert torch.equal(source_images[:, 0], source_images[:, 1])
    assert torch.equal(source_images[:, 0], source_images[:, 2])

    source_digits = {image[0].numpy().tobytes() for image in source_images}
    target_digits = {(255 - image[0]).numpy().tobytes() for image in target_images}
    mnist_digits, _ = load_mnist(SHARED_DATA, "test", download=False)
    assert not source_digits & target_digits
    assert source_digits | target_digits == {digit.numpy().tobytes() for digit in mnist_digits}


@needs_mnist
def test_mnist_m_repeatable_and_coloured():
    first = MNISTMDataModule(str(SHARED_DATA), blend_seed=1)
    again = MNISTMDataModule(str(SHARED_DATA), blend_seed=1)
    first.setup()
    again.setup()

    assert torch.equal(first.target_train.images, again.target_train.images)
    assert torch.equal(first.target_train.labels, again.target_train.labels)
    assert not torch.equal(first.target_train.images[:, 0], first.target_train.images[:, 1])
    inputs, label = first.target_test[0]
    assert inputs.shape == (3, 28, 28)
    assert inputs.min() >= -1
    assert inputs.max() <= 1
    assert 0 <= label <= 9


@needs_mnist
def test_mnist_mnistm_config_fits(tmp_path):
    cli = DomainAdaptationCLI(
        args=[
            "--config",
            str(PROJECT_ROOT / "configs" / "dann_mnist_mnistm.yaml"),
            "--data.root",
            str(SHARED_DATA),
            "--trainer.fast_dev_run",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path / "logs"),
        ],
        run=False,
    )
    assert isinstance(cli.model, DANN)
    assert isinstance(cli.model.feature_extractor, LeNet)
    assert cli.model.feature_extractor.in_channels == 3
    classifier_before = cli.model.classifier.weight.detach().clone()

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert not torch.equal(classifier_before, cli.model.classifier.weight)
    assert "val/target_acc" in cli.trainer.callback_metrics

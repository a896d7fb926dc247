import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import dump_svmlight_file

from datamodules.amazon import DOMAINS, NUM_FEATURES, AmazonReviewsDataModule
from lightning_uda import DANN, MLP, SourceOnly
from train import DomainAdaptationCLI

PROJECT_ROOT = Path(__file__).resolve().parents[1]
AMAZON_DATA = PROJECT_ROOT.parent / "shared" / "data" / "amazon_reviews"

NUM_TRAIN, NUM_TEST = 40, 16
# Column layout of the generated files: which file a row comes from, its row number, and counts.
FILE_MARKER_COLUMN = 0
ROW_ID_COLUMN = 1
COUNT_COLUMNS = slice(100, 110)


def file_marker(domain: str, split: str) -> int:
    return 1 + 2 * DOMAINS.index(domain) + (split == "test")


def write_reviews(root: Path, domain: str, split: str, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Write one gzipped svmlight file with marked rows and random counts; return counts and -1/1 labels."""
    generator = np.random.default_rng(seed)
    counts = np.zeros((size, NUM_FEATURES))
    counts[:, FILE_MARKER_COLUMN] = file_marker(domain, split)
    counts[:, ROW_ID_COLUMN] = np.arange(size) + 1
    counts[:, COUNT_COLUMNS] = generator.integers(0, 4, size=(size, 10))
    labels = np.where(np.arange(size) % 2 == 0, 1, -1)
    with gzip.open(root / f"{domain}_{split}.svmlight.gz", "wb") as file:
        dump_svmlight_file(counts, labels, file, zero_based=True)
    return counts, labels


@pytest.fixture
def reviews_root(tmp_path):
    files = {}
    for index, domain in enumerate(DOMAINS):
        files[domain, "train"] = write_reviews(tmp_path, domain, "train", NUM_TRAIN, seed=index)
        files[domain, "test"] = write_reviews(tmp_path, domain, "test", NUM_TEST, seed=10 + index)
    return tmp_path, files


def stacked_inputs(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def stacked_labels(dataset) -> torch.Tensor:
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])


@pytest.mark.parametrize("source,target", list(itertools.permutations(DOMAINS, 2)))
def test_every_pair_reads_its_files(reviews_root, source, target):
    root, _ = reviews_root
    datamodule = AmazonReviewsDataModule(str(root), source, target, val_fraction=0.25)
    datamodule.setup()

    expected_files = {
        "source_train": (source, "train"),
        "source_val": (source, "train"),
        "source_test": (source, "test"),
        "target_train": (target, "train"),
        "target_val": (target, "train"),
        "target_test": (target, "test"),
    }
    for name, (domain, split) in expected_files.items():
        markers = stacked_inputs(getattr(datamodule, name))[:, FILE_MARKER_COLUMN]
        assert torch.all(markers == file_marker(domain, split)), f"{name} does not come from {domain}_{split}"

    assert len(datamodule.source_train) == 30
    assert len(datamodule.source_val) == 10
    assert len(datamodule.source_test) == NUM_TEST
    assert len(datamodule.target_train) == 30
    assert len(datamodule.target_val) == 10
    assert len(datamodule.target_test) == NUM_TEST


def test_validation_held_out_from_training(reviews_root):
    root, _ = reviews_root
    datamodule = AmazonReviewsDataModule(str(root), "books", "kitchen", val_fraction=0.25)
    datamodule.setup()

    for domain in ("source", "target"):
        train_rows = set(stacked_inputs(getattr(datamodule, f"{domain}_train"))[:, ROW_ID_COLUMN].tolist())
        val_rows = set(stacked_inputs(getattr(datamodule, f"{domain}_val"))[:, ROW_ID_COLUMN].tolist())
        assert not train_rows & val_rows, f"{domain} train and val share rows"
        assert len(train_rows | val_rows) == NUM_TRAIN, f"{domain} train and val do not cover the training file"
        val_labels = stacked_labels(getattr(datamodule, f"{domain}_val"))
        assert val_labels.sum() == len(val_labels) // 2, f"{domain} val split is not stratified"


def test_labels_mapped_to_zero_and_one(reviews_root):
    root, files = reviews_root
    datamodule = AmazonReviewsDataModule(str(root), "dvd", "electronics")
    datamodule.setup()

    _, file_labels = files["electronics", "test"]
    inputs = stacked_inputs(datamodule.target_test)
    labels = stacked_labels(datamodule.target_test)
    rows = inputs[:, ROW_ID_COLUMN].long() - 1
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.from_numpy((file_labels[rows.numpy()] == 1).astype(np.int64)))
    assert set(labels.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "feature_transform,expected",
    [("raw", lambda counts: counts), ("binary", lambda counts: (counts > 0) * 1.0), ("log1p", np.log1p)],
)
def test_feature_transform_applied(reviews_root, feature_transform, expected):
    root, files = reviews_root
    datamodule = AmazonReviewsDataModule(str(root), "books", "dvd", feature_transform=feature_transform)
    datamodule.setup()

    counts, _ = files["books", "test"]
    inputs = stacked_inputs(datamodule.source_test)
    assert inputs.dtype == torch.float32
    assert inputs.shape == (NUM_TEST, NUM_FEATURES)
    np.testing.assert_allclose(inputs[:, COUNT_COLUMNS].numpy(), expected(counts[:, COUNT_COLUMNS]), rtol=1e-6)


def test_unknown_domain_rejected():
    with pytest.raises(ValueError, match="target must be one of .*'books'.*got 'movies'"):
        AmazonReviewsDataModule("unused", "books", "movies")


def test_unknown_feature_transform_rejected():
    with pytest.raises(ValueError, match="feature_transform must be one of .*got 'tfidf'"):
        AmazonReviewsDataModule("unused", "books", "dvd", feature_transform="tfidf")


def test_missing_file_named(reviews_root):
    root, _ = reviews_root
    (root / "kitchen_test.svmlight.gz").unlink()
    datamodule = AmazonReviewsDataModule(str(root), "books", "kitchen")

    with pytest.raises(FileNotFoundError, match="kitchen_test.svmlight.gz"):
        datamodule.setup()


def test_invalid_labels_rejected(reviews_root):
    root, _ = reviews_root
    with gzip.open(root / "dvd_train.svmlight.gz", "wb") as file:
        dump_svmlight_file(np.ones((4, 3)), np.array([0, 1, 2, 1]), file, zero_based=True)
    datamodule = AmazonReviewsDataModule(str(root), "books", "dvd")

    with pytest.raises(ValueError, match=r"dvd_train.svmlight.gz contains labels \[0.0, 1.0, 2.0\]"):
        datamodule.setup()


def test_feature_index_out_of_range_named(reviews_root):
    root, _ = reviews_root
    with gzip.open(root / "books_test.svmlight.gz", "wb") as file:
        file.write(b"1 0:1 5000:2\n-1 3:1\n")
    datamodule = AmazonReviewsDataModule(str(root), "books", "dvd")

    with pytest.raises(ValueError, match="Failed to read .*books_test.svmlight.gz"):
        datamodule.setup()


@pytest.mark.skipif(not AMAZON_DATA.is_dir(), reason=f"Amazon reviews data not found at {AMAZON_DATA}")
def test_books_to_kitchen_real_files():
    datamodule = AmazonReviewsDataModule(str(AMAZON_DATA), "books", "kitchen", batch_size=64)
    datamodule.setup()

    assert datamodule.num_classes == 2
    assert len(datamodule.source_train) + len(datamodule.source_val) == 2000
    assert len(datamodule.target_train) + len(datamodule.target_val) == 2000
    assert len(datamodule.source_test) == 4465
    assert len(datamodule.target_test) == 5945

    batch = next(iter(datamodule.train_dataloader()))[0]
    source_inputs, source_labels = batch["source"]
    assert source_inputs.shape == (64, NUM_FEATURES)
    assert source_inputs.dtype == torch.float32
    assert set(source_labels.tolist()) <= {0, 1}
    assert isinstance(batch["target"], torch.Tensor)
    assert batch["target"].shape == (64, NUM_FEATURES)


@pytest.mark.parametrize("config,model_class", [("dann_amazon", DANN), ("source_only_amazon", SourceOnly)])
def test_amazon_config_fits(reviews_root, tmp_path, config, model_class):
    root, _ = reviews_root
    cli = DomainAdaptationCLI(
        args=[
            "--config",
            str(PROJECT_ROOT / "configs" / f"{config}.yaml"),
            "--data.root",
            str(root),
            "--trainer.fast_dev_run",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path / "logs"),
        ],
        run=False,
    )
    assert isinstance(cli.model, model_class)
    assert isinstance(cli.model.feature_extractor, MLP)
    assert cli.model.num_classes == 2
    weights_before = cli.model.feature_extractor.layers[0].weight.detach().clone()

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert not torch.equal(weights_before, cli.model.feature_extractor.layers[0].weight)
    assert "val/target_acc" in cli.trainer.callback_metrics

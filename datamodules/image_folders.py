"""Object recognition across image domains stored as `root/<domain>/<class>/<image>` folders."""

import os
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from datamodules.base import DomainAdaptationDataModule, stratified_split

# Channel statistics of ImageNet, which the torchvision ResNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Evaluation resizes the shorter side to 256/224 of the crop size, the ImageNet convention.
EVAL_RESIZE_RATIO = 256 / 224
MAX_LISTED_NAMES = 10


def is_image_file(name: str) -> bool:
    """Return whether `name` has one of the extensions torchvision's ImageFolder reads."""
    return has_file_allowed_extension(name, IMG_EXTENSIONS)


def load_rgb_image(path: str) -> Image.Image:
    """Decode the image at `path` completely and convert it to RGB (grey and palette images too).

    Raises:
        OSError: The file is truncated, corrupt or not an image; the message names the path.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError) as error:
        # PIL raises SyntaxError for some malformed headers and OSError for truncated data.
        raise OSError(
            f"Failed to read image {path}: {error}. Replace or delete the file, or pass "
            "skip_unreadable=True to leave unreadable images out with a warning."
        ) from error


def _list_names(names: list[str]) -> str:
    listed = ", ".join(repr(name) for name in names[:MAX_LISTED_NAMES])
    if len(names) > MAX_LISTED_NAMES:
        listed += f" and {len(names) - MAX_LISTED_NAMES} more"
    return listed


def _subfolders(folder: Path) -> list[Path]:
    """Return the non-hidden subfolders of `folder`, sorted by name."""
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _contains_image_directly(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and is_image_file(entry.name) for entry in entries)


def _contains_image(folder: Path) -> bool:
    """Return whether `folder` or any folder below it contains an image file."""
    return any(is_image_file(name) for _, _, names in os.walk(folder, followlinks=True) for name in names)


def _missing_domain_error(root: Path, domain: str) -> FileNotFoundError:
    subfolders = _subfolders(root)

    # A root one level too low is itself a domain folder: its subfolders are classes with images.
    class_like = [folder.name for folder in subfolders if _contains_image_directly(folder)]
    if class_like:
        return FileNotFoundError(
            f"Domain folder {root / domain} not found, and root {root} looks like a single domain folder: "
            f"its subfolders {_list_names(class_like)} contain images. The expected layout is "
            f"root/<domain>/<class>/<image>, so set root to {root.parent} and source/target to domain folders "
            f"such as {root.name!r}."
        )

    # A root one level too high contains the folder that contains the domain.
    deeper = [folder / domain for folder in subfolders if (folder / domain).is_dir()]
    if deeper:
        return FileNotFoundError(
            f"Domain folder {root / domain} not found, but {deeper[0]} exists: root is one level too high. "
            f"Set root to {deeper[0].parent}."
        )

    found = _list_names([folder.name for folder in subfolders]) or "no folders"
    return FileNotFoundError(
        f"Domain folder {root / domain} not found. Root {root} contains {found}. "
        "Set source and target to names of domain folders in root."
    )


def find_domain_classes(root: Path, domain: str) -> list[str]:
    """Return the sorted class folder names of `root/domain`, checking the expected layout.

    Expected: `root/<domain>/<class>/<image>`, images possibly in subfolders of a class folder.

    Raises:
        FileNotFoundError: `root` or `root/domain` is missing; the message says whether root
            looks one level too high or too low.
        ValueError: `root/domain` contains no images, images but no class folders, class
            folders without images, or its images lie one folder level deeper than expected.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder root not found: {root}.")
    domain_folder = root / domain
    if not domain_folder.is_dir():
        raise _missing_domain_error(root, domain)

    class_folders = _subfolders(domain_folder)
    if not _contains_image(domain_folder):
        raise ValueError(
            f"Domain folder {domain_folder} contains no images. Expected {domain_folder}/<class>/<image> "
            f"with one of the extensions {IMG_EXTENSIONS}."
        )
    if not class_folders:
        raise ValueError(
            f"Domain folder {domain_folder} contains images but no class folders. Expected "
            f"{domain_folder}/<class>/<image>. Move the images into one folder per class."
        )

    if not any(_contains_image_directly(folder) for folder in class_folders):
        # The common Office-31 archive keeps its classes in <domain>/images/<class>/.
        example = next(folder for folder in class_folders if _contains_image(folder))
        raise ValueError(
            f"The images of {domain_folder} lie one folder level deeper than expected: the class folders "
            f"seem to be in {example}. Pass the domain as '{domain}/{example.name}', or move the class "
            f"folders up into {domain_folder}."
        )

    empty = [folder.name for folder in class_folders if not _contains_image(folder)]
    if empty:
        raise ValueError(
            f"Class folders without images in {domain_folder}: {_list_names(empty)}. Remove them or add images."
        )
    return [folder.name for folder in class_folders]


class SharedClassImageFolder(ImageFolder):
    """ImageFolder that takes its class indices from `class_to_idx`, so all domains share one mapping.

    Args:
        root: Domain folder with one subfolder per class.
        class_to_idx: Class folder name to class index.
        loader: Function that reads an image file.
    """

    def __init__(self, root: Path, class_to_idx: dict[str, int], loader=load_rgb_image) -> None:
        # find_classes runs inside ImageFolder.__init__, so the mapping must be set first.
        self.shared_class_to_idx = dict(class_to_idx)
        super().__init__(str(root), loader=loader)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(self.shared_class_to_idx, key=self.shared_class_to_idx.__getitem__)
        return classes, dict(self.shared_class_to_idx)


class ImageFolderView(Dataset):
    """Selected samples of a scanned image folder, read with their own transform.

    Lets one directory scan serve a training view (random crops) and an evaluation view
    (center crops) of the same images.

    Args:
        folder: The scanned folder; its `samples` are `(path, class_index)` pairs.
        indices: Positions in `folder.samples` of the samples in this view.
        transform: Transform applied to each RGB PIL image.
    """

    def __init__(self, folder: ImageFolder, indices: list[int], transform) -> None:
        self.folder = folder
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder.samples[self.indices[index]]
        return self.transform(self.folder.loader(path)), label

    @property
    def labels(self) -> list[int]:
        """Class index of each sample in the view."""
        return [self.folder.targets[i] for i in self.indices]


def imagenet_transforms(image_size: int) -> tuple[v2.Compose, v2.Compose]:
    """Return the training and evaluation transforms for networks pretrained on ImageNet.

    Training: random resized crop to `image_size` and horizontal flip. Evaluation: resize of
    the shorter side to `image_size * 256 / 224`, then center crop. Both end with float32
    tensors (3, image_size, image_size) normalized with the ImageNet mean and std.
    """
    to_normalized_tensor = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    train = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] + to_normalized_tensor)
    eval_transform = v2.Compose(
        [v2.Resize(round(image_size * EVAL_RESIZE_RATIO), antialias=True), v2.CenterCrop(image_size)]
        + to_normalized_tensor
    )
    return train, eval_transform


class ImageFolderDataModule(DomainAdaptationDataModule):
    """Image classification between two domains of a `root/<domain>/<class>/<image>` tree.

    Fits the layouts of Office-31 (amazon, dslr, webcam), Office-Home (Art, Clipart, Product,
    Real_World), VisDA-2017 (train, validation) and DomainNet (clipart, infograph, painting,
    quickdraw, real, sketch). Office-31 as distributed keeps classes in `<domain>/images/`: pass
    `source="amazon/images"` or move the class folders up.

    Both domains must have the same class folders. Class indices follow the sorted class
    names and are shared by both domains, so they do not depend on the order in which folders
    were created. Images are read with PIL and converted to RGB, so grey images get three
    channels. Inputs are float32 tensors (3, image_size, image_size), normalized with the
    ImageNet mean and std, as the torchvision ResNet weights expect.

    Splits follow the standard protocol of these benchmarks, in which the whole target domain
    is both the unlabeled training data and the test set:

    - `source_train`: the source images minus a stratified, seeded `val_fraction`, with
      random resized crops and flips. `source_val` is the held-out part, center-cropped, and
      `source_test` is the same held-out part, because these data sets have no source test split.
    - `target_train`: all target images, used without labels, with random crops and flips.
    - `target_test`: all target images, center-cropped.
    - `target_val`: a stratified, seeded `val_fraction` of the target images, center-cropped,
      whose labels serve only for logging. It is also part of `target_train` and `target_test`.

    An image that cannot be read raises an `OSError` naming its path when the loader reaches
    it. With `skip_unreadable=True`, `setup` instead decodes every image once (which takes a
    while on large data sets such as DomainNet) and leaves out the unreadable ones with a
    warning that lists their paths.

    Args:
        root: Folder that contains one folder per domain.
        source: Source domain folder name (a path relative to `root` also works).
        target: Target domain folder name.
        image_size: Height and width of the network input, in pixels.
        val_fraction: Fraction of the source images held out for validation, and of the target
            images used for target validation.
        split_seed: Seed of the validation splits.
        skip_unreadable: Leave out unreadable images with a warning instead of raising an error.
        batch_size: Training batch size, per domain.
        num_workers: DataLoader worker processes per loader.
        train_mode: CombinedLoader mode: "max_size_cycle", "min_size" or "max_size".
        drop_last: Drop the last incomplete training batch of each domain.
        eval_batch_size: Validation and test batch size; `None` uses `batch_size`.
    """

    def __init__(
        self,
        root: str = "data/office31",
        source: str = "amazon",
        target: str = "webcam",
        image_size: int = 224,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        skip_unreadable: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        train_mode: str = "max_size_cycle",
        drop_last: bool = False,
        eval_batch_size: int | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            train_mode=train_mode,
            drop_last=drop_last,
            eval_batch_size=eval_batch_size,
        )
        self._class_names: list[str] | None = None
        self._found_num_classes: dict[str, int] = {}

    @property
    def class_names(self) -> list[str]:
        """Sorted class folder names; the index of a name is its class index in both domains."""
        if self._class_names is None:
            self._class_names = self._find_shared_classes()
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of class folders, the same in both domains."""
        return len(self.class_names)

    def _find_shared_classes(self) -> list[str]:
        root, source, target = Path(self.hparams.root), self.hparams.source, self.hparams.target
        source_classes = find_domain_classes(root, source)
        target_classes = find_domain_classes(root, target)
        only_source = sorted(set(source_classes) - set(target_classes))
        only_target = sorted(set(target_classes) - set(source_classes))
        if only_source or only_target:
            raise ValueError(
                f"Source domain {source!r} and target domain {target!r} in {root} have different class folders: "
                f"only in source: {_list_names(only_source) or 'none'}; only in target: "
                f"{_list_names(only_target) or 'none'}. Both domains need the same class folders."
            )
        return sorted(source_classes)

    def _scan(self, domain: str) -> SharedClassImageFolder:
        class_to_idx = {name: index for index, name in enumerate(self.class_names)}
        folder = SharedClassImageFolder(Path(self.hparams.root) / domain, class_to_idx)
        if self.hparams.skip_unreadable:
            self._drop_unreadable(folder)
        return folder

    @staticmethod
    def _drop_unreadable(folder: ImageFolder) -> None:
        readable, unreadable = [], []
        for path, label in folder.samples:
            try:
                load_rgb_image(path)
            except OSError:
                unreadable.append(path)
            else:
                readable.append((path, label))
        if unreadable:
            rank_zero_warn(
                f"Skipped {len(unreadable)} unreadable images in {folder.root}: " + ", ".join(unreadable)
            )
        folder.samples = folder.imgs = readable
        folder.targets = [label for _, label in readable]

    def _split(self, folder: ImageFolder, domain: str) -> tuple[list[int], list[int]]:
        fraction = self.hparams.val_fraction
        try:
            rest, held_out = stratified_split(folder.targets, [fraction], self.hparams.split_seed)
        except ValueError as error:
            raise ValueError(
                f"Cannot hold out a stratified val_fraction={fraction} of the {len(folder.targets)} images of "
                f"domain {domain!r}: {error} Every class needs at least two images, and val_fraction times the "
                "number of images must be at least the number of classes."
            ) from error
        return rest.tolist(), held_out.tolist()

    def _build_datasets(self) -> None:
        hparams = self.hparams
        train_transform, eval_transform = imagenet_transforms(hparams.image_size)

        source = self._scan(hparams.source)
        train_indices, val_indices = self._split(source, hparams.source)
        self.source_train = ImageFolderView(source, train_indices, train_transform)
        self.source_val = ImageFolderView(source, val_indices, eval_transform)
        self.source_test = self.source_val

        target = self._scan(hparams.target)
        _, val_indices = self._split(target, hparams.target)
        all_indices = list(range(len(target.samples)))
        self.target_train = ImageFolderView(target, all_indices, train_transform)
        self.target_val = ImageFolderView(target, val_indices, eval_transform)
        self.target_test = ImageFolderView(target, all_indices, eval_transform)

        self._found_num_classes = {"source": len(set(source.targets)), "target": len(set(target.targets))}

    def _domain_num_classes(self) -> dict[str, int]:
        return dict(self._found_num_classes)

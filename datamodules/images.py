"""In-memory image dataset and the preprocessing shared by the digit datamodules."""

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

IMAGE_SIZE = 28
# Maps [0, 1] to [-1, 1] in every channel, the same for all domains.
NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.5


class ImageDataset(Dataset):
    """Labeled images kept as uint8 and returned as normalized float32 tensors.

    Items are `(x, y)`: `x` of shape (C, H, W) with values `(pixel / 255 - 0.5) / 0.5` in
    [-1, 1], and `y` an int class label.

    Args:
        images: uint8 tensor of shape (N, C, H, W).
        labels: Integer tensor of shape (N,).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            shape = tuple(images.shape)
            raise ValueError(f"images must be a uint8 tensor of shape (N, C, H, W), got {images.dtype} {shape}.")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}.")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float() / 255
        x = (x - NORMALIZE_MEAN) / NORMALIZE_STD
        return x, int(self.labels[index])

    def subset(self, indices: torch.Tensor | list[int]) -> "ImageDataset":
        """Return a new dataset with the items at `indices`, copied so the parent can be freed."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[indices].clone(), self.labels[indices].clone())


def to_digit_format(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Bring uint8 images to `channels` x 28 x 28, the common format of all digit domains.

    RGB becomes grey with ITU-R 601-2 luma weights when `channels` is 1, grey is repeated
    into three channels when `channels` is 3, and every image is resized to 28x28 with
    bilinear interpolation (antialiased when shrinking), whatever its aspect ratio.

    Args:
        images: uint8 tensor of shape (N, H, W) or (N, C, H, W) with C 1 or 3.
        channels: 1 or 3.

    Returns:
        uint8 tensor of shape (N, channels, 28, 28).
    """
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.shape[1] == 3 and channels == 1:
        # Converted in float and rounded: on uint8 the truncation would lower every level by one.
        images = F.rgb_to_grayscale(images.float()).round().to(torch.uint8)
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.resize(images, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
    if images.shape[1] == 1 and channels == 3:
        images = images.repeat(1, 3, 1, 1)
    if images.shape[1] != channels:
        raise ValueError(
            f"images must have 1 or 3 channels and channels must be 1 or 3, got {images.shape[1]} and {channels}."
        )
    return images

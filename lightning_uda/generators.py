"""Image-to-image generator and image discriminator for pixel-level domain adaptation (PixelDA)."""

import math

import torch
from torch import Tensor, nn


def check_image_shape(network: nn.Module, images: Tensor, channels: int, image_size: int) -> None:
    """Raise a ValueError naming ``network`` unless ``images`` has shape (B, channels, image_size, image_size)."""
    if images.ndim != 4 or images.shape[1:] != (channels, image_size, image_size):
        raise ValueError(
            f"{type(network).__name__} expects images of shape (B, {channels}, {image_size}, {image_size}), "
            f"got {tuple(images.shape)}; set its in_channels and image_size to match the datamodule"
        )


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Return a 3x3 convolution (padding 1) followed by batch normalization and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch normalization, added to an identity shortcut. Shape (B, C, H, W) is kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, inputs: Tensor) -> Tensor:
        return inputs + self.layers(inputs)


class PixelGenerator(nn.Module):
    """Residual generator that maps a source image and a noise vector to a target-like image of the same size.

    The layout is that of the PixelDA generator (Bousmalis et al., CVPR 2017). The noise ``z``,
    drawn uniformly from [-1, 1], passes through a linear layer whose output is reshaped to one
    extra image channel. A 3x3 convolution with ReLU, ``num_residual_blocks`` residual blocks and
    a 3x3 convolution to ``out_channels`` follow, then ``tanh``. The output therefore lies in
    [-1, 1], like images normalized with mean 0.5 and std 0.5.
    Input (B, in_channels, image_size, image_size), output (B, out_channels, image_size, image_size).

    Args:
        in_channels: channels of the source images.
        out_channels: channels of the generated images; ``in_channels`` by default.
        image_size: height and width of the square images.
        hidden_channels: channels of the convolutions and residual blocks.
        num_residual_blocks: number of residual blocks.
        noise_dim: size of the noise vector ``z``; 0 makes the generator deterministic.
        downsample: run the residual blocks at half resolution with twice the channels, between
            a stride-2 convolution and a nearest-neighbour upsampling followed by a convolution.
            This doubles the receptive field of every block, so the generator can move strokes
            further (e.g. widen a digit) for a similar cost. ``False`` is the paper's
            full-resolution layout.

    The defaults are a small network for 28x28 digits that trains on a CPU; use more channels
    and blocks for larger images.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 28,
        hidden_channels: int = 8,
        num_residual_blocks: int = 3,
        noise_dim: int = 10,
        downsample: bool = True,
    ) -> None:
        super().__init__()
        if noise_dim < 0:
            raise ValueError(f"noise_dim must be 0 or more, got {noise_dim}")
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.image_size = image_size
        self.noise_dim = noise_dim
        self.noise_projection = nn.Linear(noise_dim, image_size * image_size) if noise_dim > 0 else None

        noise_channels = 1 if noise_dim > 0 else 0
        block_channels = 2 * hidden_channels if downsample else hidden_channels
        blocks = [ResidualBlock(block_channels) for _ in range(num_residual_blocks)]
        if downsample:
            if image_size % 2 != 0:
                raise ValueError(f"downsample=True needs an even image_size, got {image_size}")
            blocks = [
                conv_bn_relu(hidden_channels, block_channels, stride=2),  # (B, 2C, H/2, W/2)
                *blocks,
                nn.Upsample(scale_factor=2, mode="nearest"),  # (B, 2C, H, W)
                conv_bn_relu(block_channels, hidden_channels),
            ]
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels + noise_channels, hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            *blocks,
            nn.Conv2d(hidden_channels, self.out_channels, kernel_size=3, padding=1),
            nn.Tanh(),
        )

    def sample_noise(self, batch_size: int, device: torch.device) -> Tensor:
        """Draw ``z`` uniformly from [-1, 1], shape (batch_size, noise_dim)."""
        return torch.rand(batch_size, self.noise_dim, device=device) * 2 - 1

    def forward(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """Generate one image per input image; ``noise`` (B, noise_dim) is sampled when not given."""
        check_image_shape(self, images, self.in_channels, self.image_size)
        if self.noise_projection is None:
            return self.layers(images)

        if noise is None:
            noise = self.sample_noise(len(images), images.device)
        if noise.shape != (len(images), self.noise_dim):
            raise ValueError(f"noise must have shape ({len(images)}, {self.noise_dim}), got {tuple(noise.shape)}")
        noise_channel = self.noise_projection(noise).view(len(images), 1, self.image_size, self.image_size)
        return self.layers(torch.cat([images, noise_channel.to(images.dtype)], dim=1))


class ImageDiscriminator(nn.Module):
    """Convolutional discriminator that outputs one logit per image (positive means real target image).

    The layout is that of the PixelDA discriminator. Gaussian noise is added to the input in
    training mode. A 3x3 convolution with stride 1 follows, then ``num_downsamples`` 3x3
    convolutions with stride 2, each doubling the channels and followed by batch normalization.
    Every convolution is followed by leaky ReLU (slope 0.2) and dropout, and a linear layer maps
    the flattened features to the logit.
    Input (B, in_channels, image_size, image_size), output (B,) logits: pair it with
    ``binary_cross_entropy_with_logits``.

    Args:
        in_channels: channels of the images.
        image_size: height and width of the square images.
        hidden_channels: channels of the first convolution.
        num_downsamples: number of stride-2 convolutions after the first one.
        dropout: dropout probability after every convolution.
        input_noise_std: standard deviation of the Gaussian noise added to the inputs in
            training mode; 0 turns it off.

    The defaults are a small network for 28x28 digits that trains on a CPU; use more channels
    for larger images.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        hidden_channels: int = 8,
        num_downsamples: int = 3,
        dropout: float = 0.0,
        input_noise_std: float = 0.2,
    ) -> None:
        super().__init__()
        if input_noise_std < 0:
            raise ValueError(f"input_noise_std must be 0 or more, got {input_noise_std}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.input_noise_std = input_noise_std

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
        ]
        channels, size = hidden_channels, image_size
        for _ in range(num_downsamples):
            layers += [
                nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(2 * channels),
                nn.LeakyReLU(0.2),
                nn.Dropout(dropout),
            ]
            channels, size = 2 * channels, math.ceil(size / 2)  # (B, 2C, ceil(H/2), ceil(W/2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * size * size, 1)

    def forward(self, images: Tensor) -> Tensor:
        check_image_shape(self, images, self.in_channels, self.image_size)
        if self.training and self.input_noise_std > 0:
            images = images + self.input_noise_std * torch.randn_like(images)
        return self.head(self.features(images).flatten(1)).squeeze(1)

"""Feature extractors, classifier heads and domain discriminators.

Every feature extractor exposes ``out_features`` so that heads can be built to fit it.
"""

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn


class LeNet(nn.Module):
    """LeNet-style feature extractor for 28x28 digit images.

    Two 5x5 convolutions (20 and 50 channels) with max pooling, then a 500-unit layer,
    as in the digit experiments of Ganin et al. (2016) and Tzeng et al. (2017).
    Input (B, C, 28, 28), output (B, 500).

    Args:
        in_channels: image channels, 1 for grey digits, 3 for colour (MNIST-M, SVHN).
        dropout: dropout probability after the convolutions and the dense layer.
    """

    out_features = 500

    def __init__(self, in_channels: int = 1, dropout: float = 0.5) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),  # (B, 20, 24, 24)
            nn.MaxPool2d(2),  # (B, 20, 12, 12)
            nn.ReLU(),
            nn.Conv2d(20, 50, kernel_size=5),  # (B, 50, 8, 8)
            nn.Dropout2d(dropout),
            nn.MaxPool2d(2),  # (B, 50, 4, 4)
            nn.ReLU(),
        )
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, self.out_features), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1:] != (self.in_channels, 28, 28):
            raise ValueError(
                f"LeNet expects images of shape (B, {self.in_channels}, 28, 28), got {tuple(images.shape)}. "
                "Set in_channels or resize the images in the datamodule"
            )
        return self.dense(self.conv(images))


class MLP(nn.Module):
    """Fully connected feature extractor for feature vectors (e.g. bag-of-words reviews).

    Input (B, in_features), output (B, hidden_features[-1]).

    Args:
        in_features: input dimension.
        hidden_features: width of each hidden layer, e.g. ``[50]`` for the shallow
            Amazon-reviews network of Ganin et al. (2016).
        dropout: dropout probability after each hidden layer.
        activation: ``"relu"`` or ``"sigmoid"``.
    """

    def __init__(
        self, in_features: int, hidden_features: list[int] = [500], dropout: float = 0.0, activation: str = "relu"
    ) -> None:
        super().__init__()
        if not hidden_features:
            raise ValueError("hidden_features must name at least one layer width, got an empty list")
        activations = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}
        if activation not in activations:
            raise ValueError(f"activation must be one of {sorted(activations)}, got {activation!r}")
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_features:
            layers += [nn.Linear(width, hidden), activations[activation](), nn.Dropout(dropout)]
            width = hidden
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features.flatten(1))


class ResNet(nn.Module):
    """Torchvision ResNet without its final layer, as a feature extractor.

    No weights are downloaded: the network starts random unless ``weights_path`` names
    a local state-dict file (for example torchvision's ``resnet50-0676ba61.pth``).
    Input (B, 3, H, W), output (B, 512) for resnet18/34 and (B, 2048) for resnet50 and up.

    Args:
        arch: torchvision model name, e.g. ``"resnet18"`` or ``"resnet50"``.
        weights_path: local file with the state dict of the full torchvision model.
    """

    def __init__(self, arch: str = "resnet50", weights_path: str | None = None) -> None:
        super().__init__()
        if not arch.startswith("resnet"):
            raise ValueError(f"arch must be a torchvision ResNet such as 'resnet50', got {arch!r}")
        network = torchvision.models.get_model(arch, weights=None)
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"ResNet weights file not found: {path}")
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.out_features = network.fc.in_features
        network.fc = nn.Identity()
        self.network = network

    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)


class DomainDiscriminator(nn.Module):
    """MLP that outputs one domain logit per sample (positive means source).

    Input (B, in_features), output (B,) logits: pair it with ``binary_cross_entropy_with_logits``.

    Args:
        in_features: feature dimension of the inputs.
        hidden_features: width of the two hidden layers.
        batch_norm: use batch normalization in the hidden layers.
    """

    def __init__(self, in_features: int, hidden_features: int = 500, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(2):
            layers.append(nn.Linear(width, hidden_features))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_features))
            layers.append(nn.ReLU())
            width = hidden_features
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features.flatten(1)).squeeze(1)


def feature_dimension(feature_extractor: nn.Module) -> int:
    """Return ``feature_extractor.out_features``, raising a clear error when the attribute is missing."""
    out_features = getattr(feature_extractor, "out_features", None)
    if not isinstance(out_features, int):
        raise AttributeError(
            f"{type(feature_extractor).__name__} has no integer attribute 'out_features'. Set it to the "
            "feature dimension, or pass the classifier (and domain_discriminator) explicitly"
        )
    return out_features

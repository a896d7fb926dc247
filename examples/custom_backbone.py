"""Adapt your own feature extractor with DANN: any nn.Module that maps inputs to feature vectors.

``SmallConvNet`` below stands for a user's network written without lightning-uda in mind.
It does not expose ``out_features``, so the script builds the two heads that sit on top of
it, the label classifier and the domain discriminator, for its feature width. A backbone
that exposes ``out_features`` needs neither, because DANN then builds both heads itself.

Run from the repository root after ``pip install -e .``::

    python examples/custom_backbone.py --max-steps 2000
"""

import argparse

import lightning as L
from torch import Tensor, nn

from datamodules import BundledDigitsDataModule
from lightning_uda import DANN, DomainDiscriminator


class SmallConvNet(nn.Module):
    """Three 3x3 convolution blocks and global average pooling: (B, 1, 28, 28) -> (B, width * 4).

    Args:
        width: channels of the first block, doubled in each following block.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Conv2d(1, width, kernel_size=3, padding=1),  # (B, w, 28, 28)
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, w, 14, 14)
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 2w, 7, 7)
            nn.Conv2d(2 * width, 4 * width, kernel_size=3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),  # (B, 4w, 1, 1)
            nn.Flatten(),  # (B, 4w)
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.blocks(images)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=2000, help="optimizer steps (one per batch here)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first convolution block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    parser.add_argument("--output-dir", default="runs/custom_backbone", help="directory of logs and checkpoints")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    L.seed_everything(args.seed)

    datamodule = BundledDigitsDataModule(batch_size=64)
    backbone = SmallConvNet(width=args.width)
    feature_width = 4 * args.width
    model = DANN(
        feature_extractor=backbone,
        classifier=nn.Linear(feature_width, datamodule.num_classes),
        domain_discriminator=DomainDiscriminator(feature_width, hidden_features=256),
        num_classes=datamodule.num_classes,
    )
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=1,
        default_root_dir=args.output_dir,
    )

    trainer.fit(model, datamodule=datamodule)
    per_loader = trainer.test(model, datamodule=datamodule)  # one dict per loader: [source, target]
    results = {name: value for loader_results in per_loader for name, value in loader_results.items()}

    print(f"optimizer steps: {trainer.global_step}")
    print(f"target test accuracy: {results['test/target_acc']:.4f}")


if __name__ == "__main__":
    main()

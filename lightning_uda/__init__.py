"""Unsupervised domain adaptation algorithms as PyTorch Lightning modules."""

from lightning_uda.backbones import MLP, DomainDiscriminator, LeNet, ResNet
from lightning_uda.base import DomainAdaptationModule
from lightning_uda.dann import DANN
from lightning_uda.generators import ImageDiscriminator, PixelGenerator
from lightning_uda.grl import GradientReversal, gradient_reversal
from lightning_uda.importance_weighting import ImportanceWeighting
from lightning_uda.pixelda import PixelDA
from lightning_uda.source_only import SourceOnly

__all__ = [
    "DANN",
    "MLP",
    "DomainAdaptationModule",
    "DomainDiscriminator",
    "GradientReversal",
    "ImageDiscriminator",
    "ImportanceWeighting",
    "LeNet",
    "PixelDA",
    "PixelGenerator",
    "ResNet",
    "SourceOnly",
    "gradient_reversal",
]

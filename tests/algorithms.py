"""Every algorithm of the library with a small model and a matching datamodule, for tests that cover them all.

An algorithm whose module file is not in the tree yet is left out, so these tests run while it
is being written. Once its file exists, an import error in it fails the tests.
"""

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from datamodules.base import DomainAdaptationDataModule
from lightning_uda import DANN, MLP, SourceOnly
from lightning_uda.base import DomainAdaptationModule
from tests.helpers import GaussianBlobsDataModule, RandomImagesDataModule

FEATURE_SIZE = 8  # input size of GaussianBlobsDataModule
IMAGE_SIZE = 28 * 28  # flattened input size of RandomImagesDataModule


@dataclass(frozen=True)
class AlgorithmCase:
    """One algorithm configuration for the cross-cutting tests.

    Attributes:
        name: test id.
        make_model: builds the model for a given ``num_classes``.
        make_datamodule: builds a matching datamodule from ``DomainAdaptationDataModule``
            arguments plus ``num_classes``, ``samples_per_domain`` and ``seed``.
    """

    name: str
    make_model: Callable[[int], DomainAdaptationModule]
    make_datamodule: Callable[..., DomainAdaptationDataModule]


def small_features(in_features: int = FEATURE_SIZE) -> MLP:
    """Return a one-hidden-layer MLP with dropout, so training draws random numbers."""
    return MLP(in_features=in_features, hidden_features=[16], dropout=0.2)


def _optional_module(name: str):
    """Import ``lightning_uda.<name>`` if its file exists, else return None."""
    if importlib.util.find_spec(f"lightning_uda.{name}") is None:
        return None
    return importlib.import_module(f"lightning_uda.{name}")


def dann_case(training_form: str) -> AlgorithmCase:
    """Return the DANN case of one training form."""

    def make_model(num_classes: int) -> DANN:
        return DANN(feature_extractor=small_features(), num_classes=num_classes, training_form=training_form)

    return AlgorithmCase(f"dann_{training_form}", make_model, GaussianBlobsDataModule)


def algorithm_cases() -> list[AlgorithmCase]:
    """Return one case per algorithm and training form present in the tree."""
    cases = [
        AlgorithmCase(
            "source_only",
            lambda num_classes: SourceOnly(feature_extractor=small_features(), num_classes=num_classes),
            GaussianBlobsDataModule,
        ),
        dann_case("gradient_reversal"),
        dann_case("alternating"),
    ]

    importance_weighting = _optional_module("importance_weighting")
    if importance_weighting is not None:
        cases.append(
            AlgorithmCase(
                "importance_weighting",
                lambda num_classes: importance_weighting.ImportanceWeighting(
                    feature_extractor=small_features(), num_classes=num_classes, warmup_fraction=0.25
                ),
                GaussianBlobsDataModule,
            )
        )

    pixelda = _optional_module("pixelda")
    if pixelda is not None:
        from lightning_uda.generators import ImageDiscriminator, PixelGenerator

        cases.append(
            AlgorithmCase(
                "pixelda",
                lambda num_classes: pixelda.PixelDA(
                    feature_extractor=small_features(IMAGE_SIZE),
                    num_classes=num_classes,
                    generator=PixelGenerator(hidden_channels=4, num_residual_blocks=1),
                    domain_discriminator=ImageDiscriminator(hidden_channels=4, num_downsamples=1),
                    image_log_interval=0,
                ),
                RandomImagesDataModule,
            )
        )
    return cases


def trainable_parts(model: DomainAdaptationModule) -> list[str]:
    """Return the names of the model's direct sub-modules that have parameters requiring grad."""
    return [
        name
        for name, child in model.named_children()
        if any(parameter.requires_grad for parameter in child.parameters())
    ]


def optimizers_per_batch(model: DomainAdaptationModule) -> int:
    """Return how many optimizer steps the model makes per training batch (the Trainer counts each)."""
    return len(model.optimizer_parameter_groups())

"""Command-line entry point: ``python train.py fit --config configs/dann_bundled_digits.yaml``.

Any :class:`~lightning_uda.base.DomainAdaptationModule` and any
:class:`~datamodules.base.DomainAdaptationDataModule` can be chosen in YAML with
``class_path`` / ``init_args``. ``num_classes`` is linked from the datamodule to the model,
and ``fit`` ends by testing the final weights, so every run logs ``test/target_acc``.
"""

from lightning.pytorch.cli import LightningCLI

from datamodules.base import DomainAdaptationDataModule
from lightning_uda.base import DomainAdaptationModule


class DomainAdaptationCLI(LightningCLI):
    """LightningCLI that links ``num_classes`` and tests the model after ``fit``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def after_fit(self) -> None:
        # Test the weights as they are at the end of fitting: no checkpoint is picked with target labels.
        self.trainer.test(self.model, datamodule=self.datamodule)


def build_cli(args: list[str] | None = None, run: bool = True) -> DomainAdaptationCLI:
    """Build the CLI of ``train.py``; ``args=None`` reads ``sys.argv`` and ``run=False`` only instantiates."""
    return DomainAdaptationCLI(
        DomainAdaptationModule,
        DomainAdaptationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    build_cli()


if __name__ == "__main__":
    main()

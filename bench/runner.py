"""Run one benchmark job: build it from a YAML config as ``train.py`` does, train, test, record checkpoints."""

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer

from datamodules.base import DomainAdaptationDataModule
import train
from train import DomainAdaptationCLI

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Trainer flags that change what a run writes and prints, never what it computes: the
# benchmark tests the final weights, so it needs no checkpoint files, logger or progress bar.
QUIET_TRAINER_ARGS = (
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One training run of the benchmark.

    Args:
        method: method name, ``"oracle"`` for the oracle row.
        config: YAML config, relative to the project root.
        source: source domain.
        target: target domain.
        seed: value of ``seed_everything``.
        oracle: train on the target's labeled training split (:class:`TargetLabelsAsSource`).
        pass_domains: pass ``source`` and ``target`` as ``data.init_args`` overrides.
        data_root: value of ``data.init_args.root``, or ``None`` to keep the config's.
        overrides: extra ``KEY=VALUE`` arguments of ``train.py``, e.g. ``trainer.max_steps=100``.
    """

    method: str
    config: str
    source: str
    target: str
    seed: int
    oracle: bool = False
    pass_domains: bool = True
    data_root: str | None = None
    overrides: tuple[str, ...] = ()

    def cli_arguments(self) -> list[str]:
        """Return the arguments of ``train.py fit`` that define this job's model, data and seed."""
        arguments = ["--config", self.config, f"--seed_everything={self.seed}"]
        if self.pass_domains:
            arguments += [f"--data.init_args.source={self.source}", f"--data.init_args.target={self.target}"]
        if self.data_root is not None:
            arguments.append(f"--data.init_args.root={self.data_root}")
        for override in self.overrides:
            key, separator, value = override.partition("=")
            if not separator or not key:
                raise ValueError(f"override {override!r} is invalid: write it as KEY=VALUE, e.g. trainer.max_steps=100")
            arguments.append(f"--{key}={value}")
        return arguments

    def key(self) -> dict:
        """Return the fields that identify a finished run, including a hash of the config file's text."""
        config_text = (PROJECT_ROOT / self.config).read_bytes()
        return {
            "method": self.method,
            "source": self.source,
            "target": self.target,
            "seed": self.seed,
            "cli_arguments": self.cli_arguments(),
            "config_sha256": hashlib.sha256(config_text).hexdigest(),
        }


def build_cli(arguments: list[str]) -> DomainAdaptationCLI:
    """Instantiate trainer, model and datamodule from ``train.py`` arguments without running a subcommand.

    The classes and defaults are those of ``train.main``, so a job trains the same model as
    ``python train.py fit`` with the same arguments; ``seed_everything`` is applied here.
    """
    with warnings.catch_warnings():
        # LightningCLI warns when sys.argv has arguments besides `args`, and here they are the runner's own.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return train.build_cli(arguments, run=False)


class TargetLabelsAsSource(DomainAdaptationDataModule):
    """Datamodule of the oracle: the target's labeled training split replaces the source.

    Trained with :class:`~lightning_uda.SourceOnly`, it gives the accuracy reachable with
    target labels, the upper row of a benchmark table. Every split comes from the target of
    ``datamodule``: training uses ``target_train`` with its labels, the "source" evaluation
    loaders are ``target_val`` and ``target_test`` (so ``test/source_acc`` equals
    ``test/target_acc``), and the target test set is the same one the other methods are tested on.

    Args:
        datamodule: the datamodule of the benchmark pair; its batch sizes and loader settings are kept.
    """

    def __init__(self, datamodule: DomainAdaptationDataModule) -> None:
        settings = datamodule.hparams
        super().__init__(
            batch_size=settings.batch_size,
            num_workers=settings.num_workers,
            train_mode=settings.train_mode,
            drop_last=settings.drop_last,
            eval_batch_size=settings.eval_batch_size,
        )
        self.datamodule = datamodule

    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes

    def _build_datasets(self) -> None:
        self.datamodule.setup("fit")
        self.source_train = self.datamodule.target_train
        self.target_train = self.datamodule.target_train
        self.source_val = self.datamodule.target_val
        self.target_val = self.datamodule.target_val
        self.source_test = self.datamodule.target_test
        self.target_test = self.datamodule.target_test

    def _domain_num_classes(self) -> dict[str, int]:
        target_classes = self.datamodule._domain_num_classes()["target"]
        return {"source": target_classes, "target": target_classes}


class CheckpointRecorder(Callback):
    """Record, after every validation during ``fit``, the logged ``val/*`` scores and the target test accuracy.

    The target test accuracy is stored for the report only: it selects nothing and stops
    nothing. The evaluation runs under ``torch.random.fork_rng``, because creating a DataLoader
    iterator draws from the global generator, and an extra draw would change the training
    batches that follow. Records are dicts with ``global_step``, ``batches`` (training
    batches done), ``target_test_acc`` and one entry per ``val/*`` metric.
    """

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        record = {
            "global_step": trainer.global_step,
            "batches": trainer.fit_loop.epoch_loop.total_batch_idx + 1,
            "target_test_acc": self._target_test_accuracy(trainer, pl_module),
        }
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val/"):
                record[name] = float(value)
        self.records.append(record)

    @staticmethod
    def _target_test_accuracy(trainer: Trainer, pl_module: LightningModule) -> float:
        target_loader = trainer.datamodule.test_dataloader()[1]
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for inputs, labels in target_loader:
                predictions = pl_module(inputs.to(pl_module.device)).argmax(dim=1)
                correct += int((predictions.cpu() == labels).sum())
                total += len(labels)
        pl_module.train(was_training)
        return correct / total


def run_job(job: Job, run_dir: Path) -> dict:
    """Train and test one job; return its record for the JSON file.

    The model is tested with its weights at the end of training (last epoch), as
    ``train.py fit`` does. ``run_dir`` receives the resolved ``config.yaml`` of the run.
    """
    arguments = job.cli_arguments() + [*QUIET_TRAINER_ARGS, f"--trainer.default_root_dir={run_dir}"]
    cli = build_cli(arguments)
    datamodule = TargetLabelsAsSource(cli.datamodule) if job.oracle else cli.datamodule
    recorder = CheckpointRecorder()
    cli.trainer.callbacks.append(recorder)

    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=datamodule)
    test_results = cli.trainer.test(cli.model, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - start

    test_metrics = {name: float(value) for results in test_results for name, value in results.items()}
    if "test/target_acc" not in test_metrics:
        raise RuntimeError(
            f"{job.method} {job.source}->{job.target} logged no test/target_acc; got {sorted(test_metrics)}"
        )
    return {
        **job.key(),
        "model": cli.config["model"]["class_path"],
        "test": test_metrics,
        "checkpoints": recorder.records,
        "global_step": cli.trainer.global_step,
        "seconds": round(seconds, 1),
    }

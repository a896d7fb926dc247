"""Time one DANN training step through the Lightning Trainer against a hand-written PyTorch loop.

Run from the project root::

    python -m bench.speed --threads 1

Both sides train the same DANN (LeNet feature extractor, linear classifier, default domain
discriminator) on the same random 1x28x28 batches, 64 per domain by default, with the same
number of torch threads. One step does the same work on both sides: a forward pass over the
concatenated source and target batch, gradient reversal, task and domain losses, backward,
an SGD step and a learning-rate scheduler step. Batches are built before timing, and both
sides fetch them through the same kind of DataLoader, so loading costs the same. A step's time
is the interval between the starts of consecutive batches, so it includes everything the loop
does between them (logging, callbacks, progress bookkeeping). Warm-up steps are dropped, each
repeat reports its median, the sides take turns to run first, and the summary is the median
over repeats. A third side, DANN with ``self.log`` replaced by a no-op, shows what logging
every step costs.
"""

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from lightning import Callback, Trainer
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from lightning_uda import DANN, LeNet
from lightning_uda.grl import gradient_reversal
from lightning_uda.losses import domain_adversarial_loss
from lightning_uda.schedules import annealed_lr_factor, grl_coefficient

NUM_CLASSES = 10


class PrebuiltBatches(Dataset):
    """Dataset whose items are whole batches, for a DataLoader with ``batch_size=None``."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return self.batches[index]


def make_loaders(num_batches: int, batch_size: int, seed: int) -> dict[str, DataLoader]:
    """Return source ``(x, y)`` and target ``x`` loaders of random digit-shaped batches."""
    generator = torch.Generator().manual_seed(seed)
    source, target = [], []
    for _ in range(num_batches):
        inputs = torch.rand(batch_size, 1, 28, 28, generator=generator) * 2 - 1
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        source.append((inputs, labels))
        target.append(torch.rand(batch_size, 1, 28, 28, generator=generator) * 2 - 1)
    return {
        "source": DataLoader(PrebuiltBatches(source), batch_size=None),
        "target": DataLoader(PrebuiltBatches(target), batch_size=None),
    }


class DANNWithoutLogging(DANN):
    """DANN whose ``self.log`` does nothing, to measure what logging every step costs."""

    def log(self, *args, **kwargs) -> None:
        pass


def make_model(seed: int, model_class: type[DANN] = DANN) -> DANN:
    torch.manual_seed(seed)
    return model_class(feature_extractor=LeNet(), num_classes=NUM_CLASSES)


class BatchStartTimes(Callback):
    """Record ``time.perf_counter()`` at the start of every training batch and at the end of training."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter())


def step_times(times: list[float], warmup: int) -> list[float]:
    """Return the intervals between consecutive timestamps after the first ``warmup`` steps, in seconds."""
    return [end - start for start, end in zip(times[warmup:], times[warmup + 1 :])]


def lightning_trainer(num_steps: int, callbacks: list, logger=False) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=num_steps,
        logger=logger,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def time_lightning(
    num_steps: int, warmup: int, batch_size: int, seed: int, model_class: type[DANN] = DANN
) -> list[float]:
    """Train ``model_class`` for ``num_steps`` batches with ``Trainer.fit`` and return the step times after warm-up."""
    model = make_model(seed, model_class)
    loaders = make_loaders(num_steps, batch_size, seed)
    timer = BatchStartTimes()
    trainer = lightning_trainer(num_steps, [timer])
    trainer.fit(model, train_dataloaders=CombinedLoader(loaders, mode="max_size_cycle"))
    return step_times(timer.times, warmup)


def time_plain_loop(num_steps: int, warmup: int, batch_size: int, seed: int) -> list[float]:
    """Train the same networks with a hand-written loop and return the step times after warm-up.

    Same hyperparameters as ``DANN``'s defaults: SGD with momentum 0.9 and weight decay 5e-4,
    learning rate ``0.01 / (1 + 10 p) ** 0.75`` and gradient-reversal coefficient
    ``2 / (1 + exp(-10 p)) - 1`` at progress ``p``.
    """
    model = make_model(seed)
    loaders = make_loaders(num_steps, batch_size, seed)
    hparams = model.hparams
    networks = [model.feature_extractor, model.classifier, model.domain_discriminator]
    parameters = [parameter for network in networks for parameter in network.parameters()]
    optimizer = torch.optim.SGD(
        parameters, lr=hparams.lr, momentum=hparams.momentum, weight_decay=hparams.weight_decay
    )
    scheduler = LambdaLR(
        optimizer, lambda step: annealed_lr_factor(step / num_steps, hparams.lr_alpha, hparams.lr_beta)
    )
    model.train()

    times = []
    for step, ((source_inputs, source_labels), target_inputs) in enumerate(zip(loaders["source"], loaders["target"])):
        times.append(time.perf_counter())
        coeff = model.trade_off * grl_coefficient(step / num_steps, model.grl_gamma)

        features = model.feature_extractor(torch.cat([source_inputs, target_inputs]))
        source_features = features[: len(source_inputs)]
        task_loss = F.cross_entropy(model.classifier(source_features), source_labels)
        domain_logits = model.domain_discriminator(gradient_reversal(features, coeff))
        domain_loss = domain_adversarial_loss(domain_logits[: len(source_inputs)], domain_logits[len(source_inputs) :])

        optimizer.zero_grad(set_to_none=True)
        (task_loss + domain_loss).backward()
        optimizer.step()
        scheduler.step()
    times.append(time.perf_counter())
    return step_times(times, warmup)


def profile_lightning(num_steps: int, batch_size: int, lines: int) -> str:
    """Return cProfile's report of one ``Trainer.fit`` run, sorted by cumulative time."""
    model = make_model(0)
    loaders = make_loaders(num_steps, batch_size, 0)
    trainer = lightning_trainer(num_steps, [])
    profiler = cProfile.Profile()
    profiler.enable()
    trainer.fit(model, train_dataloaders=CombinedLoader(loaders, mode="max_size_cycle"))
    profiler.disable()
    report = io.StringIO()
    stats = pstats.Stats(profiler, stream=report)
    stats.sort_stats("cumulative").print_stats(lines)
    stats.sort_stats("tottime").print_stats(lines)
    return report.getvalue()


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="measured steps per repeat (default: 100)")
    parser.add_argument("--warmup", type=int, default=20, help="steps dropped at each repeat's start (default: 20)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each side (default: 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size per domain (default: 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads value of every side (default: 1)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one Lightning run with cProfile and print the functions with the most time",
    )
    parser.add_argument("--profile-lines", type=int, default=30, help="functions per cProfile table (default: 30)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(argv)
    if arguments.steps < 2 or arguments.warmup < 0 or arguments.repeats < 1:
        raise ValueError(
            f"need --steps >= 2, --warmup >= 0 and --repeats >= 1, got {arguments.steps}, "
            f"{arguments.warmup} and {arguments.repeats}"
        )
    torch.set_num_threads(arguments.threads)
    num_steps = arguments.warmup + arguments.steps
    timed = {
        "plain PyTorch loop": time_plain_loop,
        "Lightning Trainer": time_lightning,
        "Lightning Trainer, self.log a no-op": partial(time_lightning, model_class=DANNWithoutLogging),
    }

    medians = {name: [] for name in timed}
    load_before = os.getloadavg()
    for repeat in range(arguments.repeats):
        # Rotate which side runs first, so a change in machine load hits all alike.
        names = list(timed)
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            times = timed[name](num_steps, arguments.warmup, arguments.batch_size, seed=repeat)
            medians[name].append(statistics.median(times))
            if torch.get_num_threads() != arguments.threads:
                raise RuntimeError(f"{name} changed torch's thread count to {torch.get_num_threads()}")
    load_after = os.getloadavg()

    print("python -m bench.speed " + " ".join(argv))
    print(
        f"DANN, LeNet, batch {arguments.batch_size} per domain, {arguments.threads} torch threads, "
        f"{arguments.steps} measured steps after {arguments.warmup} warm-up steps, {arguments.repeats} repeats, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    for name, values in medians.items():
        repeats = ", ".join(f"{1000 * value:.1f}" for value in values)
        print(f"{name}: median {1000 * statistics.median(values):.2f} ms/step (per repeat: {repeats})")
    plain = statistics.median(medians["plain PyTorch loop"])
    for name in list(timed)[1:]:
        print(f"ratio {name} / plain: {statistics.median(medians[name]) / plain:.3f}")

    if arguments.profile:
        print(profile_lightning(num_steps, arguments.batch_size, arguments.profile_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DANN on the bundled digit pair with several CPU processes (DDP) against one process.

Run from the project root::

    python bench/ddp_bundled.py [--processes 2] [--max-steps 2000] [--seed 0]

Both runs use ``configs/dann_bundled_digits.yaml`` through ``train.py`` with the same
effective batch: the one-process run keeps the config's ``batch_size`` (B per domain) and
each of the P processes of the DDP run loads ``B / P`` per domain, so both average gradients
over B source and B target samples per step, for the same number of steps and learning rate.
Prints the target test accuracy of both runs' final weights and their difference; the goal
is a difference within 1 point. Both runs take minutes on a CPU.

Note:
    Under DDP, Lightning's DistributedSampler pads an evaluation set whose size is not a
    multiple of P by repeating samples, so the DDP test accuracy counts up to P - 1 test
    images twice.
"""

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG = PROJECT_ROOT / "configs" / "dann_bundled_digits.yaml"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="number of DDP processes (default: 2)")
    parser.add_argument("--max-steps", type=int, help="training steps of both runs (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything value of both runs (default: 0)")
    return parser.parse_args()


def last_logged(metrics_file: Path, name: str) -> float:
    """Return the last value of ``name`` in a CSVLogger ``metrics.csv``."""
    with metrics_file.open() as handle:
        values = [row[name] for row in csv.DictReader(handle) if row.get(name)]
    if not values:
        raise RuntimeError(f"{metrics_file} has no value of {name}")
    return float(values[-1])


def train(
    processes: int, batch_size: int, max_steps: int | None, seed: int, log_dir: Path
) -> tuple[float, float]:
    """Run ``train.py fit`` on ``processes`` CPU processes; return the target test accuracy and the run's seconds."""
    command = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        "fit",
        "--config",
        str(CONFIG),
        f"--seed_everything={seed}",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={processes}",
        f"--trainer.strategy={'ddp' if processes > 1 else 'auto'}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={log_dir}",
        "--trainer.logger.name=run",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--data.init_args.batch_size={batch_size}",
    ]
    if max_steps is not None:
        command.append(f"--trainer.max_steps={max_steps}")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    metrics_file = next(log_dir.glob("run/version_*/metrics.csv"))
    return last_logged(metrics_file, "test/target_acc"), elapsed


def main() -> None:
    args = parse_arguments()
    batch_size = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]["batch_size"]
    if batch_size % args.processes != 0:
        raise SystemExit(
            f"The config's batch_size {batch_size} is not divisible by --processes {args.processes}; "
            "choose a number of processes that divides it."
        )

    with tempfile.TemporaryDirectory() as work_dir:
        single_acc, single_time = train(1, batch_size, args.max_steps, args.seed, Path(work_dir) / "single")
        ddp_acc, ddp_time = train(
            args.processes, batch_size // args.processes, args.max_steps, args.seed, Path(work_dir) / "ddp"
        )

    print(f"1 process, batch {batch_size}: test/target_acc = {100 * single_acc:.2f}% ({single_time:.0f} s)")
    print(
        f"{args.processes} processes, batch {batch_size // args.processes} each: "
        f"test/target_acc = {100 * ddp_acc:.2f}% ({ddp_time:.0f} s)"
    )
    difference = 100 * (ddp_acc - single_acc)
    print(f"difference: {difference:+.2f} points ({'within' if abs(difference) <= 1 else 'outside'} 1 point)")


if __name__ == "__main__":
    main()

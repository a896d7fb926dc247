"""Run a benchmark suite and write its markdown table and JSON file.

Run from the project root, e.g.::

    python -m bench.run --suite amazon --seeds 0 1 2

Every job is ``python train.py fit`` with a method's config, a pair and a seed, built
in-process through the same LightningCLI; the table reports the target test accuracy of
the final weights. Results are rewritten after every job, and an interrupted suite resumes:
jobs already in the JSON file with the same config text and arguments are not run again.
"""

import argparse
import gc
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import lightning
import torch

from bench.report import render_markdown, summarize
from bench.runner import PROJECT_ROOT, Job, run_job
from bench.suites import ORACLE, SUITES, Suite

log = logging.getLogger("bench.run")


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", required=True, choices=sorted(SUITES), help="suite to run")
    parser.add_argument(
        "--methods",
        nargs="+",
        help=f"methods to run, including '{ORACLE}' (default: each method whose config exists, and the oracle)",
    )
    parser.add_argument("--pairs", nargs="+", help="pairs to run as SOURCE:TARGET, e.g. books:dvd (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seed_everything values, default 0 1 2")

    parser.add_argument(
        "--data-root",
        default=str(PROJECT_ROOT.parent / "shared" / "data"),
        help="folder with the data sets; the suite's subfolder of it is passed as data.init_args.root",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="train.py argument applied to every job, e.g. trainer.max_steps=100 (repeatable)",
    )

    parser.add_argument("--output-dir", default="bench/results", help="folder of the markdown and JSON files")
    parser.add_argument("--name", help="file name stem of the results (default: the suite name)")
    parser.add_argument("--work-dir", default="runs/bench", help="folder of the per-run config.yaml files")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads value (default: torch's own)")
    parser.add_argument("--restart", action="store_true", help="run every job again instead of reusing finished ones")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the markdown and JSON from the runs in the JSON file, with its command, running nothing",
    )
    return parser.parse_args(argv)


def choose_methods(suite: Suite, requested: list[str] | None) -> list[str]:
    """Return the method names to run; by default the suite's methods whose config exists, then the oracle."""
    if requested is not None:
        for name in requested:
            if name != ORACLE and not (PROJECT_ROOT / suite.method(name).config).is_file():
                raise FileNotFoundError(f"config of {name!r} not found: {suite.method(name).config}")
        return requested
    methods = []
    for method in suite.methods:
        if (PROJECT_ROOT / method.config).is_file():
            methods.append(method.name)
        else:
            log.warning("skipping %s: config %s not found", method.name, method.config)
    return [*methods, ORACLE]


def choose_pairs(suite: Suite, requested: list[str] | None) -> list[tuple[str, str]]:
    """Return the ``(source, target)`` pairs to run, checked against the suite's pairs."""
    if requested is None:
        return list(suite.pairs)
    pairs = []
    for text in requested:
        pair = tuple(text.split(":"))
        if pair not in suite.pairs:
            choices = " ".join(f"{source}:{target}" for source, target in suite.pairs)
            raise ValueError(f"pair {text!r} is not in suite {suite.name!r}; choose from {choices}")
        pairs.append(pair)
    return pairs


def build_jobs(suite: Suite, methods: list[str], pairs, seeds: list[int], arguments) -> list[Job]:
    data_root = None
    if suite.data_subdir is not None:
        data_root = str(Path(arguments.data_root) / suite.data_subdir)
    jobs = []
    oracle_targets = set()
    for source, target in pairs:
        for name in methods:
            if name == ORACLE:
                # The oracle never uses the source, so the first pair with this target serves all of them.
                if target in oracle_targets:
                    continue
                oracle_targets.add(target)
            config = suite.oracle_config if name == ORACLE else suite.method(name).config
            for seed in seeds:
                jobs.append(
                    Job(
                        method=name,
                        config=config,
                        source=source,
                        target=target,
                        seed=seed,
                        oracle=name == ORACLE,
                        pass_domains=suite.pass_domains,
                        data_root=data_root,
                        overrides=tuple(arguments.override),
                    )
                )
    return jobs


def describe_environment() -> dict:
    def git(*command: str) -> str:
        result = subprocess.run(["git", *command], cwd=PROJECT_ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "written_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def run_matches(run: dict, key: dict) -> bool:
    return all(run.get(field) == value for field, value in key.items())


def reusable_runs(json_path: Path, jobs: list[Job]) -> list[dict]:
    """Return the runs of an earlier invocation that this one would repeat.

    Raises:
        ValueError: the file contains runs outside ``jobs`` (other pairs, seeds or methods, or a
            changed config), which rewriting it would drop.
    """
    if not json_path.is_file():
        return []
    finished = json.loads(json_path.read_text())["runs"]
    keys = [job.key() for job in jobs]
    extra = [run for run in finished if not any(run_matches(run, key) for key in keys)]
    if extra:
        names = ", ".join(f"{r['method']} {r['source']}->{r['target']} seed {r['seed']}" for r in extra[:5])
        raise ValueError(
            f"{json_path} contains {len(extra)} runs that this command would not repeat ({names}, ...), "
            "because their method, pair, seed, arguments or config text differ; pass --name to write "
            "other files, or --restart to replace these results"
        )
    return finished


def write_results(
    output_dir: Path, stem: str, suite: Suite, methods, pairs, seeds, runs, command: str, environment: dict
) -> None:
    """Write ``<stem>.json`` (every run and the summary) and ``<stem>.md`` (the tables)."""
    summary = summarize(suite, runs)
    record = {
        "suite": suite.name,
        "command": command,
        "selection": "last: weights at the end of training",
        "environment": environment,
        "methods": methods,
        "pairs": [list(pair) for pair in pairs],
        "seeds": seeds,
        "summary": summary,
        "runs": runs,
    }
    write_atomically(output_dir / f"{stem}.json", json.dumps(record, indent=1) + "\n")
    page = render_markdown(suite, methods, pairs, seeds, summary, command, environment)
    write_atomically(output_dir / f"{stem}.md", page)


def rewrite_report(output_dir: Path, stem: str, suite: Suite) -> None:
    """Rewrite ``<stem>.md`` and ``<stem>.json`` from the runs, command, methods, pairs and seeds in the JSON."""
    json_path = output_dir / f"{stem}.json"
    if not json_path.is_file():
        raise FileNotFoundError(
            f"{json_path} not found; run the suite first, or pass the --name of an existing result"
        )
    record = json.loads(json_path.read_text())
    if record["suite"] != suite.name:
        raise ValueError(
            f"{json_path} contains suite {record['suite']!r}, not {suite.name!r}; pass --suite {record['suite']}"
        )
    pairs = [tuple(pair) for pair in record["pairs"]]
    methods, seeds, runs = record["methods"], record["seeds"], record["runs"]
    write_results(output_dir, stem, suite, methods, pairs, seeds, runs, record["command"], record["environment"])
    log.info("rewrote %s and %s from the runs in %s", output_dir / f"{stem}.md", json_path, json_path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)

    suite = SUITES[arguments.suite]
    output_dir = Path(arguments.output_dir)
    stem = arguments.name or suite.name
    if arguments.report_only:
        rewrite_report(output_dir, stem, suite)
        return 0

    methods = choose_methods(suite, arguments.methods)
    pairs = choose_pairs(suite, arguments.pairs)
    jobs = build_jobs(suite, methods, pairs, arguments.seeds, arguments)
    command = "python -m bench.run " + shlex.join(argv)

    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / f"{stem}.json"
    runs = [] if arguments.restart else reusable_runs(json_path, jobs)

    for index, job in enumerate(jobs, start=1):
        label = f"[{index}/{len(jobs)}] {job.method} {job.source}->{job.target} seed {job.seed}"
        if any(run_matches(run, job.key()) for run in runs):
            log.info("%s: reusing the finished run in %s", label, json_path)
            continue
        log.info("%s: started", label)
        run_dir = Path(arguments.work_dir) / stem / f"{job.method}_{job.source}_{job.target}_seed{job.seed}"
        run = run_job(job, run_dir)
        # Trainer, model and datamodule reference each other, and only the cycle collector frees
        # them; without this call a long suite held the data sets of every finished job in memory.
        gc.collect()
        runs.append(run)
        log.info("%s: test/target_acc %.4f (%.0f s)", label, run["test"]["test/target_acc"], run["seconds"])
        environment = describe_environment()
        write_results(output_dir, stem, suite, methods, pairs, arguments.seeds, runs, command, environment)

    environment = describe_environment()
    write_results(output_dir, stem, suite, methods, pairs, arguments.seeds, runs, command, environment)
    log.info("wrote %s and %s", output_dir / f"{stem}.md", json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DDP training on two CPU processes (gloo, loopback), started by Lightning's own DDP strategy.

One subprocess runs ``tests/ddp_worker.py``, which Lightning runs again for the second process.
It trains every algorithm for one epoch on an 8-sample source and a 6-sample target with batch
size 1. With max_size_cycle each process runs 4 batches, and its target loader restarts once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import seed_everything

from tests.algorithms import algorithm_cases
from tests.ddp_worker import NUM_CLASSES, evaluate, make_datamodule
from tests.helpers import cpu_trainer
from tests.helpers import single_thread  # noqa: F401 (autouse fixture)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = algorithm_cases()
WORLD_SIZE = 2
NUM_SOURCE, NUM_TARGET = 8, 6


@pytest.fixture(scope="module")
def ddp_records(tmp_path_factory):
    """Run the DDP worker once for all algorithms and return its output folder."""
    output = tmp_path_factory.mktemp("ddp")
    # A fresh launch: no rank or port left over from another run, and the loopback address only.
    launch_variables = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")
    environment = {
        key: value for key, value in os.environ.items() if key not in launch_variables and not key.startswith("PL_")
    }
    environment["MASTER_ADDR"] = "127.0.0.1"
    result = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "tests" / "ddp_worker.py"),
            f"--devices={WORLD_SIZE}",
            f"--output={output}",
        ],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return output


def load_ranks(output: Path, name: str) -> list[dict]:
    return [json.loads((output / f"{name}_rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", ALGORITHMS, ids=[case.name for case in ALGORITHMS])
def test_ddp_shards_both_domains(case, ddp_records):
    ranks = load_ranks(ddp_records, case.name)

    for rank, record in enumerate(ranks):
        assert record["world_size"] == WORLD_SIZE
        # max_size_cycle: the epoch ends with the longer (source) loader, 8 / 2 = 4 batches a process
        assert record["num_training_batches"] == NUM_SOURCE // WORLD_SIZE
        source_ids, target_ids = record["source_ids"], record["target_ids"]
        assert len(source_ids) == NUM_SOURCE // WORLD_SIZE, f"rank {rank}"
        assert len(set(source_ids)) == NUM_SOURCE // WORLD_SIZE, f"rank {rank}: {source_ids}"
        # the target loader has 3 batches a process and restarts once to fill the 4th
        assert len(set(target_ids)) == NUM_TARGET // WORLD_SIZE, f"rank {rank}: {target_ids}"

    source_sets = [set(record["source_ids"]) for record in ranks]
    target_sets = [set(record["target_ids"]) for record in ranks]
    assert source_sets[0].isdisjoint(source_sets[1])
    assert target_sets[0].isdisjoint(target_sets[1])
    assert set.union(*source_sets) == set(range(NUM_SOURCE))
    assert set.union(*target_sets) == set(range(NUM_TARGET))


@pytest.mark.parametrize("case", ALGORITHMS, ids=[case.name for case in ALGORITHMS])
def test_ddp_keeps_processes_in_sync(case, ddp_records):
    weights = [torch.load(ddp_records / f"{case.name}_rank{rank}.pt") for rank in range(WORLD_SIZE)]
    seed_everything(0)
    initial = case.make_model(NUM_CLASSES).state_dict()
    parameter_names = [name for name, _ in case.make_model(NUM_CLASSES).named_parameters()]

    # Buffers (batch-norm statistics) are per process; parameters must agree after every step.
    for name in parameter_names:
        assert torch.equal(weights[0][name], weights[1][name]), f"{name} differs between processes"
    trained = [name for name in parameter_names if not torch.equal(initial[name], weights[0][name])]
    assert trained, "no parameter changed in training"


@pytest.mark.parametrize("case", ALGORITHMS, ids=[case.name for case in ALGORITHMS])
def test_ddp_metrics_match_one_process(case, ddp_records):
    ranks = load_ranks(ddp_records, case.name)
    model = case.make_model(NUM_CLASSES)
    model.load_state_dict(torch.load(ddp_records / f"{case.name}_rank0.pt"))

    single = evaluate(cpu_trainer(), model, make_datamodule(case))

    expected_names = {
        f"{stage}/{name}" for stage in ("val", "test") for name in ("source_acc", "target_acc", "source_loss")
    }
    assert set(single) == expected_names
    for rank, record in enumerate(ranks):
        assert set(record["metrics"]) == expected_names
        for name, value in single.items():
            assert record["metrics"][name] == pytest.approx(value, abs=1e-6), f"{name} on rank {rank}"

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 4


def run_example(name: str, *args: str, output_dir: Path) -> subprocess.CompletedProcess:
    """Run an example script the way a user would, with the project on PYTHONPATH instead of installed."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, str(PROJECT_ROOT / "examples" / name), *args, "--output-dir", str(output_dir)]
    return subprocess.run(command, cwd=output_dir, env=env, capture_output=True, text=True, timeout=600)


def printed_number(output: str, label: str) -> float:
    match = re.search(rf"^{label}: ([0-9.]+)$", output, flags=re.MULTILINE)
    assert match, f"'{label}: <number>' not found in the output:\n{output[-2000:]}"
    return float(match.group(1))


@pytest.mark.parametrize(
    "name, extra_args",
    [
        ("plain_lightning.py", ["--accelerator", "cpu", "--batch-size", "32"]),
        ("custom_backbone.py", ["--accelerator", "cpu", "--width", "4"]),
    ],
)
def test_example_trains_and_tests(name, extra_args, tmp_path):
    result = run_example(name, "--max-steps", str(MAX_STEPS), *extra_args, output_dir=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_number(result.stdout, "optimizer steps") == MAX_STEPS
    assert 0.0 <= printed_number(result.stdout, "target test accuracy") <= 1.0
    assert list(tmp_path.rglob("*.ckpt")), f"no checkpoint written under {tmp_path}"

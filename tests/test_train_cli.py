import subprocess
import sys
from pathlib import Path

import pytest

from train import DomainAdaptationCLI

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def _run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("config", ["dann_bundled_digits", "source_only_bundled_digits"])
def test_train_fast_dev_run_on_bundled_data(config, tmp_path):
    result = _run_train(
        "fit",
        "--config",
        str(PROJECT_ROOT / "configs" / f"{config}.yaml"),
        "--trainer.fast_dev_run",
        "2",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "test/target_acc" in output
    assert "test/source_acc" in output


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"MNIST/USPS data not found at {SHARED_DATA}")
@pytest.mark.parametrize("config", ["dann_mnist_usps", "source_only_mnist_usps"])
def test_train_fast_dev_run_on_mnist_usps(config, tmp_path):
    result = _run_train(
        "fit",
        "--config",
        str(PROJECT_ROOT / "configs" / f"{config}.yaml"),
        "--data.root",
        str(SHARED_DATA),
        "--trainer.fast_dev_run",
        "2",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/target_acc" in result.stdout + result.stderr


def test_num_classes_linked_from_datamodule():
    cli = DomainAdaptationCLI(
        args=[
            "--model=lightning_uda.DANN",
            "--model.feature_extractor=lightning_uda.MLP",
            "--model.feature_extractor.in_features=8",
            "--data=tests.helpers.GaussianBlobsDataModule",
            "--data.num_classes=3",
        ],
        run=False,
    )

    assert cli.datamodule.num_classes == 3
    assert cli.model.num_classes == 3
    assert cli.model.classifier.out_features == 3


def test_unknown_config_key_rejected(tmp_path):
    result = _run_train(
        "fit",
        "--config",
        str(PROJECT_ROOT / "configs" / "dann_bundled_digits.yaml"),
        "--model.init_args.no_such_option",
        "1",
        cwd=tmp_path,
    )

    assert result.returncode != 0
    assert "no_such_option" in result.stderr

"""configs/diagnostics.yaml and bench/export_pictures.py, on a short bundled-digits run of train.py."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXPORT_SCRIPT = PROJECT_ROOT / "bench" / "export_pictures.py"
MAX_STEPS = 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_SCALARS = (
    "train/loss_task",
    "train/loss_domain",
    "train/domain_acc",
    "train/grl_coeff",
    "train/lr",
)
VAL_SCALARS = ("val/target_acc", "val/source_acc", "val/im", "val/dev", "val/target_entropy")
IMAGE_TAGS = ("diagnostics/tsne", "diagnostics/target_confusion_matrix")
EXPORTED_FILES = ("tsne.png", "target_confusion_matrix.png", "training_curves.png")


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # One thread per library, because on a busy CPU the OpenMP threads of torch and of the
    # t-SNE spin while they wait for each other, which slows the run down.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Fit DANN (LeNet) for 20 steps with the diagnostics config and return the logger's version directory."""
    save_dir = tmp_path_factory.mktemp("pictures_run")
    result = run_script(
        str(PROJECT_ROOT / "train.py"),
        "fit",
        "--config",
        str(PROJECT_ROOT / "configs" / "dann_bundled_digits.yaml"),
        "--config",
        str(PROJECT_ROOT / "configs" / "diagnostics.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.max_steps",
        str(MAX_STEPS),
        "--trainer.val_check_interval",
        "10",
        "--trainer.log_every_n_steps",
        "5",
        # These two reach AdaptationDiagnostics because it is the last callback of the config.
        "--trainer.callbacks.init_args.max_points",
        "100",
        "--trainer.callbacks.init_args.pad_max_samples",
        "300",
        cwd=save_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    version_dirs = sorted(save_dir.glob("dann_bundled_digits/version_*"))
    assert len(version_dirs) == 1, f"expected one logger version directory in {save_dir}, got {version_dirs}"
    return version_dirs[0]


@pytest.fixture(scope="module")
def events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def png_size(data: bytes) -> tuple[int, int]:
    """Return (width, height) from the IHDR chunk, which PNG requires to come first."""
    return struct.unpack(">II", data[16:24])


def test_figures_logged_at_fit_end(events):
    images = events.Tags()["images"]

    for tag in IMAGE_TAGS:
        assert tag in images
        last = events.Images(tag)[-1]
        assert last.step == MAX_STEPS
        assert last.encoded_image_string.startswith(PNG_SIGNATURE)
        assert last.width > 200


def test_every_loss_coefficient_and_validator_logged(events):
    scalars = events.Tags()["scalars"]

    for tag in (*TRAIN_SCALARS, *VAL_SCALARS):
        assert tag in scalars
    # log_every_n_steps=5 over 20 steps, and two validations at val_check_interval=10.
    assert len(events.Scalars("train/loss_domain")) == 4
    assert len(events.Scalars("val/im")) == 2
    assert 0.0 < events.Scalars("train/grl_coeff")[-1].value <= 1.0
    assert events.Scalars("train/lr")[-1].value < events.Scalars("train/lr")[0].value


def test_proxy_a_distance_before_and_after(events):
    scalars = events.Tags()["scalars"]
    assert "diagnostics/proxy_a_distance_start" in scalars
    assert "diagnostics/proxy_a_distance_end" in scalars

    start = events.Scalars("diagnostics/proxy_a_distance_start")
    end = events.Scalars("diagnostics/proxy_a_distance_end")
    assert [event.step for event in start] == [0]
    assert [event.step for event in end] == [MAX_STEPS]
    for event in start + end:
        assert -2.0 <= event.value <= 2.0


def test_checkpoint_keeps_best_val_im(run_dir, events):
    checkpoints = list((run_dir / "checkpoints").glob("best_val_im-*.ckpt"))
    assert len(checkpoints) == 1, checkpoints

    checkpoint = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    callback_states = checkpoint["callbacks"]
    states = [state for key, state in callback_states.items() if key.startswith("ModelCheckpoint")]
    assert len(states) == 1
    assert states[0]["monitor"] == "val/im"
    best_im = max(event.value for event in events.Scalars("val/im"))
    assert float(states[0]["best_model_score"]) == pytest.approx(best_im, abs=1e-6)


def test_export_writes_pngs(run_dir, events, tmp_path):
    out_dir = tmp_path / "docs"

    result = run_script(str(EXPORT_SCRIPT), str(run_dir), str(out_dir), cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(EXPORTED_FILES)
    exported_tsne = (out_dir / "tsne.png").read_bytes()
    assert exported_tsne == events.Images("diagnostics/tsne")[-1].encoded_image_string
    curves = (out_dir / "training_curves.png").read_bytes()
    assert curves.startswith(PNG_SIGNATURE)
    width, height = png_size(curves)
    assert width > 1000
    assert height > 500
    assert "diagnostics/proxy_a_distance_end:" in result.stdout
    assert "test/target_acc:" in result.stdout


def test_export_rejects_directory_without_events(tmp_path):
    result = run_script(str(EXPORT_SCRIPT), str(tmp_path), str(tmp_path / "out"), cwd=tmp_path)

    assert result.returncode != 0
    assert "no TensorBoard event file" in result.stderr

import json

import pytest
import torch

from bench.report import accuracy_table, checkpoint_selection, oriented_spearman, select_checkpoint, summarize
from bench.run import build_jobs, main, parse_arguments
from bench.runner import CheckpointRecorder, TargetLabelsAsSource
from bench.suites import ORACLE, SUITES
from torch.utils.data import DataLoader

from lightning_uda import MLP, SourceOnly
from tests.helpers import GaussianBlobsDataModule, cpu_trainer


def test_runner_writes_table_and_json(tmp_path):
    exit_code = main(
        [
            "--suite=bundled",
            "--methods",
            "source_only",
            "oracle",
            "--seeds",
            "0",
            "--override=trainer.max_steps=4",
            "--override=trainer.val_check_interval=2",
            f"--output-dir={tmp_path}",
            f"--work-dir={tmp_path / 'runs'}",
        ]
    )

    assert exit_code == 0
    page = (tmp_path / "bundled.md").read_text()
    assert "python -m bench.run --suite=bundled --methods source_only oracle" in page
    assert "| source only |" in page
    assert "| oracle (target labels) |" in page
    assert page.index("| source only |") < page.index("| oracle (target labels) |")

    record = json.loads((tmp_path / "bundled.json").read_text())
    assert [run["method"] for run in record["runs"]] == ["source_only", "oracle"]
    for run in record["runs"]:
        assert [checkpoint["batches"] for checkpoint in run["checkpoints"]] == [2, 4]
        assert "val/source_acc" in run["checkpoints"][0]
        # The last validation evaluates the final weights, which the test stage measures too.
        assert run["checkpoints"][-1]["target_test_acc"] == pytest.approx(run["test"]["test/target_acc"])
        assert (tmp_path / "runs" / "bundled" / f"{run['method']}_mnist_digits_seed0" / "config.yaml").is_file()
    assert record["summary"]["source_only|mnist|digits"]["target_acc"]["n"] == 1


def test_runner_reuses_finished_runs(tmp_path, caplog):
    arguments = [
        "--suite=bundled",
        "--methods=source_only",
        "--seeds=0",
        "--override=trainer.max_steps=2",
        "--override=trainer.val_check_interval=2",
        f"--output-dir={tmp_path}",
        f"--work-dir={tmp_path / 'runs'}",
    ]
    main(arguments)
    first = json.loads((tmp_path / "bundled.json").read_text())["runs"]

    with caplog.at_level("INFO", logger="bench.run"):
        main(arguments)
    second = json.loads((tmp_path / "bundled.json").read_text())["runs"]

    assert "reusing the finished run" in caplog.text
    assert second == first


def test_runner_rejects_results_it_would_drop(tmp_path):
    common = [
        "--suite=bundled",
        "--methods=source_only",
        "--override=trainer.max_steps=2",
        "--override=trainer.val_check_interval=2",
        f"--output-dir={tmp_path}",
        f"--work-dir={tmp_path / 'runs'}",
    ]
    main([*common, "--seeds=0"])

    with pytest.raises(ValueError, match="--restart"):
        main([*common, "--seeds=1"])


def test_oracle_trains_on_target_labels():
    datamodule = GaussianBlobsDataModule(batch_size=8)
    oracle = TargetLabelsAsSource(datamodule)
    oracle.setup("fit")

    assert oracle.source_train is datamodule.target_train
    assert oracle.target_test is datamodule.target_test
    inputs, labels = next(iter(oracle.train_dataloader()))[0]["source"]
    target_inputs, target_labels = datamodule.target_train.tensors
    for row, label in zip(inputs, labels):
        matches = (target_inputs == row).all(dim=1)
        assert matches.any(), "a labeled training sample of the oracle is not a target training sample"
        assert target_labels[matches][0] == label


class GlobalGeneratorTestLoaders(GaussianBlobsDataModule):
    """Blobs whose test loaders draw their base seed from torch's global generator, as plain DataLoaders do."""

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.source_test, batch_size=16), DataLoader(self.target_test, batch_size=16)]


def test_recorder_leaves_training_unchanged():
    def train(with_recorder: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        # Dropout draws from the global generator, so an extra draw by the recorder would change training.
        model = SourceOnly(feature_extractor=MLP(8, [6], dropout=0.5), num_classes=3, lr=0.1)
        callbacks = [CheckpointRecorder()] if with_recorder else []
        trainer = cpu_trainer(max_steps=6, val_check_interval=2, check_val_every_n_epoch=None, callbacks=callbacks)
        trainer.fit(model, datamodule=GlobalGeneratorTestLoaders(batch_size=16))
        return [parameter.detach().clone() for parameter in model.parameters()]

    without, recorded = train(False), train(True)

    assert all(torch.equal(a, b) for a, b in zip(without, recorded))


def _checkpoint(step: int, accuracy: float, source_acc: float, source_loss: float) -> dict:
    return {
        "global_step": step,
        "target_test_acc": accuracy,
        "val/source_acc": source_acc,
        "val/source_loss": source_loss,
    }


def test_selection_follows_criterion_direction():
    checkpoints = [_checkpoint(1, 0.5, 0.6, 0.9), _checkpoint(2, 0.7, 0.9, 0.4), _checkpoint(3, 0.6, 0.8, 0.2)]

    assert select_checkpoint(checkpoints, "val/source_acc", "max")["global_step"] == 2
    assert select_checkpoint(checkpoints, "val/source_loss", "min")["global_step"] == 3
    assert select_checkpoint(checkpoints, "val/snd", "max") is None


def test_spearman_oriented_by_direction():
    checkpoints = [_checkpoint(step, 0.1 * step, 0.1 * step, 1.0 - 0.1 * step) for step in range(1, 5)]

    assert oriented_spearman(checkpoints, "val/source_acc", "max") == pytest.approx(1.0)
    assert oriented_spearman(checkpoints, "val/source_loss", "min") == pytest.approx(1.0)
    assert oriented_spearman(checkpoints[:2], "val/source_acc", "max") is None


def test_checkpoint_selection_reports_last_and_best():
    runs = [
        {"checkpoints": [_checkpoint(1, 0.5, 0.6, 0.9), _checkpoint(2, 0.7, 0.9, 0.4), _checkpoint(3, 0.6, 0.8, 0.2)]},
        {"checkpoints": [_checkpoint(1, 0.4, 0.7, 0.5), _checkpoint(2, 0.3, 0.6, 0.6), _checkpoint(3, 0.2, 0.5, 0.7)]},
    ]

    selection = checkpoint_selection(runs)

    assert selection["last"]["picked_acc"] == [0.6, 0.2]
    assert selection["best"]["picked_acc"] == [0.7, 0.4]
    assert selection["val/source_acc"]["picked_acc"] == [0.7, 0.4]
    assert selection["val/source_loss"]["picked_acc"] == [0.6, 0.4]
    assert selection["val/source_loss"]["mode"] == "min"


def test_oracle_jobs_once_per_target():
    suite = SUITES["amazon"]
    arguments = parse_arguments(["--suite=amazon", "--seeds", "0", "1"])

    jobs = build_jobs(suite, ["source_only", ORACLE], list(suite.pairs), [0, 1], arguments)

    oracle_jobs = sorted((job.target, job.seed) for job in jobs if job.method == ORACLE)
    targets = ("books", "dvd", "electronics", "kitchen")
    assert oracle_jobs == sorted((target, seed) for target in targets for seed in (0, 1))
    assert sum(job.method == "source_only" for job in jobs) == 12 * 2


def test_oracle_result_fills_every_pair_with_its_target():
    suite = SUITES["amazon"]
    runs = [
        {
            "method": ORACLE,
            "source": "dvd",
            "target": "books",
            "seed": seed,
            "test": {"test/target_acc": accuracy},
            "checkpoints": [],
        }
        for seed, accuracy in ((0, 0.80), (1, 0.82))
    ]
    pairs = [("dvd", "books"), ("electronics", "books"), ("books", "dvd")]

    lines = accuracy_table(suite, [ORACLE], pairs, summarize(suite, runs))

    assert lines[-1] == "| oracle (target labels) | 81.0 ± 1.4 | 81.0 ± 1.4 | – | – |"

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from threadpoolctl import threadpool_limits

from lightning_uda import DANN
from lightning_uda.diagnostics import AdaptationDiagnostics, proxy_a_distance, tsne_embedding
from tests.helpers import GaussianBlobsDataModule, TinyFeatures, cpu_trainer

NUM_CLASSES = 3
TEST_SIZE = 48  # GaussianBlobsDataModule: half of its 96 samples per domain


@pytest.fixture(autouse=True)
def single_thread_pools():
    # On 2 busy cores, scikit-learn's OpenMP t-SNE of 80 points took 7 CPU-seconds with 2 threads
    # and 0.2 with 1, because its threads spin while waiting for each other.
    with threadpool_limits(limits=1):
        yield


def read_events(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


# ----------------------------------------------------------------------------- array functions
def test_proxy_a_distance_identical_domains_near_zero():
    rng = np.random.default_rng(0)
    # Unequal sizes: without balancing, always predicting "source" would give err 1/6 and a distance of 1.33.
    distance = proxy_a_distance(rng.normal(size=(1000, 10)), rng.normal(size=(200, 10)))

    assert abs(distance) < 0.3


def test_proxy_a_distance_separated_domains_near_two():
    rng = np.random.default_rng(0)
    distance = proxy_a_distance(rng.normal(size=(300, 10)), rng.normal(size=(300, 10)) + 3.0)

    assert distance > 1.9


def test_tsne_keeps_far_clusters_apart():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(size=(40, 60)), rng.normal(size=(40, 60)) + 10.0])

    points = tsne_embedding(features, perplexity=10.0)

    assert points.shape == (80, 2)
    first, second = points[:40], points[40:]
    gap = np.linalg.norm(first.mean(axis=0) - second.mean(axis=0))
    spread = max(first.std(axis=0).max(), second.std(axis=0).max())
    assert gap > 3 * spread


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_epochs must be at least 1"):
        AdaptationDiagnostics(every_n_epochs=0)
    with pytest.raises(ValueError, match="split must be 'test' or 'val'"):
        AdaptationDiagnostics(split="train")


# ----------------------------------------------------------------------------- in a Trainer
def test_diagnostics_written_to_tensorboard(tmp_path):
    torch.manual_seed(0)
    model = DANN(feature_extractor=TinyFeatures(), num_classes=NUM_CLASSES)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    diagnostics = AdaptationDiagnostics(every_n_epochs=1, max_points=60, perplexity=5.0)
    trainer = cpu_trainer(max_epochs=2, logger=logger, callbacks=[diagnostics], num_sanity_val_steps=0)

    trainer.fit(model, datamodule=GaussianBlobsDataModule(num_classes=NUM_CLASSES, batch_size=16))

    events = read_events(logger.log_dir)
    images = events.Tags()["images"]
    assert "diagnostics/tsne" in images
    assert "diagnostics/target_confusion_matrix" in images
    # One figure per epoch. The end of training falls on the last epoch's step, so it adds none.
    tsne_steps = [image.step for image in events.Images("diagnostics/tsne")]
    assert tsne_steps == [trainer.global_step // 2, trainer.global_step]
    assert events.Images("diagnostics/target_confusion_matrix")[-1].width > 100

    start = events.Scalars("diagnostics/proxy_a_distance_start")
    end = events.Scalars("diagnostics/proxy_a_distance_end")
    assert [event.step for event in start] == [0]
    assert [event.step for event in end] == [trainer.global_step]
    for event in start + end:
        assert -2.0 <= event.value <= 2.0
    assert len(events.Scalars("diagnostics/proxy_a_distance")) == 3  # fit start and two epochs


def test_diagnostics_restores_module_modes():
    model = DANN(feature_extractor=TinyFeatures(), num_classes=NUM_CLASSES)
    datamodule = GaussianBlobsDataModule(num_classes=NUM_CLASSES, batch_size=16)
    trainer = cpu_trainer(max_epochs=1)
    trainer.fit(model, datamodule=datamodule)
    model.train()
    model.classifier.eval()  # e.g. a frozen head

    outputs = AdaptationDiagnostics()._collect_outputs(trainer, model)

    assert model.feature_extractor.training
    assert not model.classifier.training
    assert outputs["target"]["features"].shape == (TEST_SIZE, TinyFeatures.out_features)
    assert outputs["source"]["logits"].shape == (TEST_SIZE, NUM_CLASSES)


def test_diagnostics_without_tensorboard_writes_scalars(tmp_path):
    model = DANN(feature_extractor=TinyFeatures(), num_classes=NUM_CLASSES)
    logger = CSVLogger(tmp_path, name="run", version=0)
    diagnostics = AdaptationDiagnostics(max_points=60, perplexity=5.0)
    trainer = cpu_trainer(max_steps=3, logger=logger, callbacks=[diagnostics])

    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        trainer.fit(model, datamodule=GaussianBlobsDataModule(num_classes=NUM_CLASSES, batch_size=16))

    logged = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "diagnostics/proxy_a_distance_start" in logged
    assert "diagnostics/proxy_a_distance_end" in logged

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from threadpoolctl import threadpool_limits

from lightning_uda import DANN
from lightning_uda.validators import (
    DeepEmbeddedValidation,
    InformationMaximization,
    SoftNeighborhoodDensity,
    TargetEntropy,
    build_validators,
    deep_embedded_validation,
    information_maximization,
    monitor_mode,
    soft_neighborhood_density,
)
from tests.helpers import GaussianBlobsDataModule, TinyFeatures, cpu_trainer

NUM_CLASSES = 4


@pytest.fixture(autouse=True)
def single_thread_pools():
    # OpenMP threads that spin on busy cores slow these small computations down several times over.
    with threadpool_limits(limits=1):
        yield


def clustered_and_random(num_clusters=5, per_cluster=40, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = 5 * torch.randn(num_clusters, dim, generator=generator)
    clustered = centers.repeat_interleave(per_cluster, dim=0)
    clustered = clustered + 0.1 * torch.randn(len(clustered), dim, generator=generator)
    scattered = torch.randn(len(clustered), dim, generator=generator)
    return clustered, scattered


def update_target(metric, logits, features=None, batch_size=7):
    """Feed ``logits`` to a validator as target batches of ``batch_size``."""
    if features is None:
        features = torch.zeros(len(logits), 3)
    for start in range(0, len(logits), batch_size):
        stop = start + batch_size
        metric.update("target", features[start:stop], logits[start:stop])


# ----------------------------------------------------------------------------- exact values on hand-made inputs
def test_uniform_predictions_entropy_and_im():
    logits = torch.zeros(30, NUM_CLASSES)
    entropy, im = TargetEntropy(), InformationMaximization(NUM_CLASSES)
    update_target(entropy, logits)
    update_target(im, logits)

    assert entropy.compute().item() == pytest.approx(math.log(NUM_CLASSES), abs=1e-5)
    assert im.compute().item() == pytest.approx(0.0, abs=1e-5)


def test_confident_balanced_predictions_im_is_log_c():
    logits = 50.0 * torch.eye(NUM_CLASSES).repeat(6, 1)  # every class predicted 6 times, with certainty
    entropy, im = TargetEntropy(), InformationMaximization(NUM_CLASSES)
    update_target(entropy, logits)
    update_target(im, logits)

    assert im.compute().item() == pytest.approx(math.log(NUM_CLASSES), abs=1e-5)
    assert entropy.compute().item() == pytest.approx(0.0, abs=1e-5)


def test_collapsed_predictions_im_is_zero():
    logits = torch.zeros(24, NUM_CLASSES)
    logits[:, 2] = 50.0  # confident, but always the same class
    im = InformationMaximization(NUM_CLASSES)
    update_target(im, logits)

    assert im.compute().item() == pytest.approx(0.0, abs=1e-5)


def test_batched_metrics_match_whole_data():
    logits = torch.randn(50, NUM_CLASSES, generator=torch.Generator().manual_seed(1))
    entropy, im, snd = TargetEntropy(), InformationMaximization(NUM_CLASSES), SoftNeighborhoodDensity()
    for metric in (entropy, im, snd):
        update_target(metric, logits)
    probs = logits.softmax(dim=1)
    expected_entropy = -(probs * probs.log()).sum(dim=1).mean()

    assert entropy.compute().item() == pytest.approx(expected_entropy.item(), rel=1e-5)
    assert im.compute().item() == pytest.approx(information_maximization(logits).item(), rel=1e-5)
    assert snd.compute().item() == pytest.approx(soft_neighborhood_density(probs).item(), rel=1e-5)


def test_snd_higher_for_clustered_features():
    clustered, scattered = clustered_and_random()

    assert soft_neighborhood_density(clustered) > soft_neighborhood_density(scattered) + 0.5


def test_snd_matches_direct_formula_and_chunks():
    embeddings = torch.randn(23, 5, generator=torch.Generator().manual_seed(2))
    normalized = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = normalized @ normalized.T / 0.05
    entropies = []
    for i in range(len(embeddings)):
        others = torch.cat([similarity[i, :i], similarity[i, i + 1 :]])  # own similarity left out
        probs = others.softmax(dim=0)
        entropies.append(-(probs * probs.log()).sum())
    expected = torch.stack(entropies).mean().item()

    assert soft_neighborhood_density(embeddings).item() == pytest.approx(expected, rel=1e-4)
    assert soft_neighborhood_density(embeddings, chunk_size=4).item() == pytest.approx(expected, rel=1e-4)


def test_snd_two_points_is_zero():
    # With self left out, each point's only neighbor gets probability 1, so the entropy is 0.
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    assert soft_neighborhood_density(embeddings).item() == pytest.approx(0.0, abs=1e-6)


def test_snd_identical_predictions_give_maximum():
    # The pitfall stated in the SoftNeighborhoodDensity note: uniform neighbors, entropy log(N - 1).
    logits = torch.zeros(30, NUM_CLASSES)

    assert soft_neighborhood_density(logits.softmax(dim=1)).item() == pytest.approx(math.log(29), rel=1e-5)


def test_snd_on_features_option():
    clustered, scattered = clustered_and_random()
    uninformative_logits = torch.zeros(len(clustered), NUM_CLASSES)
    on_clustered = SoftNeighborhoodDensity(embedding="features")
    on_scattered = SoftNeighborhoodDensity(embedding="features")
    update_target(on_clustered, uninformative_logits, features=clustered)
    update_target(on_scattered, uninformative_logits, features=scattered)

    assert on_clustered.compute() > on_scattered.compute()


def test_dev_identical_domains_is_mean_loss():
    rng = np.random.default_rng(0)
    source_features = rng.normal(size=(400, 8))
    target_features = rng.normal(size=(300, 8))
    source_losses = rng.exponential(size=400)

    risk = deep_embedded_validation(source_features, source_losses, target_features)

    assert risk == pytest.approx(source_losses.mean(), rel=0.05)


def test_dev_tracks_shift_towards_high_loss():
    # The loss is high where x_0 > 0 and the target moves towards x_0 > 0, so the target risk
    # (about 1 + P(N(0.7, 1) > 0) = 1.76) is above the plain source mean (about 1.5).
    rng = np.random.default_rng(0)
    source_features = rng.normal(size=(1000, 4))
    target_features = rng.normal(size=(1000, 4))
    target_features[:, 0] += 0.7
    source_losses = 1.0 + (source_features[:, 0] > 0)

    risk = deep_embedded_validation(source_features, source_losses, target_features)

    assert risk > source_losses.mean() + 0.1
    assert risk == pytest.approx(1.76, abs=0.1)


def test_dev_metric_matches_function():
    generator = torch.Generator().manual_seed(3)
    source_features = torch.randn(60, 5, generator=generator)
    target_features = torch.randn(40, 5, generator=generator)
    source_logits = torch.randn(60, NUM_CLASSES, generator=generator)
    source_labels = torch.randint(0, NUM_CLASSES, (60,), generator=generator)
    metric = DeepEmbeddedValidation()
    for start in range(0, 60, 16):
        batch = slice(start, start + 16)
        metric.update("source", source_features[batch], source_logits[batch], source_labels[batch])
    metric.update("target", target_features, torch.zeros(40, NUM_CLASSES))
    losses = torch.nn.functional.cross_entropy(source_logits, source_labels, reduction="none")

    expected = deep_embedded_validation(source_features.numpy(), losses.numpy(), target_features.numpy())

    assert metric.compute().item() == pytest.approx(expected, rel=1e-5)


def test_dev_rejects_tiny_domains():
    with pytest.raises(ValueError, match="at least 2 samples per domain"):
        deep_embedded_validation(np.zeros((5, 3)), np.zeros(5), np.zeros((1, 3)))


# ----------------------------------------------------------------------------- interface
def test_target_labels_rejected():
    metric = TargetEntropy()
    with pytest.raises(ValueError, match="target labels must not reach"):
        metric.update("target", torch.zeros(2, 3), torch.zeros(2, NUM_CLASSES), torch.zeros(2, dtype=torch.long))


def test_source_batches_without_labels_rejected():
    with pytest.raises(ValueError, match="source batches need their labels"):
        DeepEmbeddedValidation().update("source", torch.zeros(2, 3), torch.zeros(2, NUM_CLASSES))


def test_target_only_validators_ignore_source():
    metric = TargetEntropy()
    metric.update("source", torch.zeros(3, 3), 50 * torch.eye(3), torch.arange(3))
    metric.update("target", torch.zeros(2, 3), torch.zeros(2, 3))

    assert metric.compute().item() == pytest.approx(math.log(3), abs=1e-5)


@pytest.mark.parametrize(
    "monitor, mode",
    [
        ("val/target_entropy", "min"),
        ("val/im", "max"),
        ("val/snd", "max"),
        ("val/dev", "min"),
        ("dev", "min"),
        ("val/source_acc", "max"),
        ("val/source_loss", "min"),
    ],
)
def test_monitor_mode(monitor, mode):
    assert monitor_mode(monitor) == mode


def test_monitor_mode_unknown_name():
    with pytest.raises(ValueError, match="no known direction for 'val/nonsense'"):
        monitor_mode("val/nonsense")


def test_build_validators_names_and_errors():
    validators = build_validators(["snd", "im", "dev", "target_entropy"], num_classes=NUM_CLASSES)

    assert list(validators) == ["snd", "im", "dev", "target_entropy"]
    assert isinstance(validators["im"], InformationMaximization)
    assert validators["im"].num_classes == NUM_CLASSES
    with pytest.raises(ValueError, match="unknown validator 'accuracy'"):
        build_validators(["accuracy"], num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="listed twice"):
        build_validators(["snd", "snd"], num_classes=NUM_CLASSES)


# ----------------------------------------------------------------------------- in a Trainer
class EpochScoreRecorder(Callback):
    def __init__(self, key):
        self.key = key
        self.scores = []

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.scores.append(trainer.callback_metrics[self.key].item())


def test_validators_logged_and_monitored(tmp_path):
    torch.manual_seed(0)
    validators = ["target_entropy", "im", "snd", "dev"]
    model = DANN(feature_extractor=TinyFeatures(), num_classes=2, validators=validators)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/snd", mode=monitor_mode("val/snd"))
    recorder = EpochScoreRecorder("val/snd")
    trainer = cpu_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[checkpoint, recorder])

    trainer.fit(model, datamodule=GaussianBlobsDataModule(num_classes=2, batch_size=16))

    for name in ("val/target_entropy", "val/im", "val/snd", "val/dev", "val/source_acc"):
        assert name in trainer.callback_metrics, f"{name} not logged"
        assert torch.isfinite(trainer.callback_metrics[name]), f"{name} is not finite"
    assert len(recorder.scores) == 3
    assert checkpoint.best_model_score.item() == pytest.approx(max(recorder.scores))
    assert 0.0 <= trainer.callback_metrics["val/im"].item() <= math.log(2) + 1e-5


# ----------------------------------------------------------------------------- DDP state sync
def free_loopback_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank, world_size, port, logits, splits, output_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        snd, im = SoftNeighborhoodDensity(), InformationMaximization(logits.shape[1])
        shard = logits[splits[rank] : splits[rank + 1]]  # uneven shards, so the "cat" gather pads
        update_target(snd, shard)
        update_target(im, shard)
        torch.save({"snd": snd.compute(), "im": im.compute()}, f"{output_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_state_sync_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by each spawned worker's OpenMP runtime
    logits = torch.randn(50, NUM_CLASSES, generator=torch.Generator().manual_seed(4))
    splits = [0, 31, 50]

    # spawn, not fork: forked workers hung when a Trainer had run earlier in the same pytest process
    mp.spawn(ddp_worker, args=(2, free_loopback_port(), logits, splits, str(tmp_path)), nprocs=2)

    expected_snd = soft_neighborhood_density(logits.softmax(dim=1)).item()
    expected_im = information_maximization(logits).item()
    for rank in range(2):
        scores = torch.load(tmp_path / f"rank{rank}.pt")
        assert scores["snd"].item() == pytest.approx(expected_snd, rel=1e-5), f"rank {rank} SND"
        assert scores["im"].item() == pytest.approx(expected_im, rel=1e-5), f"rank {rank} IM"

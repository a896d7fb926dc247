import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_uda import SourceOnly
from lightning_uda.importance_weighting import (
    MAX_LOG_RATIO,
    ImportanceWeighting,
    ImportanceWeightNormalizer,
    effective_sample_size,
    log_density_ratio,
)
from tests.helpers import TinyFeatures, cpu_trainer, two_stream_loader
from train import DomainAdaptationCLI

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

LOGGED_KEYS = ("train/loss_task", "train/loss_domain", "train/domain_acc", "train/iw_mean", "train/iw_max", "train/iw_ess")


@pytest.fixture(autouse=True)
def single_thread():
    # The models here are tiny, so intra-op threads cost more in synchronisation than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class IdentityFeatures(nn.Module):
    """Feature extractor that returns its inputs unchanged, so the classifier is linear in the inputs."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.out_features = in_features

    def forward(self, inputs):
        return inputs


class LogisticDiscriminator(nn.Module):
    """Logistic regression domain discriminator: one logit per sample, shape (B,)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, inputs):
        return self.linear(inputs).squeeze(1)


class StepRecorder(Callback):
    """Record parameters and logged values at the end of every training batch."""

    def __init__(self):
        self.records = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.discriminator_before = [p.detach().clone() for p in module.domain_discriminator.parameters()]
        self.classifier_before = [p.detach().clone() for p in module.classifier.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        record = {key: trainer.callback_metrics[key].item() for key in LOGGED_KEYS}
        record["discriminator_changed"] = any(
            not torch.equal(b, p) for b, p in zip(self.discriminator_before, module.domain_discriminator.parameters())
        )
        record["classifier_changed"] = any(
            not torch.equal(b, p) for b, p in zip(self.classifier_before, module.classifier.parameters())
        )
        if module.frozen_feature_extractor is not None:
            record["frozen"] = [p.detach().clone() for p in module.frozen_feature_extractor.parameters()]
            record["live"] = [p.detach().clone() for p in module.feature_extractor.parameters()]
        self.records.append(record)


def two_gaussian_loader(source_inputs, source_labels, target_inputs, batch_size):
    source = DataLoader(TensorDataset(source_inputs, source_labels), batch_size=batch_size, shuffle=True)
    target = DataLoader(target_inputs, batch_size=batch_size, shuffle=True)
    return CombinedLoader({"source": source, "target": target}, mode="max_size_cycle")


# ----------------------------------------------------------------- weight arithmetic
def test_log_density_ratio_sign_and_prior():
    logits = torch.tensor([2.0, 0.0, -3.0])

    torch.testing.assert_close(log_density_ratio(logits), torch.tensor([-2.0, 0.0, 3.0]))
    # 300 source against 100 target samples: the logit carries log 3 of prior, which is removed.
    torch.testing.assert_close(
        log_density_ratio(logits, source_size=300, target_size=100), torch.tensor([-2.0, 0.0, 3.0]) + math.log(3)
    )
    with pytest.raises(ValueError, match="target_size"):
        log_density_ratio(logits, target_size=0)


@pytest.mark.parametrize("normalization", ["batch", "running", "none"])
@pytest.mark.parametrize("max_weight", [10.0, None])
def test_weights_finite_for_any_logit(normalization, max_weight):
    normalizer = ImportanceWeightNormalizer(normalization, max_weight=max_weight).train()
    logits = torch.tensor([math.inf, -math.inf, math.nan, 3e38, -3e38, 0.0, 60.0, -60.0, 1e-30])

    for _ in range(3):  # the running estimate is updated, then used
        weights = normalizer(log_density_ratio(logits)).exp()

        assert torch.isfinite(weights).all(), weights
        assert (weights >= 0).all(), weights
        if max_weight is not None:
            assert weights.max() <= max_weight * (1 + 1e-6)
    assert torch.isfinite(normalizer.running_log_mean)
    assert torch.isfinite(effective_sample_size(normalizer(log_density_ratio(logits))))


@pytest.mark.parametrize("normalization", ["batch", "running"])
def test_equal_raw_weights_give_ones(normalization):
    normalizer = ImportanceWeightNormalizer(normalization, max_weight=None).train()

    # batch normalisation gives ones for any constant; the running estimate, set by the first
    # batch, gives ones while the constant stays the same
    logits = (-7.0, -7.0, 3.0) if normalization == "batch" else (-7.0, -7.0, -7.0)
    for logit in logits:
        weights = normalizer(log_density_ratio(torch.full((5,), logit))).exp()

        torch.testing.assert_close(weights, torch.ones(5), rtol=1e-6, atol=1e-6)


def test_batch_normalization_gives_mean_one():
    log_ratio = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3

    weights = ImportanceWeightNormalizer("batch", max_weight=None)(log_ratio).exp()

    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(weights / weights[0], (log_ratio - log_ratio[0]).exp())


def test_max_weight_clips_after_normalization():
    log_ratio = torch.tensor([0.0, 0.0, 0.0, 10.0])

    weights = ImportanceWeightNormalizer("batch", max_weight=2.0)(log_ratio).exp()

    assert weights[3].item() == pytest.approx(2.0)
    # the unclipped weights keep their normalised value, ~4 / (3 + e^10)
    assert weights[0].item() == pytest.approx(4 / (3 + math.exp(10)), rel=1e-5)
    with pytest.raises(ValueError, match="max_weight"):
        ImportanceWeightNormalizer(max_weight=0.5)


def test_weight_exponent_flattens_weights():
    log_ratio = torch.tensor([-2.0, 0.0, 1.0, 4.0])

    flat = ImportanceWeightNormalizer("none", max_weight=None, weight_exponent=0.0)(log_ratio).exp()
    half = ImportanceWeightNormalizer("none", max_weight=None, weight_exponent=0.5)(log_ratio).exp()

    torch.testing.assert_close(flat, torch.ones(4))
    torch.testing.assert_close(half, (0.5 * log_ratio).exp())


def test_running_estimate_tracks_mean_weight():
    generator = torch.Generator().manual_seed(0)
    normalizer = ImportanceWeightNormalizer("running", momentum=0.05).train()
    # log r ~ N(-1/2, 1), so E[r] = 1 and the running log mean should approach 0
    for _ in range(400):
        normalizer(torch.randn(64, generator=generator) - 0.5)

    assert normalizer.num_batches_tracked.item() == 400
    assert abs(normalizer.running_log_mean.item()) < 0.15
    before = normalizer.running_log_mean.clone()
    normalizer.eval()(torch.full((4,), 10.0))
    assert torch.equal(normalizer.running_log_mean, before)


def test_effective_sample_size_bounds():
    assert effective_sample_size(torch.zeros(10)).item() == pytest.approx(1.0)
    one_hot = torch.tensor([0.0] + [-1e4] * 9)
    assert effective_sample_size(one_hot).item() == pytest.approx(0.1)
    huge = torch.tensor([MAX_LOG_RATIO, MAX_LOG_RATIO, 0.0])
    assert effective_sample_size(huge).item() == pytest.approx(2 / 3, rel=1e-5)


def fixed_input_model(normalization):
    torch.manual_seed(0)
    discriminator = LogisticDiscriminator(8)
    return ImportanceWeighting(
        feature_extractor=TinyFeatures(),
        domain_discriminator=discriminator,
        discriminator_input="input",
        normalization=normalization,
        max_weight=None,
        num_classes=2,
    )


@pytest.mark.parametrize("normalization", ["running", "none"])
def test_weight_independent_of_batch_size(normalization):
    model = fixed_input_model(normalization)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(3):  # give the running estimate a value other than the first batch's mean
        model.importance_weights(torch.randn(16, 8, generator=generator) * 2, update=True)
    batch = torch.randn(80, 8, generator=generator) * 2

    small = model.importance_weights(batch[:8])
    large = model.importance_weights(batch)

    torch.testing.assert_close(small, large[:8])


def test_batch_normalization_depends_on_batch():
    # Documents why the batch-size invariance holds only for "running" and "none".
    model = fixed_input_model("batch")
    batch = torch.randn(80, 8, generator=torch.Generator().manual_seed(1)) * 2

    small = model.importance_weights(batch[:8])
    large = model.importance_weights(batch)

    assert not torch.allclose(small, large[:8], rtol=1e-3)
    torch.testing.assert_close(small / small[0], large[:8] / large[0])


# ----------------------------------------------------------------- the module in training
@pytest.mark.parametrize("discriminator_input", ["input", "features", "frozen_features"])
def test_steps_update_both_and_log(discriminator_input):
    torch.manual_seed(0)
    discriminator = LogisticDiscriminator(8) if discriminator_input == "input" else None
    model = ImportanceWeighting(
        feature_extractor=TinyFeatures(),
        domain_discriminator=discriminator,
        discriminator_input=discriminator_input,
        warmup_fraction=0.0,
        num_classes=2,
    )
    recorder = StepRecorder()
    num_batches = 4

    trainer = cpu_trainer(max_steps=2 * num_batches, callbacks=[recorder])
    trainer.fit(model, two_stream_loader())

    assert len(trainer.optimizers) == 2
    assert len(trainer.lr_scheduler_configs) == 2
    assert len(recorder.records) == num_batches
    for batch_idx, record in enumerate(recorder.records):
        assert record["discriminator_changed"], f"discriminator unchanged at batch {batch_idx}"
        assert record["classifier_changed"], f"classifier unchanged at batch {batch_idx}"
        for key in LOGGED_KEYS:
            assert math.isfinite(record[key]), f"{key} = {record[key]} at batch {batch_idx}"
        assert 0 < record["train/iw_ess"] <= 1
        assert record["train/iw_max"] <= 10.0 + 1e-4


def test_frozen_copy_follows_warmup_then_stays():
    torch.manual_seed(0)
    model = ImportanceWeighting(feature_extractor=TinyFeatures(), warmup_fraction=0.5, num_classes=2, lr=0.1)
    recorder = StepRecorder()
    num_batches = 8

    cpu_trainer(max_steps=2 * num_batches, callbacks=[recorder]).fit(model, two_stream_loader(num_source=128))

    frozen_ids = {id(p) for p in model.frozen_feature_extractor.parameters()}
    optimized_ids = {id(p) for opt in model.optimizers_list() for g in opt.param_groups for p in g["params"]}
    assert not frozen_ids & optimized_ids
    assert all(not p.requires_grad for p in model.frozen_feature_extractor.parameters())
    warmup, after = recorder.records[:4], recorder.records[4:]
    for batch_idx, record in enumerate(warmup):
        # during the warm-up the copy is synced after each step of the feature extractor
        for frozen, live in zip(record["frozen"], record["live"]):
            torch.testing.assert_close(frozen, live)
        assert record["train/iw_max"] == 1.0, f"warm-up batch {batch_idx} used weights other than 1"
        assert record["train/iw_ess"] == pytest.approx(1.0)
    for batch_idx, record in enumerate(after, start=4):
        for frozen, last_warmup_live in zip(record["frozen"], warmup[-1]["live"]):
            torch.testing.assert_close(frozen, last_warmup_live)
        assert any(not torch.equal(f, live) for f, live in zip(record["frozen"], record["live"]))
        assert record["train/iw_max"] != 1.0, f"batch {batch_idx} after the warm-up used unit weights"


def test_frozen_copy_stays_in_eval_mode():
    model = ImportanceWeighting(feature_extractor=nn.Sequential(nn.Dropout(0.5)), classifier=nn.Linear(4, 2),
                                domain_discriminator=LogisticDiscriminator(4), num_classes=2)
    model.train()

    assert model.feature_extractor.training
    assert not model.frozen_feature_extractor.training
    inputs = torch.ones(3, 4)
    torch.testing.assert_close(model.discriminator_view(inputs), inputs)


def test_running_estimate_saved_in_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ImportanceWeighting(feature_extractor=TinyFeatures(), warmup_fraction=0.0, num_classes=2)
    trainer = cpu_trainer(max_steps=8)
    trainer.fit(model, two_stream_loader())
    path = tmp_path / "iw.ckpt"
    trainer.save_checkpoint(path)

    state = torch.load(path, weights_only=False)["state_dict"]
    restored = ImportanceWeighting(feature_extractor=TinyFeatures(), num_classes=2)
    restored.load_state_dict(state)

    assert model.weight_normalizer.num_batches_tracked.item() == 4
    assert model.weight_normalizer.running_log_mean.item() != 0.0
    assert torch.equal(restored.weight_normalizer.running_log_mean, model.weight_normalizer.running_log_mean)
    assert torch.equal(restored.weight_normalizer.num_batches_tracked, model.weight_normalizer.num_batches_tracked)
    for saved, loaded in zip(model.frozen_feature_extractor.parameters(), restored.frozen_feature_extractor.parameters()):
        assert torch.equal(saved, loaded)


def test_discriminator_lr_multiplier():
    torch.manual_seed(0)
    model = ImportanceWeighting(
        feature_extractor=TinyFeatures(), num_classes=2, lr=0.02, lr_alpha=0.0, discriminator_lr_mult=5.0
    )
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(model, two_stream_loader())

    discriminator_optimizer, classifier_optimizer = trainer.optimizers
    assert discriminator_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert classifier_optimizer.param_groups[0]["lr"] == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"discriminator_input": "pixels"}, "discriminator_input"),
        ({"discriminator_input": "input"}, "domain_discriminator"),
        ({"normalization": "median"}, "normalization"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"weight_exponent": 1.5}, "weight_exponent"),
        ({"running_momentum": 0.0}, "momentum"),
        ({"discriminator_lr_mult": 0.0}, "discriminator_lr_mult"),
    ],
)
def test_invalid_arguments_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        ImportanceWeighting(feature_extractor=TinyFeatures(), num_classes=2, **arguments)


# ----------------------------------------------------------------- known results
def test_density_ratio_of_shifted_gaussians():
    # source N(0, 1), target N(1, 1): p_t(x) / p_s(x) = exp(x - 1/2)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    source_inputs = torch.randn(4096, 1, generator=generator)
    target_inputs = torch.randn(4096, 1, generator=generator) + 1.0
    loader = two_gaussian_loader(source_inputs, torch.zeros(4096, dtype=torch.long), target_inputs, 512)
    model = ImportanceWeighting(
        feature_extractor=IdentityFeatures(1),
        domain_discriminator=LogisticDiscriminator(1),
        discriminator_input="input",
        normalization="none",
        max_weight=None,
        warmup_fraction=0.0,
        num_classes=2,
        lr=1.0,
        weight_decay=0.0,
        lr_alpha=0.0,
    )

    cpu_trainer(max_epochs=8).fit(model, loader)

    grid = torch.linspace(-2, 3, 51)[:, None]
    estimate = model.importance_weights(grid)
    truth = torch.exp(grid[:, 0] - 0.5)
    correlation = torch.corrcoef(torch.stack([estimate, truth]))[0, 1].item()
    median_relative_error = ((estimate - truth).abs() / truth).median().item()
    assert correlation > 0.95
    assert median_relative_error < 0.25


def test_covariate_shift_weighting_beats_unweighted():
    # Both domains share one labelling rule with a parabolic boundary, which no line fits everywhere.
    # The target lies to the right, where the best line differs from the best line for the source.
    generator = torch.Generator().manual_seed(0)

    def label(inputs):
        return (inputs[:, 0] ** 2 + 0.5 * inputs[:, 1] > 1).long()

    source_inputs = torch.randn(2048, 2, generator=generator)
    target_inputs = torch.randn(2048, 2, generator=generator) + torch.tensor([1.5, 0.0])
    source_labels, target_labels = label(source_inputs), label(target_inputs)
    common = dict(num_classes=2, lr=0.4, weight_decay=0.0, lr_alpha=0.0)

    def target_error(model):
        return (model(target_inputs).argmax(1) != target_labels).float().mean().item()

    torch.manual_seed(0)
    unweighted = SourceOnly(feature_extractor=IdentityFeatures(2), **common)
    cpu_trainer(max_epochs=6).fit(unweighted, two_gaussian_loader(source_inputs, source_labels, target_inputs, 256))
    torch.manual_seed(0)
    weighted = ImportanceWeighting(
        feature_extractor=IdentityFeatures(2),
        domain_discriminator=LogisticDiscriminator(2),
        discriminator_input="input",
        warmup_fraction=0.0,
        max_weight=20.0,
        **common,
    )
    cpu_trainer(max_epochs=6).fit(weighted, two_gaussian_loader(source_inputs, source_labels, target_inputs, 256))

    unweighted_error, weighted_error = target_error(unweighted), target_error(weighted)
    assert weighted_error < 0.15, f"weighted target error {weighted_error:.3f}"
    assert weighted_error < unweighted_error - 0.2, f"weighted {weighted_error:.3f}, unweighted {unweighted_error:.3f}"


# ----------------------------------------------------------------- configs
@pytest.mark.parametrize("pair", ["bundled_digits", "mnist_usps"])
def test_config_matches_source_only_schedule(pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = PROJECT_ROOT / "configs" / f"importance_weighting_{pair}.yaml"
    data_root = [] if pair == "bundled_digits" else [f"--data.root={SHARED_DATA}"]

    cli = DomainAdaptationCLI(args=["--config", str(config), *data_root], run=False)

    assert isinstance(cli.model, ImportanceWeighting)
    assert cli.model.num_classes == 10
    # two optimizer steps a batch: the same number of batches as the source-only baseline
    source_only = yaml.safe_load((PROJECT_ROOT / "configs" / f"source_only_{pair}.yaml").read_text())
    assert cli.trainer.max_steps == 2 * source_only["trainer"]["max_steps"]
    assert source_only["model"]["init_args"]["lr"] == cli.model.hparams.lr
    assert source_only["data"]["init_args"]["batch_size"] == cli.datamodule.hparams.batch_size

import math

import pytest
import torch
from lightning import Callback

import lightning_uda.dann as dann_module
from lightning_uda import DANN, SourceOnly
from lightning_uda.schedules import annealed_lr_factor, grl_coefficient
from tests.helpers import TinyFeatures, cpu_trainer, two_stream_loader


class ParameterChangeRecorder(Callback):
    """Record, for every batch, whether each named sub-module's parameters changed."""

    def __init__(self, names):
        self.names = names
        self.changed = []

    def _snapshot(self, module):
        return {name: [p.detach().clone() for p in getattr(module, name).parameters()] for name in self.names}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = self._snapshot(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        after = self._snapshot(module)
        self.changed.append(
            {
                name: any(not torch.equal(b, a) for b, a in zip(self.before[name], after[name]))
                for name in self.names
            }
        )


class LearningRateRecorder(Callback):
    """Record the learning rate of every optimizer as the batch starts, i.e. the one its step uses."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append([opt.param_groups[0]["lr"] for opt in trainer.optimizers])


@pytest.mark.parametrize("training_form", ["gradient_reversal", "alternating"])
def test_dann_updates_discriminator_and_features(training_form):
    torch.manual_seed(0)
    model = DANN(feature_extractor=TinyFeatures(), num_classes=2, training_form=training_form)
    recorder = ParameterChangeRecorder(["feature_extractor", "classifier", "domain_discriminator"])
    num_batches = 5
    steps_per_batch = 1 if training_form == "gradient_reversal" else 2

    cpu_trainer(max_steps=num_batches * steps_per_batch, callbacks=[recorder]).fit(model, two_stream_loader())

    assert len(recorder.changed) == num_batches
    for batch_idx, changed in enumerate(recorder.changed):
        assert changed["feature_extractor"], f"feature extractor unchanged at batch {batch_idx}"
        assert changed["classifier"], f"classifier unchanged at batch {batch_idx}"
        assert changed["domain_discriminator"], f"discriminator unchanged at batch {batch_idx}"


@pytest.mark.parametrize("training_form", ["gradient_reversal", "alternating"])
def test_scheduled_coefficient_and_lr_reach_step(training_form, monkeypatch):
    torch.manual_seed(0)
    num_batches = 12
    steps_per_batch = 1 if training_form == "gradient_reversal" else 2
    lr, alpha, beta, gamma, trade_off = 0.05, 10.0, 0.75, 10.0, 0.7
    model = DANN(
        feature_extractor=TinyFeatures(),
        num_classes=2,
        training_form=training_form,
        lr=lr,
        lr_alpha=alpha,
        lr_beta=beta,
        grl_gamma=gamma,
        trade_off=trade_off,
    )
    used_coeffs = []
    if training_form == "gradient_reversal":
        original = dann_module.gradient_reversal

        def recording_reversal(inputs, coeff):
            used_coeffs.append(coeff)
            return original(inputs, coeff)

        monkeypatch.setattr(dann_module, "gradient_reversal", recording_reversal)
    else:
        original_step = model._alternating_step

        def recording_step(source_inputs, source_labels, target_inputs, coeff):
            used_coeffs.append(coeff)
            return original_step(source_inputs, source_labels, target_inputs, coeff)

        monkeypatch.setattr(model, "_alternating_step", recording_step)
    lr_recorder = LearningRateRecorder()

    trainer = cpu_trainer(max_steps=num_batches * steps_per_batch, callbacks=[lr_recorder])
    trainer.fit(model, two_stream_loader())

    # the gradient reversal form reverses source and target features separately: two calls a batch
    coeffs_per_batch = used_coeffs[::2] if training_form == "gradient_reversal" else used_coeffs
    assert len(coeffs_per_batch) == num_batches
    for batch_idx, coeff in enumerate(coeffs_per_batch):
        assert coeff == pytest.approx(trade_off * grl_coefficient(batch_idx / num_batches, gamma))
    assert len(lr_recorder.lrs) == num_batches
    for batch_idx, lrs in enumerate(lr_recorder.lrs):
        for optimizer_lr in lrs:
            assert optimizer_lr == pytest.approx(lr * annealed_lr_factor(batch_idx / num_batches, alpha, beta))
    final_lr = trainer.optimizers[-1].param_groups[0]["lr"]
    assert final_lr == pytest.approx(lr / (1 + alpha) ** beta)


def test_lr_after_known_steps_matches_formula():
    torch.manual_seed(0)
    model = SourceOnly(feature_extractor=TinyFeatures(), num_classes=2, lr=0.1, lr_alpha=10.0, lr_beta=0.75)
    trainer = cpu_trainer(max_epochs=2)  # 64 samples / batch 16 = 4 batches an epoch, 8 in total

    trainer.fit(model, two_stream_loader())

    assert trainer.global_step == 8
    # After all 8 batches the annealing has reached p = 8 / 8.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 / 11**0.75)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 8


def test_source_only_ignores_target_and_learns():
    torch.manual_seed(0)
    model = SourceOnly(feature_extractor=TinyFeatures(), num_classes=2, lr=0.1)
    loader = two_stream_loader(num_source=256, batch_size=32)
    inputs, labels = loader.iterables["source"].dataset.tensors
    before = (model(inputs).argmax(1) == labels).float().mean()

    cpu_trainer(max_epochs=10).fit(model, loader)

    after = (model(inputs).argmax(1) == labels).float().mean()
    assert after > 0.9
    assert after > before


def test_invalid_training_form_rejected():
    with pytest.raises(ValueError, match="training_form"):
        DANN(feature_extractor=TinyFeatures(), num_classes=2, training_form="minimax")


def test_classifier_output_size_checked():
    model = DANN(feature_extractor=TinyFeatures(), classifier=torch.nn.Linear(6, 3), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        model.classify(torch.randn(4, 8))
    assert math.isfinite(model(torch.randn(4, 8)).sum().item())

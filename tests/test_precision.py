"""Mixed precision: every algorithm under bf16 autocast, and the float16 GradScaler path, on CPU."""

import math
from collections import Counter

import pytest
import torch
from lightning import Callback, seed_everything
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_uda.base import DomainAdaptationModule
from lightning_uda.losses import domain_adversarial_loss
from tests.algorithms import algorithm_cases, optimizers_per_batch, small_features, trainable_parts
from tests.helpers import GaussianBlobsDataModule, cpu_trainer
from tests.helpers import single_thread  # noqa: F401 (autouse fixture)

ALGORITHMS = algorithm_cases()
NUM_CLASSES = 3
NUM_BATCHES = 4
DATA_OPTIONS = dict(num_classes=NUM_CLASSES, samples_per_domain=16, batch_size=4)


def cpu_supports_float16_autocast() -> bool:
    with torch.autocast("cpu", dtype=torch.float16):
        return torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16


class LoggedValuesRecorder(Callback):
    """Record the train/* values logged at every training batch."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.values.append({name: value.item() for name, value in metrics.items() if name.startswith("train/")})


class CountingGradScaler(torch.amp.GradScaler):
    """GradScaler that counts the calls of ``unscale_`` (which runs the inf check) and ``step`` per optimizer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unscale_calls = Counter()
        self.step_calls = Counter()

    def unscale_(self, optimizer):
        self.unscale_calls[id(optimizer)] += 1
        return super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):
        self.step_calls[id(optimizer)] += 1
        return super().step(optimizer, *args, **kwargs)


def float16_plugin(scaler: torch.amp.GradScaler) -> MixedPrecision:
    """Return a float16 autocast plugin with a GradScaler; ``precision="16-mixed"`` on CPU would become bf16."""
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def fit_case(case, **trainer_options):
    seed_everything(0)
    model = case.make_model(NUM_CLASSES)
    initial = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer = cpu_trainer(max_steps=NUM_BATCHES * optimizers_per_batch(model), **trainer_options)
    trainer.fit(model, datamodule=case.make_datamodule(**DATA_OPTIONS))
    return model, trainer, initial


@pytest.mark.parametrize("case", ALGORITHMS, ids=[case.name for case in ALGORITHMS])
def test_bf16_mixed_trains_every_part(case):
    recorder = LoggedValuesRecorder()

    model, trainer, initial = fit_case(case, precision="bf16-mixed", callbacks=[recorder])

    assert trainer.precision_plugin.precision == "bf16-mixed"
    assert len(recorder.values) == NUM_BATCHES
    for batch_idx, values in enumerate(recorder.values):
        assert any(name.startswith("train/loss") for name in values), sorted(values)
        for name, value in values.items():
            assert math.isfinite(value), f"{name} = {value} at batch {batch_idx}"
    for part in trainable_parts(model):
        changed = [
            not torch.equal(initial[name], parameter)
            for name, parameter in model.named_parameters()
            if name.startswith(f"{part}.") and parameter.requires_grad
        ]
        assert any(changed), f"{part} was not updated"
        finite = [torch.isfinite(parameter).all() for parameter in getattr(model, part).parameters()]
        assert all(finite), f"{part} has non-finite weights"


NO_FLOAT16_AUTOCAST = "this torch build has no float16 autocast on CPU"


@pytest.mark.skipif(not cpu_supports_float16_autocast(), reason=NO_FLOAT16_AUTOCAST)
@pytest.mark.parametrize("case", ALGORITHMS, ids=[case.name for case in ALGORITHMS])
def test_float16_scaler_unscales_once_per_step(case):
    scaler = CountingGradScaler("cpu")

    model, trainer, _ = fit_case(case, plugins=[float16_plugin(scaler)])

    assert trainer.precision_plugin.scaler is scaler
    assert trainer.global_step == NUM_BATCHES * optimizers_per_batch(model)
    optimizers = trainer.optimizers
    assert len(optimizers) == optimizers_per_batch(model)
    for index, optimizer in enumerate(optimizers):
        assert scaler.step_calls[id(optimizer)] == NUM_BATCHES, f"optimizer {index}"
        assert scaler.unscale_calls[id(optimizer)] == NUM_BATCHES, f"optimizer {index}"
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


class UnusedHeadModule(DomainAdaptationModule):
    """Two optimizers, the second for ``extra_head``, which the loss passed to its step never reaches."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.extra_head = torch.nn.Linear(4, 4)

    def optimizer_parameter_groups(self):
        head_group = {"params": list(self.extra_head.parameters()), "lr_mult": 1.0}
        return [self.classifier_parameter_groups(), [head_group]]

    def adaptation_step(self, source_inputs, source_labels, target_inputs):
        classifier_optimizer, head_optimizer = self.optimizers()
        _, logits = self.classify(source_inputs)
        loss = self.task_loss(logits, source_labels)
        self.step_optimizer(classifier_optimizer, loss)
        _, logits = self.classify(source_inputs)
        self.step_optimizer(head_optimizer, self.task_loss(logits, source_labels))


def precision_options(precision: str) -> dict:
    """Return Trainer arguments for ``precision``; "16-mixed-scaler" is float16 autocast with a GradScaler."""
    if precision == "16-mixed-scaler":
        return {"plugins": [float16_plugin(torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed-scaler"])
def test_optimizer_without_gradient_skipped_with_warning(precision):
    if precision == "16-mixed-scaler" and not cpu_supports_float16_autocast():
        pytest.skip(NO_FLOAT16_AUTOCAST)
    seed_everything(0)
    model = UnusedHeadModule(feature_extractor=small_features(), num_classes=NUM_CLASSES)
    head_before = [parameter.detach().clone() for parameter in model.extra_head.parameters()]
    options = precision_options(precision)
    trainer = cpu_trainer(max_steps=2 * NUM_BATCHES, **options)

    expected_warning = r"Optimizer 1 of UnusedHeadModule \(parameters of extra_head\) received no gradient"
    with pytest.warns(UserWarning, match=expected_warning) as warned:
        trainer.fit(model, datamodule=GaussianBlobsDataModule(**DATA_OPTIONS))

    no_gradient_warnings = [w for w in warned if "received no gradient" in str(w.message)]
    assert len(no_gradient_warnings) == 1
    assert trainer.global_step == 2 * NUM_BATCHES
    assert trainer.fit_loop.epoch_loop.total_batch_idx + 1 == NUM_BATCHES
    for before, after in zip(head_before, model.extra_head.parameters()):
        assert torch.equal(before, after)
    if "plugins" in options:  # the scaler is back in place after the skipped steps
        assert trainer.precision_plugin.scaler is options["plugins"][0].scaler


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_domain_loss_takes_logits_under_autocast(dtype):
    confident = torch.tensor([80.0, 80.0]), torch.tensor([-80.0, -80.0])
    wrong = torch.tensor([-80.0, -80.0]), torch.tensor([80.0, 80.0])

    with torch.autocast("cpu", dtype=dtype):
        confident_loss = domain_adversarial_loss(*confident)
        wrong_loss = domain_adversarial_loss(*wrong)

    assert confident_loss.dtype == torch.float32
    assert confident_loss.item() == pytest.approx(0.0, abs=1e-6)
    # With logits the loss grows linearly without bound; BCE on sigmoid probabilities would saturate at 100.
    assert wrong_loss.item() == pytest.approx(80.0, rel=1e-3)


def discriminator_inputs(discriminator: torch.nn.Module) -> torch.Tensor:
    """Return 16 random inputs sized to the discriminator's first layer: feature vectors or 28x28 images."""
    first = next(m for m in discriminator.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    if isinstance(first, torch.nn.Linear):
        return torch.randn(16, first.in_features)
    return torch.rand(16, first.in_channels, 28, 28) * 2 - 1


ADVERSARIAL = [case for case in ALGORITHMS if hasattr(case.make_model(NUM_CLASSES), "domain_discriminator")]


@pytest.mark.parametrize("case", ADVERSARIAL, ids=[case.name for case in ADVERSARIAL])
def test_discriminator_outputs_logits(case):
    torch.manual_seed(0)
    model = case.make_model(NUM_CLASSES)
    discriminator = model.domain_discriminator.eval()
    last_layer = [m for m in discriminator.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    inputs = discriminator_inputs(discriminator)

    with torch.no_grad():
        last_layer.bias.add_(10.0)  # a final sigmoid would keep every output below 1
        outputs = discriminator(inputs)

    assert outputs.shape == (len(inputs),)
    assert (outputs > 1).all(), "outputs stay in [0, 1] like probabilities; discriminators must return logits"

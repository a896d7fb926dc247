import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_uda import LeNet
from lightning_uda.generators import ImageDiscriminator, PixelGenerator
from lightning_uda.pixelda import PixelDA, content_similarity_loss
from lightning_uda.schedules import annealed_lr_factor
from tests.helpers import cpu_trainer, single_thread  # noqa: F401 (autouse fixture)
from train import DomainAdaptationCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

IMAGE_SHAPE = (1, 28, 28)
STEPS_PER_BATCH = 3  # discriminator, generator, classifier
PARTS = {
    "discriminator": ["domain_discriminator"],
    "generator": ["generator"],
    "classifier": ["feature_extractor", "classifier"],
}
LOGGED_KEYS = [
    "train/loss_discriminator",
    "train/loss_generator",
    "train/loss_task",
    "train/loss_content",
    "train/domain_acc",
]


def image_loader(num_source: int = 32, num_target: int = 24, batch_size: int = 8, seed: int = 0):
    """Return a CombinedLoader of labeled source images and brighter unlabeled target images in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    source_inputs = torch.rand(num_source, *IMAGE_SHAPE, generator=generator) * 2 - 1
    source_labels = torch.randint(0, 10, (num_source,), generator=generator)
    target_inputs = (torch.rand(num_target, *IMAGE_SHAPE, generator=generator) + 0.5).clamp(max=1.0) * 2 - 1
    source = DataLoader(TensorDataset(source_inputs, source_labels), batch_size=batch_size, shuffle=True)
    target = DataLoader(target_inputs, batch_size=batch_size, shuffle=True)
    return CombinedLoader({"source": source, "target": target}, mode="max_size_cycle")


def small_pixelda(**kwargs) -> PixelDA:
    """Return PixelDA with a LeNet classifier and a small generator and discriminator, so a step takes milliseconds."""
    options = dict(
        feature_extractor=LeNet(),
        num_classes=10,
        generator=PixelGenerator(hidden_channels=8, num_residual_blocks=1),
        domain_discriminator=ImageDiscriminator(hidden_channels=8, num_downsamples=2),
        image_log_interval=0,
    )
    options.update(kwargs)
    return PixelDA(**options)


def snapshot(model: PixelDA) -> dict:
    return {
        part: [p.detach().clone() for name in names for p in getattr(model, name).parameters()]
        for part, names in PARTS.items()
    }


def changed_parts(before: dict, after: dict) -> dict:
    return {part: any(not torch.equal(b, a) for b, a in zip(before[part], after[part])) for part in PARTS}


def test_each_step_updates_only_its_own_part(monkeypatch):
    torch.manual_seed(0)
    model = small_pixelda(content_weight=0.5)
    original_step = model.step_optimizer
    changes = []

    def recording_step(optimizer, loss):
        before = snapshot(model)
        original_step(optimizer, loss)
        changes.append(changed_parts(before, snapshot(model)))

    monkeypatch.setattr(model, "step_optimizer", recording_step)
    num_batches = 4

    cpu_trainer(max_steps=num_batches * STEPS_PER_BATCH).fit(model, image_loader())

    assert len(changes) == num_batches * STEPS_PER_BATCH
    step_order = list(PARTS)
    for call, changed in enumerate(changes):
        stepped = step_order[call % STEPS_PER_BATCH]
        batch_idx = call // STEPS_PER_BATCH
        assert changed[stepped], f"{stepped} step at batch {batch_idx} did not change the {stepped}"
        for other in step_order:
            if other != stepped:
                assert not changed[other], f"{stepped} step at batch {batch_idx} changed the {other}"


@pytest.mark.parametrize(("generator_task_weight", "expect_change"), [(1.0, True), (0.0, False)])
def test_task_loss_alone_trains_generator(generator_task_weight, expect_change):
    torch.manual_seed(0)
    model = small_pixelda(adversarial_weight=0.0, content_weight=0.0, generator_task_weight=generator_task_weight)
    before = [p.detach().clone() for p in model.generator.parameters()]

    cpu_trainer(max_steps=2 * STEPS_PER_BATCH).fit(model, image_loader())

    changed = any(not torch.equal(b, a) for b, a in zip(before, model.generator.parameters()))
    assert changed == expect_change


def test_optimizers_are_adam_adam_sgd_and_annealed():
    torch.manual_seed(0)
    lr, adversarial_lr, alpha, beta = 0.02, 2e-3, 10.0, 0.75
    model = small_pixelda(lr=lr, adversarial_lr=adversarial_lr, lr_alpha=alpha, lr_beta=beta, adam_betas=(0.4, 0.9))
    trainer = cpu_trainer(max_steps=4 * STEPS_PER_BATCH)

    trainer.fit(model, image_loader())

    discriminator_optimizer, generator_optimizer, classifier_optimizer = trainer.optimizers
    assert isinstance(discriminator_optimizer, torch.optim.Adam)
    assert isinstance(generator_optimizer, torch.optim.Adam)
    assert isinstance(classifier_optimizer, torch.optim.SGD)
    assert discriminator_optimizer.param_groups[0]["betas"] == (0.4, 0.9)
    final_factor = annealed_lr_factor(1.0, alpha, beta)
    assert discriminator_optimizer.param_groups[0]["lr"] == pytest.approx(adversarial_lr * final_factor)
    assert generator_optimizer.param_groups[0]["lr"] == pytest.approx(adversarial_lr * final_factor)
    assert classifier_optimizer.param_groups[0]["lr"] == pytest.approx(lr * final_factor)


def test_generator_outputs_vary_with_input_and_noise():
    torch.manual_seed(0)
    generator = PixelGenerator(hidden_channels=8, num_residual_blocks=1).eval()
    images = torch.rand(16, *IMAGE_SHAPE) * 2 - 1

    with torch.no_grad():
        outputs = generator(images)
        same_image_outputs = generator(images[:1].expand(16, -1, -1, -1))

    assert outputs.shape == images.shape
    assert outputs.min() >= -1.0
    assert outputs.max() <= 1.0
    assert outputs.std(dim=0).mean() > 1e-3
    assert same_image_outputs.std(dim=0).mean() > 1e-3, "noise has no effect on the generated images"


def test_trained_generator_outputs_not_collapsed():
    torch.manual_seed(0)
    model = small_pixelda()
    cpu_trainer(max_steps=6 * STEPS_PER_BATCH).fit(model, image_loader())
    images = torch.rand(16, *IMAGE_SHAPE) * 2 - 1

    with torch.no_grad():
        outputs = model.generator.eval()(images)

    assert outputs.std(dim=0).mean() > 1e-3


def test_bf16_mixed_steps_finite_and_update_all_parts():
    torch.manual_seed(0)
    model = small_pixelda(content_weight=0.5)
    before = snapshot(model)
    trainer = cpu_trainer(max_steps=3 * STEPS_PER_BATCH, precision="bf16-mixed")

    trainer.fit(model, image_loader())

    changed = changed_parts(before, snapshot(model))
    for part in PARTS:
        assert changed[part], f"{part} unchanged after bf16-mixed training"
    for key in LOGGED_KEYS:
        assert key in trainer.callback_metrics, f"{key} not logged"
        assert math.isfinite(trainer.callback_metrics[key].item()), f"{key} is not finite"
    assert 0.0 <= trainer.callback_metrics["train/domain_acc"].item() <= 1.0
    for module in (model.generator, model.domain_discriminator, model.feature_extractor, model.classifier):
        for parameter in module.parameters():
            assert parameter.dtype == torch.float32
            assert torch.isfinite(parameter).all()


def test_image_grid_written_to_tensorboard(tmp_path):
    torch.manual_seed(0)
    num_logged_images = 4
    model = small_pixelda(image_log_interval=2, num_logged_images=num_logged_images)
    logger = TensorBoardLogger(save_dir=tmp_path, name="pixelda", version=0)
    num_batches = 4

    cpu_trainer(max_steps=num_batches * STEPS_PER_BATCH, logger=logger).fit(model, image_loader())
    logger.experiment.flush()

    events = EventAccumulator(str(tmp_path / "pixelda" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert "train/source_and_generated" in events.Tags()["images"]
    images = events.Images("train/source_and_generated")
    assert [image.step for image in images] == [0, 2]
    padding = 2  # make_grid's default
    assert images[0].height == 2 * 28 + 3 * padding
    assert images[0].width == num_logged_images * 28 + (num_logged_images + 1) * padding


def test_content_loss_alone_pulls_generated_to_source():
    torch.manual_seed(0)
    model = small_pixelda(
        adversarial_weight=0.0,
        generator_task_weight=0.0,
        content_weight=1.0,
        content_loss="mse",
        adversarial_lr=0.01,
        lr_alpha=0.0,
    )
    loader = image_loader(num_source=64, num_target=64, batch_size=16)
    source_inputs = loader.iterables["source"].dataset.tensors[0]

    def content_error():
        model.generator.eval()
        with torch.no_grad():
            error = content_similarity_loss(model.generator(source_inputs), source_inputs, "mse").item()
        model.generator.train()
        return error

    before = content_error()
    cpu_trainer(max_steps=24 * STEPS_PER_BATCH).fit(model, loader)
    after = content_error()

    assert after < 0.5 * before


def test_pairwise_mse_ignores_brightness_offset():
    source = torch.rand(4, *IMAGE_SHAPE) * 2 - 1
    brighter = source + 0.3
    reshaped = source.flip(-1)

    assert content_similarity_loss(brighter, source, "pmse").item() == pytest.approx(0.0, abs=1e-6)
    assert content_similarity_loss(brighter, source, "mse").item() == pytest.approx(0.09, rel=1e-4)
    assert content_similarity_loss(brighter, source, "l1").item() == pytest.approx(0.3, rel=1e-4)
    assert content_similarity_loss(reshaped, source, "pmse").item() > 0.1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"content_weight": -1.0}, "content_weight"),
        ({"adversarial_weight": -0.5}, "adversarial_weight"),
        ({"content_loss": "ssim"}, "content_loss"),
        ({"adversarial_lr": 0.0}, "adversarial_lr"),
        ({"image_log_interval": -1}, "image_log_interval"),
    ],
)
def test_invalid_arguments_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        small_pixelda(**arguments)


def test_networks_reject_wrong_image_shape():
    generator = PixelGenerator(hidden_channels=8, num_residual_blocks=1)
    discriminator = ImageDiscriminator(hidden_channels=8)

    with pytest.raises(ValueError, match="image_size"):
        generator(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="in_channels"):
        discriminator(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="noise"):
        generator(torch.zeros(2, 1, 28, 28), noise=torch.zeros(2, 3))
    assert discriminator(torch.zeros(2, 1, 28, 28)).shape == (2,)


@pytest.mark.parametrize("config", ["pixelda_bundled_digits", "pixelda_mnist_usps"])
def test_config_builds_pixelda(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = DomainAdaptationCLI(args=["--config", str(CONFIGS / f"{config}.yaml")], run=False)

    assert isinstance(cli.model, PixelDA)
    assert isinstance(cli.model.generator, PixelGenerator)
    assert isinstance(cli.model.domain_discriminator, ImageDiscriminator)
    assert cli.trainer.max_steps % STEPS_PER_BATCH == 0, "max_steps must be a whole number of batches"
    images = torch.rand(4, *IMAGE_SHAPE) * 2 - 1
    assert cli.model.generator(images).shape == images.shape
    assert cli.model.domain_discriminator(images).shape == (4,)

"""Pixel-level domain adaptation with a generative adversarial network (PixelDA)."""

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchvision.utils import make_grid

from lightning_uda.base import DomainAdaptationModule
from lightning_uda.generators import ImageDiscriminator, PixelGenerator
from lightning_uda.losses import domain_accuracy, domain_adversarial_loss

CONTENT_LOSSES = ("pmse", "mse", "l1")


def content_similarity_loss(generated: Tensor, source: Tensor, kind: str = "pmse") -> Tensor:
    """Compute the content-similarity loss between generated images and their source images, in float32.

    ``"pmse"`` is the pairwise mean squared error used by PixelDA. For the difference
    ``d = x_s - G(x_s, z)`` over the ``k`` pixels of one image it is
    ``||d||^2 / k - (sum(d))^2 / k^2``, the variance of ``d`` over the pixels. It penalizes
    changes in the differences between pixels (the shape) but not a change shared by all pixels
    (a brightness offset). ``"mse"`` and ``"l1"`` are the plain per-pixel errors. All three are
    averaged over the batch.

    Args:
        generated: generated images, shape (B, C, H, W).
        source: the source images they were generated from, same shape.
        kind: ``"pmse"``, ``"mse"`` or ``"l1"``.
    """
    if kind not in CONTENT_LOSSES:
        raise ValueError(f"content loss must be one of {CONTENT_LOSSES}, got {kind!r}")
    difference = (source.float() - generated.float()).flatten(1)  # (B, k)
    if kind == "pmse":
        return difference.var(dim=1, unbiased=False).mean()
    if kind == "mse":
        return difference.pow(2).mean()
    return difference.abs().mean()


class PixelDA(DomainAdaptationModule):
    """Pixel-level adaptation (Bousmalis et al., "Unsupervised Pixel-Level Domain Adaptation with
    Generative Adversarial Networks", CVPR 2017).

    A generator ``G`` turns a source image and noise into a target-like image. A domain
    discriminator ``D`` learns to distinguish real target images from generated ones, and the
    task classifier ``T = C(F(.))`` learns the source labels on generated (and source) images:

        ``min_{G,T} max_D  a * L_adv(D, G) + b * CE(T(G(x_s, z)), y_s) + g * L_content(G(x_s, z), x_s)``

    with ``L_adv = log D(x_t) + log(1 - D(G(x_s, z)))`` in its binary cross-entropy form on logits.
    Each training batch makes three updates, each with its own optimizer:

    1. ``D`` on real target images (label 1) against generated images (label 0), detached from ``G``.
    2. ``G`` on ``a * BCE(D(G(x_s, z)), 1) + b * CE(T(G(x_s, z)), y_s) + g * L_content``: it is
       trained to fool the updated ``D`` and to keep the classifier correct on its images,
       while ``D`` and ``T`` stay fixed.
    3. ``T`` on ``CE(T(G(x_s, z)), y_s) + source_task_weight * CE(T(x_s), y_s)``, with the images
       generated at the start of the batch, detached.

    ``G`` and ``D`` use Adam (``adversarial_lr``, ``adam_betas``, no weight decay), as GANs usually
    do. The classifier uses the base SGD settings (``lr``, ``momentum``, ``weight_decay``), so its
    schedule equals that of :class:`~lightning_uda.source_only.SourceOnly`. All three learning
    rates are annealed by the base schedule ``1 / (1 + lr_alpha * p) ** lr_beta``. Since each batch
    makes three optimizer steps, ``Trainer(max_steps=3 * n)`` trains for ``n`` batches.

    Shapes: source and target images (B, C, H, W) with values in [-1, 1], the range of the
    generator's ``tanh``; source labels (B,). The generated images have the source images' shape.

    Every ``image_log_interval`` training batches, a grid of source images (top row) and their
    generated versions (bottom row) goes to TensorBoard when the logger is a ``TensorBoardLogger``.

    Logged: ``train/loss_discriminator``, ``train/loss_generator`` (its adversarial term),
    ``train/loss_task`` (classifier step), ``train/loss_content``, ``train/domain_acc``
    (accuracy of ``D`` on real target against generated images), ``train/lr``.

    Args:
        feature_extractor: network ``F`` of the task classifier; must expose ``out_features``
            unless ``classifier`` is given.
        classifier: head ``C``; a linear layer by default.
        generator: network mapping (B, C, H, W) images, and noise it draws itself, to (B, C, H, W)
            images in [-1, 1]; a :class:`~lightning_uda.generators.PixelGenerator` for 1x28x28
            images by default.
        domain_discriminator: network mapping (B, C, H, W) images to (B,) logits, positive
            meaning real target; an :class:`~lightning_uda.generators.ImageDiscriminator` for
            1x28x28 images by default.
        adversarial_weight: weight ``a`` of the generator's adversarial term.
        generator_task_weight: weight ``b`` of the task loss on generated images in the generator step.
        content_weight: weight ``g`` of the content-similarity loss; 0 turns it off.
        content_loss: ``"pmse"`` (pairwise mean squared error), ``"mse"`` or ``"l1"``; see
            :func:`content_similarity_loss`.
        source_task_weight: weight of the task loss on the original source images in the
            classifier step; 0 trains the classifier on generated images alone.
        adversarial_lr: initial Adam learning rate of the generator and the discriminator.
        adam_betas: Adam ``(beta1, beta2)`` of the generator and the discriminator.
        image_log_interval: log a grid of source and generated images every this many
            training batches; 0 turns it off.
        num_logged_images: number of source images (and generated versions) in that grid.
        **kwargs: the other arguments of :class:`~lightning_uda.base.DomainAdaptationModule`.

    Note:
        The paper masks the pairwise mean squared error to the pixels of the rendered object.
        Digit images come without such a mask, so :func:`content_similarity_loss` covers all pixels.

    Example::

        model = PixelDA(feature_extractor=LeNet(), num_classes=10)
        Trainer(max_steps=3 * 3000).fit(model, datamodule=BundledDigitsDataModule())
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        classifier: nn.Module | None = None,
        generator: nn.Module | None = None,
        domain_discriminator: nn.Module | None = None,
        adversarial_weight: float = 1.0,
        generator_task_weight: float = 1.0,
        content_weight: float = 0.0,
        content_loss: Literal["pmse", "mse", "l1"] = "pmse",
        source_task_weight: float = 1.0,
        adversarial_lr: float = 1e-3,
        adam_betas: tuple[float, float] = (0.5, 0.999),
        image_log_interval: int = 500,
        num_logged_images: int = 8,
        **kwargs,
    ) -> None:
        super().__init__(feature_extractor=feature_extractor, classifier=classifier, **kwargs)
        weights = {
            "adversarial_weight": adversarial_weight,
            "generator_task_weight": generator_task_weight,
            "content_weight": content_weight,
            "source_task_weight": source_task_weight,
        }
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if content_loss not in CONTENT_LOSSES:
            raise ValueError(f"content_loss must be one of {CONTENT_LOSSES}, got {content_loss!r}")
        if adversarial_lr <= 0:
            raise ValueError(f"adversarial_lr must be positive, got {adversarial_lr}")
        if image_log_interval < 0 or num_logged_images < 1:
            raise ValueError(
                f"image_log_interval must be >= 0 and num_logged_images >= 1, got {image_log_interval} "
                f"and {num_logged_images}"
            )

        self.generator = PixelGenerator() if generator is None else generator
        self.domain_discriminator = ImageDiscriminator() if domain_discriminator is None else domain_discriminator

    # ----------------------------------------------------------------- optimizers
    def optimizer_parameter_groups(self) -> list[list[dict]]:
        """Return the groups of the three optimizers, in step order: discriminator, generator, classifier."""
        return [
            [{"params": list(self.domain_discriminator.parameters()), "lr_mult": 1.0}],
            [{"params": list(self.generator.parameters()), "lr_mult": 1.0}],
            self.classifier_parameter_groups(),
        ]

    def configure_optimizers(self):
        """Build Adam for the discriminator and generator and the base SGD for the classifier, all annealed."""
        # The base builds SGD and its annealing for all three groups, and the first two are replaced here.
        optimizers, schedulers = super().configure_optimizers()
        adversarial_groups = self.optimizer_parameter_groups()[:2]
        for index, groups in enumerate(adversarial_groups):
            param_groups = [
                {"params": group["params"], "lr": self.hparams.adversarial_lr * group["lr_mult"]} for group in groups
            ]
            optimizers[index] = torch.optim.Adam(
                param_groups, lr=self.hparams.adversarial_lr, betas=tuple(self.hparams.adam_betas)
            )
            scheduler = LambdaLR(optimizers[index], self._lr_factor_for_next_batch)
            schedulers[index] = {"scheduler": scheduler, "interval": "step"}
        return optimizers, schedulers

    # ----------------------------------------------------------------- training
    def adaptation_step(self, source_inputs: Tensor, source_labels: Tensor, target_inputs: Tensor) -> None:
        discriminator_optimizer, generator_optimizer, classifier_optimizer = self.optimizers()
        generated = self.generator(source_inputs)  # (B_s, C, H, W)

        self.toggle_optimizer(discriminator_optimizer)
        target_logits = self.domain_discriminator(target_inputs)
        generated_logits = self.domain_discriminator(generated.detach())
        # Real target images take label 1 and generated images label 0.
        discriminator_loss = domain_adversarial_loss(target_logits, generated_logits)
        self.step_optimizer(discriminator_optimizer, discriminator_loss)
        self.untoggle_optimizer(discriminator_optimizer)

        self.toggle_optimizer(generator_optimizer)
        generator_losses = self._generator_losses(generated, source_inputs, source_labels)
        self.step_optimizer(generator_optimizer, generator_losses["total"])
        self.untoggle_optimizer(generator_optimizer)

        self.toggle_optimizer(classifier_optimizer)
        task_loss = self._classifier_loss(generated.detach(), source_inputs, source_labels)
        self.step_optimizer(classifier_optimizer, task_loss)
        self.untoggle_optimizer(classifier_optimizer)

        self.log("train/loss_discriminator", discriminator_loss.detach(), prog_bar=True)
        self.log("train/loss_generator", generator_losses["adversarial"], prog_bar=True)
        self.log("train/loss_task", task_loss.detach(), prog_bar=True)
        self.log("train/loss_content", generator_losses["content"])
        self.log("train/domain_acc", domain_accuracy(target_logits.detach(), generated_logits.detach()))
        self._maybe_log_images(source_inputs, generated.detach())

    def _generator_losses(self, generated: Tensor, source_inputs: Tensor, source_labels: Tensor) -> dict:
        hparams = self.hparams
        logits = self.domain_discriminator(generated).float()
        # Non-saturating form: G maximizes log D(G(x_s, z)) instead of minimizing log(1 - D(G(x_s, z))).
        adversarial_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        _, class_logits = self.classify(generated)
        task_loss = self.task_loss(class_logits, source_labels)
        content_loss = content_similarity_loss(generated, source_inputs, hparams.content_loss)

        total = hparams.adversarial_weight * adversarial_loss + hparams.generator_task_weight * task_loss
        if hparams.content_weight > 0:
            total = total + hparams.content_weight * content_loss
        return {"total": total, "adversarial": adversarial_loss.detach(), "content": content_loss.detach()}

    def _classifier_loss(self, generated: Tensor, source_inputs: Tensor, source_labels: Tensor) -> Tensor:
        if self.hparams.source_task_weight == 0:
            _, logits = self.classify(generated)
            return self.task_loss(logits, source_labels)

        # One forward pass over the concatenation instead of two.
        _, logits = self.classify(torch.cat([generated, source_inputs]))
        generated_loss = self.task_loss(logits[: len(generated)], source_labels)
        source_loss = self.task_loss(logits[len(generated) :], source_labels)
        return generated_loss + self.hparams.source_task_weight * source_loss

    # ----------------------------------------------------------------- image logging
    def _maybe_log_images(self, source_inputs: Tensor, generated: Tensor) -> None:
        interval = self.hparams.image_log_interval
        if interval == 0 or not isinstance(self.logger, TensorBoardLogger):
            return
        batch_idx = self.trainer.fit_loop.epoch_loop.total_batch_idx
        if batch_idx % interval != 0:
            return
        # Stepped by batch like the logged scalars, not by global_step, which counts three optimizer steps a batch.
        self.logger.experiment.add_image(
            "train/source_and_generated", self.image_grid(source_inputs, generated), global_step=batch_idx
        )

    def image_grid(self, source_inputs: Tensor, generated: Tensor) -> Tensor:
        """Return a (3, H', W') grid in [0, 1]: source images in the top row, their generated versions below."""
        count = min(self.hparams.num_logged_images, len(source_inputs))
        images = torch.cat([source_inputs[:count], generated[:count]]).detach().float().cpu()
        return make_grid(images, nrow=count, normalize=True, value_range=(-1, 1), pad_value=1.0)

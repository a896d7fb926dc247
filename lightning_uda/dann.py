"""Domain-adversarial neural network (DANN)."""

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_uda.backbones import DomainDiscriminator, feature_dimension
from lightning_uda.base import DomainAdaptationModule
from lightning_uda.grl import gradient_reversal
from lightning_uda.losses import domain_accuracy, domain_adversarial_loss
from lightning_uda.schedules import grl_coefficient


class DANN(DomainAdaptationModule):
    """Domain-adversarial training (Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016).

    A domain discriminator ``D`` learns to tell source features from target features
    while the feature extractor ``F`` learns to make them indistinguishable:

        ``min_{F,C} max_D  CE(C(F(x_s)), y_s) - lambda_p * L_d(D(F(x_s)), D(F(x_t)))``

    with ``L_d`` the binary cross-entropy of the discriminator's logits and
    ``lambda_p = trade_off * (2 / (1 + exp(-grl_gamma * p)) - 1)`` ramping up with the
    training progress ``p``. Two training forms:

    - ``"gradient_reversal"``: one backward pass of ``CE + L_d`` through a gradient
      reversal layer with coefficient ``lambda_p`` between ``F`` and ``D``; one optimizer.
    - ``"alternating"``: a discriminator step on detached features, then a feature
      extractor + classifier step on ``CE + lambda_p * L_conf``, where ``L_conf`` is the
      discriminator loss with the domain labels flipped; two optimizers.

    Logged: ``train/loss_task``, ``train/loss_domain``, ``train/domain_acc``,
    ``train/grl_coeff`` (``lambda_p``), ``train/lr``.

    Args:
        feature_extractor: network ``F``; must expose ``out_features`` unless both heads are given.
        classifier: label classifier ``C``; a linear layer by default.
        domain_discriminator: network ``D`` returning one logit per sample; a two-hidden-layer
            :class:`~lightning_uda.backbones.DomainDiscriminator` by default.
        training_form: ``"gradient_reversal"`` or ``"alternating"``.
        trade_off: final weight of the adversarial term (``lambda_p`` reaches it at ``p = 1``).
        grl_gamma: steepness ``gamma`` of the ``lambda_p`` ramp.
        **kwargs: the other arguments of :class:`~lightning_uda.base.DomainAdaptationModule`.

    Example::

        model = DANN(feature_extractor=LeNet(), num_classes=10, training_form="alternating")
        Trainer(max_steps=2000).fit(model, datamodule=BundledDigitsDataModule())
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        classifier: nn.Module | None = None,
        domain_discriminator: nn.Module | None = None,
        training_form: Literal["gradient_reversal", "alternating"] = "gradient_reversal",
        trade_off: float = 1.0,
        grl_gamma: float = 10.0,
        **kwargs,
    ) -> None:
        super().__init__(feature_extractor=feature_extractor, classifier=classifier, **kwargs)
        if training_form not in ("gradient_reversal", "alternating"):
            raise ValueError(f"training_form must be 'gradient_reversal' or 'alternating', got {training_form!r}")
        if trade_off < 0:
            raise ValueError(f"trade_off must be >= 0, got {trade_off}")
        if domain_discriminator is None:
            domain_discriminator = DomainDiscriminator(feature_dimension(feature_extractor))
        self.domain_discriminator = domain_discriminator
        self.training_form = training_form
        self.trade_off = trade_off
        self.grl_gamma = grl_gamma

    @property
    def grl_coeff(self) -> float:
        """``lambda_p`` of the current batch."""
        return self.trade_off * grl_coefficient(self.training_progress, self.grl_gamma)

    def optimizer_parameter_groups(self) -> list[list[dict]]:
        discriminator_group = {"params": list(self.domain_discriminator.parameters()), "lr_mult": 1.0}
        if self.training_form == "gradient_reversal":
            return [self.classifier_parameter_groups() + [discriminator_group]]
        return [[discriminator_group], self.classifier_parameter_groups()]

    def adaptation_step(self, source_inputs: Tensor, source_labels: Tensor, target_inputs: Tensor) -> None:
        coeff = self.grl_coeff
        if self.training_form == "gradient_reversal":
            losses = self._gradient_reversal_step(source_inputs, source_labels, target_inputs, coeff)
        else:
            losses = self._alternating_step(source_inputs, source_labels, target_inputs, coeff)
        self.log("train/loss_task", losses["task"], prog_bar=True)
        self.log("train/loss_domain", losses["domain"], prog_bar=True)
        self.log("train/domain_acc", losses["domain_acc"])
        self.log("train/grl_coeff", coeff)

    def _features(self, source_inputs: Tensor, target_inputs: Tensor) -> tuple[Tensor, Tensor]:
        # One forward pass over both domains, so batch-norm statistics see the mixture.
        features = self.feature_extractor(torch.cat([source_inputs, target_inputs]))
        return features[: len(source_inputs)], features[len(source_inputs) :]

    def _domain_logits(self, source_features: Tensor, target_features: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.domain_discriminator(torch.cat([source_features, target_features]))
        return logits[: len(source_features)], logits[len(source_features) :]

    def _gradient_reversal_step(self, source_inputs, source_labels, target_inputs, coeff: float) -> dict:
        source_features, target_features = self._features(source_inputs, target_inputs)
        task_loss = self.task_loss(self.classifier(source_features), source_labels)

        source_logits, target_logits = self._domain_logits(
            gradient_reversal(source_features, coeff), gradient_reversal(target_features, coeff)
        )
        domain_loss = domain_adversarial_loss(source_logits, target_logits)

        self.step_optimizer(self.optimizers(), task_loss + domain_loss)
        return {
            "task": task_loss.detach(),
            "domain": domain_loss.detach(),
            "domain_acc": domain_accuracy(source_logits.detach(), target_logits.detach()),
        }

    def _alternating_step(self, source_inputs, source_labels, target_inputs, coeff: float) -> dict:
        discriminator_optimizer, classifier_optimizer = self.optimizers()
        source_features, target_features = self._features(source_inputs, target_inputs)

        # discriminator step, on features detached from the feature extractor
        self.toggle_optimizer(discriminator_optimizer)
        source_logits, target_logits = self._domain_logits(source_features.detach(), target_features.detach())
        domain_loss = domain_adversarial_loss(source_logits, target_logits)
        self.step_optimizer(discriminator_optimizer, domain_loss)
        self.untoggle_optimizer(discriminator_optimizer)

        # feature extractor + classifier step against the updated discriminator, domain labels flipped
        self.toggle_optimizer(classifier_optimizer)
        task_loss = self.task_loss(self.classifier(source_features), source_labels)
        confused_source_logits, confused_target_logits = self._domain_logits(source_features, target_features)
        confusion_loss = domain_adversarial_loss(confused_target_logits, confused_source_logits)
        self.step_optimizer(classifier_optimizer, task_loss + coeff * confusion_loss)
        self.untoggle_optimizer(classifier_optimizer)
        return {
            "task": task_loss.detach(),
            "domain": domain_loss.detach(),
            "domain_acc": domain_accuracy(source_logits.detach(), target_logits.detach()),
        }

"""Importance weighting of the source loss by a domain discriminator's density-ratio estimate."""

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_uda.backbones import DomainDiscriminator, feature_dimension
from lightning_uda.base import DomainAdaptationModule
from lightning_uda.losses import domain_accuracy, domain_adversarial_loss

DISCRIMINATOR_INPUTS = ("input", "features", "frozen_features")
NORMALIZATIONS = ("batch", "running", "none")

# Log density ratios are clamped to this magnitude. A logit of 50 already means the sigmoid
# is 1 - 2e-22, and exp(50) ~ 5e21 keeps sums of weights and squared weights (computed in
# log space) and weighted losses far from the float32 limit of ~3.4e38.
MAX_LOG_RATIO = 50.0


def log_density_ratio(source_logits: Tensor, source_size: float = 1.0, target_size: float = 1.0) -> Tensor:
    """Return ``log p_target(x) / p_source(x)`` from a domain discriminator's logits (source label 1).

    A discriminator trained by logistic loss on ``source_size`` source and ``target_size``
    target samples converges to the logit ``log(source_size * p_s(x)) - log(target_size * p_t(x))``,
    so ``log p_t(x) / p_s(x) = -logit + log(source_size / target_size)``. The sizes are the
    weights the two domains carry in the discriminator's loss, not the sizes of the data sets.

    Computed in float32. NaN logits count as 0 (no evidence either way), and infinite or
    huge logits are clamped to ``+-MAX_LOG_RATIO``, so the result is always finite.

    Args:
        source_logits: discriminator logits, positive meaning source, any shape.
        source_size: number (or total loss weight) of source samples the discriminator was fit on.
        target_size: number (or total loss weight) of target samples the discriminator was fit on.
    """
    if source_size <= 0 or target_size <= 0:
        raise ValueError(f"source_size and target_size must be positive, got {source_size} and {target_size}")
    logits = torch.nan_to_num(source_logits.float(), nan=0.0, posinf=MAX_LOG_RATIO, neginf=-MAX_LOG_RATIO)
    log_ratio = -logits + math.log(source_size / target_size)
    return log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """Return Kish's effective sample size ``(sum w)^2 / (n * sum w^2)`` as a fraction of ``n``, from ``log w``.

    1 when all weights are equal, ``1 / n`` when a single sample carries all the weight.
    Computed in log space, so huge weights do not overflow.
    """
    log_weights = log_weights.float().reshape(-1)
    log_n = math.log(log_weights.numel())
    log_ess = 2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0) - log_n
    return log_ess.exp()


class ImportanceWeightNormalizer(nn.Module):
    """Flattening, mean-1 normalisation and clipping that turn log density ratios into importance weights.

    All steps work on ``log r``: ``log w = lambda * log r - log m``, then ``w = exp(min(log w, log max_weight))``.
    The normaliser ``m`` depends on ``normalization``:

    - ``"batch"``: the mean of ``r^lambda`` over the batch, so the weights of each batch have
      mean 1 before clipping. A sample's weight then depends on the other samples in its batch.
    - ``"running"``: an exponential moving average of the batch means, stored in the buffer
      ``running_log_mean`` (so it is saved in checkpoints). A batch is normalised by the
      estimate from before it is added, so with a fixed discriminator and a fixed estimate
      each sample gets the same weight whatever batch it comes in. The first batch, with no
      estimate yet, is normalised by its own mean.
      NOTE: under DDP each process normalises by its own batches, so the estimates of the
      processes can differ.
    - ``"none"``: ``m = 1``: the raw density ratio, unbiased only if the discriminator is calibrated.

    Args:
        normalization: ``"batch"``, ``"running"`` or ``"none"``.
        momentum: weight of the newest batch in the running estimate (``"running"`` only).
        max_weight: weights above this value are set to it; ``None`` disables clipping.
            With clipping, the mean weight of a batch can fall below 1.
        weight_exponent: ``lambda`` in [0, 1]; below 1 flattens the weights towards 1
            (Shimodaira, 2000), trading bias for variance. 0 gives unit weights.
    """

    def __init__(
        self,
        normalization: Literal["batch", "running", "none"] = "running",
        momentum: float = 0.05,
        max_weight: float | None = 10.0,
        weight_exponent: float = 1.0,
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if max_weight is not None and max_weight < 1:
            raise ValueError(f"max_weight must be at least 1 (the mean weight) or None, got {max_weight}")
        if not 0 <= weight_exponent <= 1:
            raise ValueError(f"weight_exponent must be in [0, 1], got {weight_exponent}")
        self.normalization = normalization
        self.momentum = momentum
        self.max_weight = max_weight
        self.weight_exponent = weight_exponent
        self.register_buffer("running_log_mean", torch.zeros(()))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, log_ratio: Tensor, update: bool | None = None) -> Tensor:
        """Return the log importance weights, shape (B,), of a batch of log density ratios.

        Args:
            log_ratio: ``log p_t(x) / p_s(x)`` of each source sample, shape (B,).
            update: add this batch to the running estimate; defaults to ``self.training``.
        """
        if log_ratio.ndim != 1 or log_ratio.numel() == 0:
            raise ValueError(f"log_ratio must have shape (B,) with B >= 1, got {tuple(log_ratio.shape)}")
        update = self.training if update is None else update
        log_ratio = self.weight_exponent * log_ratio.float()
        batch_log_mean = torch.logsumexp(log_ratio, 0) - math.log(log_ratio.numel())

        if self.normalization == "batch":
            log_weights = log_ratio - batch_log_mean
        elif self.normalization == "running":
            # torch.where rather than an if on the count, so no device-to-host sync is needed.
            tracked = self.num_batches_tracked > 0
            log_weights = log_ratio - torch.where(tracked, self.running_log_mean, batch_log_mean)
            if update:
                self._update_running_estimate(batch_log_mean.detach(), tracked)
        else:
            log_weights = log_ratio

        if self.max_weight is not None:
            log_weights = log_weights.clamp(max=math.log(self.max_weight))
        return log_weights

    def _update_running_estimate(self, batch_log_mean: Tensor, tracked: Tensor) -> None:
        if self.momentum < 1:
            # log((1 - momentum) * running + momentum * batch), kept in log space
            blended_log_mean = torch.logaddexp(
                math.log1p(-self.momentum) + self.running_log_mean, math.log(self.momentum) + batch_log_mean
            )
        else:
            blended_log_mean = batch_log_mean
        self.running_log_mean.copy_(torch.where(tracked, blended_log_mean, batch_log_mean))
        self.num_batches_tracked.add_(1)


class ImportanceWeighting(DomainAdaptationModule):
    """Covariate-shift correction by importance weighting with a domain discriminator.

    Under covariate shift (``p(y|x)`` shared, ``p(x)`` different) the target risk equals the
    source risk weighted by the density ratio ``w(x) = p_t(x) / p_s(x)`` (Shimodaira,
    "Improving predictive inference under covariate shift by weighting the log-likelihood
    function", J. Stat. Plan. Inference 2000). The ratio is estimated discriminatively, with
    a probabilistic classifier of the domain (Bickel, Brückner and Scheffer, "Discriminative
    learning for differing training and test distributions", ICML 2007). Each batch runs two
    steps, each with its own optimizer and learning-rate schedule:

    1. Domain discriminator ``D`` step on ``L_d = (BCE(D(v(x_s)), 1) + BCE(D(v(x_t)), 0)) / 2``
       (:func:`~lightning_uda.losses.domain_adversarial_loss`), ``v`` the view set by
       ``discriminator_input``.
    2. Feature extractor ``F`` and classifier ``C`` step on the weighted source loss:

       ``L = (1 / B) * sum_i w(x_s_i) * CE(C(F(x_s_i)), y_s_i)``, with ``w = exp(-D(v(x_s)))``
       normalised and clipped by :class:`ImportanceWeightNormalizer`.

    Prior correction and stream sizes: the discriminator's logit estimates
    ``log(n_s p_s(x)) - log(n_t p_t(x))``, where ``n_s`` and ``n_t`` are the weights of the two
    domains in its loss. The training loader draws ``batch_size`` samples from each stream
    for every step, and the shorter stream cycles. ``domain_adversarial_loss`` then averages
    each domain separately before adding them. The two domains therefore carry equal weight,
    whatever the sizes of the two data sets or of a last, smaller batch, so the correction
    ``n_s / n_t`` is 1 and ``w = exp(-logit)``. Using the data set sizes (say 3,000 source
    and 1,000 target images) would wrongly scale every weight by their ratio. With
    ``"batch"`` or ``"running"`` normalisation any constant factor cancels anyway, and the
    correction matters only for ``normalization="none"``.

    Where the discriminator looks (``discriminator_input``):

    - ``"input"``: the raw inputs; ``domain_discriminator`` must be given, sized to them.
    - ``"features"``: the current features of ``F``, detached. They move during training,
      so the weights chase a moving representation.
    - ``"frozen_features"`` (default): features of ``frozen_feature_extractor``, a frozen copy of
      ``F``. During the first ``warmup_fraction`` of training ``F`` trains on the unweighted
      source loss and the copy follows it, so the copy ends the warm-up as a source-trained
      network. After the warm-up the copy stays fixed. With ``warmup_fraction=0`` the
      copy keeps the weights ``F`` had when the module was built (e.g. pretrained ones).

    During the warm-up (``training_progress < warmup_fraction``) the discriminator already
    trains and the running estimate is tracked, but the classifier step uses unit weights.

    Weights are computed without gradient, with ``D`` in eval mode (so batch normalization in
    ``D`` uses its running statistics), from the discriminator after its step in the same batch.
    Lightning warns that modules are in eval mode at the start of training: those are the
    frozen copy's, on purpose.

    Logged: ``train/loss_task`` (weighted), ``train/loss_domain``, ``train/domain_acc``,
    ``train/iw_mean``, ``train/iw_max``, ``train/iw_ess`` (effective sample size as a
    fraction of the batch, of the weights applied), ``train/lr``.

    Args:
        feature_extractor: network ``F``; must expose ``out_features`` unless the heads are given.
        classifier: label classifier ``C``; a linear layer by default.
        domain_discriminator: network ``D`` returning one logit per sample, shape (B,). By
            default a :class:`~lightning_uda.backbones.DomainDiscriminator` on the features,
            without batch normalization; required for ``discriminator_input="input"``.
        discriminator_input: ``"input"``, ``"features"`` or ``"frozen_features"``.
        warmup_fraction: fraction of training, in [0, 1), trained with unit weights.
        normalization: ``"batch"``, ``"running"`` or ``"none"``; see :class:`ImportanceWeightNormalizer`.
        running_momentum: weight of the newest batch in the running mean of the weights.
        max_weight: clip of the normalised weights; ``None`` disables clipping.
        weight_exponent: ``lambda`` in [0, 1]; the weights used are ``w^lambda``, normalised.
        discriminator_lr_mult: learning-rate multiplier of the discriminator's optimizer.
        **kwargs: the other arguments of :class:`~lightning_uda.base.DomainAdaptationModule`.

    Example::

        model = ImportanceWeighting(feature_extractor=LeNet(), num_classes=10, warmup_fraction=0.2)
        Trainer(max_steps=4000).fit(model, datamodule=BundledDigitsDataModule())
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        classifier: nn.Module | None = None,
        domain_discriminator: nn.Module | None = None,
        discriminator_input: Literal["input", "features", "frozen_features"] = "frozen_features",
        warmup_fraction: float = 0.2,
        normalization: Literal["batch", "running", "none"] = "running",
        running_momentum: float = 0.05,
        max_weight: float | None = 10.0,
        weight_exponent: float = 1.0,
        discriminator_lr_mult: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(feature_extractor=feature_extractor, classifier=classifier, **kwargs)
        if discriminator_input not in DISCRIMINATOR_INPUTS:
            raise ValueError(f"discriminator_input must be one of {DISCRIMINATOR_INPUTS}, got {discriminator_input!r}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if discriminator_lr_mult <= 0:
            raise ValueError(f"discriminator_lr_mult must be positive, got {discriminator_lr_mult}")
        if domain_discriminator is None:
            if discriminator_input == "input":
                raise ValueError(
                    "discriminator_input='input' needs a domain_discriminator sized to the flattened "
                    "inputs, e.g. DomainDiscriminator(in_features=784) for 28x28 images"
                )
            domain_discriminator = DomainDiscriminator(feature_dimension(feature_extractor), batch_norm=False)
        self.domain_discriminator = domain_discriminator
        self.discriminator_input = discriminator_input
        self.warmup_fraction = warmup_fraction
        self.discriminator_lr_mult = discriminator_lr_mult
        self.weight_normalizer = ImportanceWeightNormalizer(normalization, running_momentum, max_weight, weight_exponent)

        self.frozen_feature_extractor = None
        if discriminator_input == "frozen_features":
            self.frozen_feature_extractor = copy.deepcopy(feature_extractor).requires_grad_(False).eval()

    def train(self, mode: bool = True):
        # The frozen copy stays in eval mode (no dropout, fixed batch-norm statistics) throughout.
        super().train(mode)
        if self.frozen_feature_extractor is not None:
            self.frozen_feature_extractor.eval()
        return self

    @property
    def in_warmup(self) -> bool:
        """Whether the current batch falls in the warm-up, which trains with unit weights."""
        return self.training_progress < self.warmup_fraction

    def optimizer_parameter_groups(self) -> list[list[dict]]:
        discriminator_group = {"params": list(self.domain_discriminator.parameters()), "lr_mult": self.discriminator_lr_mult}
        return [[discriminator_group], self.classifier_parameter_groups()]

    # ----------------------------------------------------------------- weights
    def discriminator_view(self, inputs: Tensor) -> Tensor:
        """Return the discriminator's input for ``inputs`` (raw, features or frozen features), detached."""
        if self.discriminator_input == "input":
            return inputs
        if self.discriminator_input == "features":
            return self.feature_extractor(inputs).detach()
        with torch.no_grad():
            return self.frozen_feature_extractor(inputs)

    @torch.no_grad()
    def log_weights_of_view(self, source_view: Tensor, update: bool | None = None) -> Tensor:
        """Return the log importance weights, shape (B,), of source samples seen as ``source_view``."""
        was_training = self.domain_discriminator.training
        self.domain_discriminator.eval()
        logits = self.domain_discriminator(source_view)
        self.domain_discriminator.train(was_training)
        return self.weight_normalizer(log_density_ratio(logits.reshape(-1)), update=update)

    @torch.no_grad()
    def importance_weights(self, source_inputs: Tensor, update: bool = False) -> Tensor:
        """Return the importance weights, shape (B,), of a batch of source inputs.

        Uses the networks in their current mode and, by default, leaves the running
        estimate unchanged, so it can be called for inspection at any time.
        """
        return self.log_weights_of_view(self.discriminator_view(source_inputs), update=update).exp()

    # ----------------------------------------------------------------- training
    def adaptation_step(self, source_inputs: Tensor, source_labels: Tensor, target_inputs: Tensor) -> None:
        discriminator_optimizer, classifier_optimizer = self.optimizers()
        in_warmup = self.in_warmup

        source_features = None
        if self.discriminator_input == "features":
            # One pass over both domains; the classifier step reuses the source half with its graph.
            features = self.feature_extractor(torch.cat([source_inputs, target_inputs]))
            source_features = features[: len(source_inputs)]
            source_view, target_view = source_features.detach(), features[len(source_inputs) :].detach()
        else:
            source_view = self.discriminator_view(source_inputs)
            target_view = self.discriminator_view(target_inputs)

        # discriminator step
        self.toggle_optimizer(discriminator_optimizer)
        domain_logits = self.domain_discriminator(torch.cat([source_view, target_view])).reshape(-1)
        source_logits, target_logits = domain_logits[: len(source_view)], domain_logits[len(source_view) :]
        domain_loss = domain_adversarial_loss(source_logits, target_logits)
        self.step_optimizer(discriminator_optimizer, domain_loss)
        self.untoggle_optimizer(discriminator_optimizer)

        # importance weights from the updated discriminator; unit weights during the warm-up
        log_weights = self.log_weights_of_view(source_view)
        if in_warmup:
            log_weights = torch.zeros_like(log_weights)
        weights = log_weights.exp()

        # feature extractor + classifier step on the weighted source loss
        self.toggle_optimizer(classifier_optimizer)
        if source_features is None:
            source_features = self.feature_extractor(source_inputs)
        logits = self.classifier(source_features)
        losses = F.cross_entropy(logits.float(), source_labels, reduction="none")
        task_loss = (weights * losses).mean()
        self.step_optimizer(classifier_optimizer, task_loss)
        self.untoggle_optimizer(classifier_optimizer)

        if in_warmup and self.frozen_feature_extractor is not None:
            self.frozen_feature_extractor.load_state_dict(self.feature_extractor.state_dict())

        self.log("train/loss_task", task_loss.detach(), prog_bar=True)
        self.log("train/loss_domain", domain_loss.detach(), prog_bar=True)
        self.log("train/domain_acc", domain_accuracy(source_logits.detach(), target_logits.detach()))
        self.log("train/iw_mean", weights.mean())
        self.log("train/iw_max", weights.max())
        self.log("train/iw_ess", effective_sample_size(log_weights))

"""Unsupervised validators: model-selection scores computed without target labels.

Target labels are missing in unsupervised domain adaptation, so ``val/target_acc`` cannot pick
hyperparameters or checkpoints in a real deployment. The validators below score a model from
what is available: labeled source validation data and unlabeled target validation data.

- ``val/source_acc`` (higher is better): source validation accuracy, logged by the base.
- ``val/target_entropy`` (lower): mean entropy of the target predictions, :class:`TargetEntropy`.
- ``val/im`` (higher): information maximization ``H(mean p) - mean H(p)``,
  :class:`InformationMaximization`.
- ``val/snd`` (higher): soft neighborhood density (Saito et al., ICCV 2021),
  :class:`SoftNeighborhoodDensity`.
- ``val/dev`` (lower): deep embedded validation (You et al., ICML 2019),
  :class:`DeepEmbeddedValidation`.

Source accuracy needs no class here: :class:`~lightning_uda.base.DomainAdaptationModule`
logs it for every model. It measures the source domain only, so it cannot see a drop on the target.

Each validator is a torchmetrics :class:`~torchmetrics.Metric`. Its states are sums or
concatenated tensors with a ``dist_reduce_fx``, so under DDP ``compute()`` first gathers the
states of all processes and every process returns the same score. :func:`monitor_mode` turns a
logged name into the ``mode`` of ``ModelCheckpoint`` and ``EarlyStopping``.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

EVAL_DOMAINS = ("source", "target")


# ----------------------------------------------------------------------------- functional forms
def prediction_entropy(logits: Tensor) -> Tensor:
    """Return the entropy ``H(p) = -sum_c p_c log p_c`` of the softmax of each row of ``logits``, shape (B,)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1)


def information_maximization(logits: Tensor) -> Tensor:
    """Return the information maximization score ``H(mean_i p_i) - mean_i H(p_i)`` of ``logits`` (B, C).

    It is the mutual information between inputs and predicted classes: ``log C`` for
    confident predictions spread evenly over the ``C`` classes, 0 when every input gets the
    same prediction.
    """
    probs = F.softmax(logits.float(), dim=1)
    mean_probs = probs.mean(dim=0, keepdim=True)
    return torch.special.entr(mean_probs).sum() - prediction_entropy(logits).mean()


def soft_neighborhood_density(embeddings: Tensor, temperature: float = 0.05, chunk_size: int = 1024) -> Tensor:
    """Return the soft neighborhood density (SND) of ``embeddings`` (N, D).

    Saito et al., "Tune it the Right Way: Unsupervised Validation of Domain Adaptation via
    Soft Neighborhood Density", ICCV 2021. With ``e_i`` the L2-normalized embeddings:

        ``P_ij = softmax_{j != i}(e_i . e_j / temperature)``,  ``SND = mean_i H(P_i.)``

    Each sample's own similarity is left out of its neighbor distribution. A high SND means
    every sample has many close neighbors, i.e. dense clusters.

    Args:
        embeddings: softmax predictions (the default of the paper) or features, shape (N, D), N >= 2.
        temperature: softmax temperature of the cosine similarities.
        chunk_size: rows of the (N, N) similarity matrix computed at once, to bound memory.
    """
    if embeddings.ndim != 2 or len(embeddings) < 2:
        raise ValueError(f"SND needs embeddings of shape (N, D) with N >= 2, got {tuple(embeddings.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    embeddings = F.normalize(embeddings.float(), dim=1)
    total = embeddings.new_zeros(())
    for start in range(0, len(embeddings), chunk_size):
        rows = embeddings[start : start + chunk_size]
        similarity = rows @ embeddings.T / temperature  # (chunk, N)
        own = torch.arange(start, start + len(rows), device=embeddings.device)
        similarity[torch.arange(len(rows), device=embeddings.device), own] = -math.inf
        neighbor_probs = F.softmax(similarity, dim=1)
        total = total + torch.special.entr(neighbor_probs).sum()
    return total / len(embeddings)


def deep_embedded_validation(
    source_features: np.ndarray,
    source_losses: np.ndarray,
    target_features: np.ndarray,
    num_folds: int = 5,
    regularization: float = 1.0,
    seed: int = 0,
) -> float:
    """Return the deep embedded validation (DEV) risk, an estimate of the target loss.

    You et al., "Towards Accurate Model Selection in Deep Unsupervised Domain Adaptation",
    ICML 2019. A domain classifier on the features gives the density ratio of each labeled
    source sample, ``w_i = (n_s / n_t) * P(target | f_i) / P(source | f_i)``. The
    importance-weighted losses ``L_i = w_i * loss_i`` estimate the target risk without bias,
    and the control variate ``W_i = w_i`` (its mean is 1) lowers the variance:

        ``eta = -Cov(L, W) / Var(W)``,  ``DEV = mean(L) + eta * mean(W) - eta``

    The paper fits the domain classifier on source training features. Here it is fitted on
    the same source samples that are weighted, so each weight comes from out-of-fold
    predictions (``num_folds``-fold cross-fitting), which keeps the classifier from rating
    the samples it memorized.

    Args:
        source_features: features of the labeled source validation samples, shape (n_s, D).
        source_losses: per-sample task loss of those samples, shape (n_s,).
        target_features: features of unlabeled target samples, shape (n_t, D).
        num_folds: folds of the cross-fitting, lowered to the smaller domain's size when needed.
        regularization: inverse L2 strength ``C`` of the logistic-regression domain classifier.
        seed: seed of the fold split.
    """
    num_source, num_target = len(source_features), len(target_features)
    if num_source < 2 or num_target < 2:
        raise ValueError(
            f"DEV needs at least 2 samples per domain, got {num_source} source and {num_target} target"
        )
    if source_losses.shape != (num_source,):
        raise ValueError(f"source_losses must have shape ({num_source},), got {source_losses.shape}")
    if num_folds < 2:
        raise ValueError(f"num_folds must be at least 2, got {num_folds}")

    features = np.concatenate([source_features, target_features]).astype(np.float64)
    is_target = np.concatenate([np.zeros(num_source, dtype=int), np.ones(num_target, dtype=int)])
    folds = StratifiedKFold(n_splits=min(num_folds, num_source, num_target), shuffle=True, random_state=seed)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=1000))
    target_probs = cross_val_predict(classifier, features, is_target, cv=folds, method="predict_proba")[:, 1]

    # Clipping keeps the ratio finite when the classifier is certain. The paper does not clip.
    target_probs = np.clip(target_probs[:num_source], 1e-6, 1 - 1e-6)
    weights = (num_source / num_target) * target_probs / (1 - target_probs)
    weighted_losses = weights * source_losses

    weight_variance = np.var(weights, ddof=1)
    if weight_variance > 0:
        eta = -np.cov(weighted_losses, weights, ddof=1)[0, 1] / weight_variance
    else:
        eta = 0.0
    return float(weighted_losses.mean() + eta * weights.mean() - eta)


# ----------------------------------------------------------------------------- metrics
class UnsupervisedValidator(Metric):
    """Base class of the validators: routes source and target evaluation batches to their updates.

    ``update(domain, features, logits, labels)`` takes one evaluation batch of ``domain``
    (``"source"`` or ``"target"``). Source batches carry their labels, but target batches must
    come with ``labels=None``, so that a validator cannot read target labels. A subclass
    implements :meth:`update_target` and, when it uses source data, :meth:`update_source`.

    Shapes: ``features`` (B, D) from the feature extractor, ``logits`` (B, C), ``labels`` (B,).
    """

    full_state_update = False

    def update(self, domain: str, features: Tensor, logits: Tensor, labels: Tensor | None = None) -> None:
        if domain == "source":
            if labels is None:
                raise ValueError(
                    "source batches need their labels: labels is None, pass the source labels to update()"
                )
            self.update_source(features.detach(), logits.detach(), labels)
        elif domain == "target":
            if labels is not None:
                raise ValueError(
                    "target labels must not reach an unsupervised validator, "
                    "so pass labels=None for target batches"
                )
            self.update_target(features.detach(), logits.detach())
        else:
            raise ValueError(f"domain must be one of {EVAL_DOMAINS}, got {domain!r}")

    def update_source(self, features: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Accumulate a labeled source batch. Validators that use only target data ignore it."""

    def update_target(self, features: Tensor, logits: Tensor) -> None:
        """Accumulate an unlabeled target batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_target")


class TargetEntropy(UnsupervisedValidator):
    """Mean entropy of the softmax predictions on the target, ``mean_i H(p_i)`` (lower is better).

    Confident target predictions score low. A model that collapses onto one confident wrong
    class also scores low, so read this together with :class:`InformationMaximization`.
    """

    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("entropy_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update_target(self, features: Tensor, logits: Tensor) -> None:
        self.entropy_sum += prediction_entropy(logits).sum().double()
        self.count += len(logits)

    def compute(self) -> Tensor:
        return (self.entropy_sum / self.count).float()


class InformationMaximization(UnsupervisedValidator):
    """Information maximization on the target, ``H(mean_i p_i) - mean_i H(p_i)`` (higher is better).

    It is the quantity that information-maximization losses push up. It is high when target
    predictions are confident and spread over all classes, and it lies in ``[0, log C]``.

    Args:
        num_classes: number of classes ``C`` (width of the logits).
        **kwargs: arguments of :class:`~torchmetrics.Metric`.
    """

    higher_is_better = True

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.add_state("prob_sum", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("entropy_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update_target(self, features: Tensor, logits: Tensor) -> None:
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, expected num_classes={self.num_classes}")
        self.prob_sum += F.softmax(logits.float(), dim=1).sum(dim=0).double()
        self.entropy_sum += prediction_entropy(logits).sum().double()
        self.count += len(logits)

    def compute(self) -> Tensor:
        mean_probs = self.prob_sum / self.count
        return (torch.special.entr(mean_probs).sum() - self.entropy_sum / self.count).float()


class SoftNeighborhoodDensity(UnsupervisedValidator):
    """Soft neighborhood density of the target predictions (higher is better).

    See :func:`soft_neighborhood_density` for the formula. All target embeddings of the
    epoch are kept (a ``"cat"`` state, gathered across processes under DDP), and the score
    costs ``O(N^2 D)`` time for ``N`` target validation samples.

    Note:
        Predictions that are all alike, such as the near-uniform outputs of an untrained
        model, make every neighbor equally close and give the maximum, ``log(N - 1)``. Skip
        the first validations when monitoring SND, or check it against ``val/im``.

    Args:
        temperature: softmax temperature of the cosine similarities (0.05 in the paper).
        embedding: ``"probabilities"`` (softmax predictions, as in the paper) or ``"features"``.
        **kwargs: arguments of :class:`~torchmetrics.Metric`.
    """

    higher_is_better = True

    def __init__(self, temperature: float = 0.05, embedding: str = "probabilities", **kwargs) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if embedding not in ("probabilities", "features"):
            raise ValueError(f"embedding must be 'probabilities' or 'features', got {embedding!r}")
        self.temperature = temperature
        self.embedding = embedding
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")

    def update_target(self, features: Tensor, logits: Tensor) -> None:
        if self.embedding == "probabilities":
            self.embeddings.append(F.softmax(logits.float(), dim=1))
        else:
            self.embeddings.append(features.float())

    def compute(self) -> Tensor:
        return soft_neighborhood_density(dim_zero_cat(self.embeddings), self.temperature)


class DeepEmbeddedValidation(UnsupervisedValidator):
    """Deep embedded validation, an importance-weighted source validation loss (lower is better).

    See :func:`deep_embedded_validation` for the formula and the domain classifier. Source
    features, per-sample source losses and target features of the epoch are kept as ``"cat"``
    states and moved to the CPU for scikit-learn in ``compute()``.

    Note:
        The states keep every validation feature vector, e.g. about 0.5 GB for 55,000 samples
        of 2048-d ResNet-50 features, so use a validation split of moderate size.

    Args:
        num_folds: folds of the cross-fitted domain classifier.
        regularization: inverse L2 strength ``C`` of the logistic-regression domain classifier.
        seed: seed of the fold split.
        **kwargs: arguments of :class:`~torchmetrics.Metric`.
    """

    higher_is_better = False

    def __init__(self, num_folds: int = 5, regularization: float = 1.0, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_folds < 2:
            raise ValueError(f"num_folds must be at least 2, got {num_folds}")
        self.num_folds = num_folds
        self.regularization = regularization
        self.seed = seed
        self.add_state("source_features", default=[], dist_reduce_fx="cat")
        self.add_state("source_losses", default=[], dist_reduce_fx="cat")
        self.add_state("target_features", default=[], dist_reduce_fx="cat")

    def update_source(self, features: Tensor, logits: Tensor, labels: Tensor) -> None:
        self.source_features.append(features.float())
        self.source_losses.append(F.cross_entropy(logits.float(), labels, reduction="none"))

    def update_target(self, features: Tensor, logits: Tensor) -> None:
        self.target_features.append(features.float())

    def compute(self) -> Tensor:
        risk = deep_embedded_validation(
            dim_zero_cat(self.source_features).cpu().numpy(),
            dim_zero_cat(self.source_losses).cpu().numpy(),
            dim_zero_cat(self.target_features).cpu().numpy(),
            num_folds=self.num_folds,
            regularization=self.regularization,
            seed=self.seed,
        )
        return torch.tensor(risk, dtype=torch.float32)


# ----------------------------------------------------------------------------- registry
VALIDATORS: dict[str, type[UnsupervisedValidator]] = {
    "target_entropy": TargetEntropy,
    "im": InformationMaximization,
    "snd": SoftNeighborhoodDensity,
    "dev": DeepEmbeddedValidation,
}

# Scores logged by DomainAdaptationModule itself, with their direction.
BASE_SCORES_HIGHER_IS_BETTER = {"source_acc": True, "target_acc": True, "source_loss": False}


def build_validators(names: Sequence[str], num_classes: int) -> nn.ModuleDict:
    """Create the validators named in ``names`` with their default settings, keyed by name.

    Args:
        names: keys of :data:`VALIDATORS`, e.g. ``["snd", "dev"]``.
        num_classes: number of classes, for the validators that need it.
    """
    validators = nn.ModuleDict()
    for name in names:
        if name not in VALIDATORS:
            raise ValueError(f"unknown validator {name!r}, choose from {sorted(VALIDATORS)}")
        if name in validators:
            raise ValueError(f"validator {name!r} is listed twice in {list(names)}")
        validator_class = VALIDATORS[name]
        if validator_class is InformationMaximization:
            validators[name] = validator_class(num_classes=num_classes)
        else:
            validators[name] = validator_class()
    return validators


def monitor_mode(monitor: str) -> str:
    """Return the ``mode`` (``"min"`` or ``"max"``) for monitoring a validator's logged score.

    Example: ``ModelCheckpoint(monitor="val/snd", mode=monitor_mode("val/snd"))``.

    Args:
        monitor: a logged name such as ``"val/dev"`` or a bare name such as ``"dev"``. The
            base's ``source_acc``, ``target_acc`` and ``source_loss`` are accepted too.
    """
    name = monitor.split("/", 1)[1] if "/" in monitor else monitor
    if name in VALIDATORS:
        higher_is_better = VALIDATORS[name].higher_is_better
    elif name in BASE_SCORES_HIGHER_IS_BETTER:
        higher_is_better = BASE_SCORES_HIGHER_IS_BETTER[name]
    else:
        known = sorted(VALIDATORS) + sorted(BASE_SCORES_HIGHER_IS_BETTER)
        raise ValueError(f"no known direction for {monitor!r}: expected one of {known}, optionally with 'val/'")
    return "max" if higher_is_better else "min"

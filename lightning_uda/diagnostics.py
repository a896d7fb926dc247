"""Pictures and domain-distance scores that show what adaptation did to the features.

:class:`AdaptationDiagnostics` is a Lightning callback that writes to TensorBoard a t-SNE map
of source and target features, the confusion matrix on the target, and the proxy A-distance
between the domains before and after training. The functions it uses work on plain arrays too.
"""

import logging

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics import ConfusionMatrixDisplay
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

DOMAINS = ("source", "target")
# t-SNE runs on at most this many PCA components, which keeps it fast on wide features.
TSNE_PCA_COMPONENTS = 50
# Values are written in the confusion-matrix cells only up to this many classes, because beyond it they overlap.
MAX_CLASSES_WITH_VALUES = 20


# ----------------------------------------------------------------------------- array functions
def proxy_a_distance(
    source_features: np.ndarray,
    target_features: np.ndarray,
    max_samples_per_domain: int = 2000,
    regularization: float = 1.0,
    seed: int = 0,
) -> float:
    """Return the proxy A-distance ``2 * (1 - 2 * err)`` between two feature sets.

    Ben-David et al., "Analysis of Representations for Domain Adaptation", NIPS 2006.
    ``err`` is the test error of a linear classifier (standardized features, L2 logistic
    regression) trained to separate the domains, on a stratified half-and-half split. Both
    domains are subsampled to the same size first, so that a classifier that always predicts
    the larger domain scores ``err = 0.5``. The distance is 2 for separable domains and about
    0 for indistinguishable ones (slightly below 0 by chance).

    Args:
        source_features: source features, shape (n_s, D).
        target_features: target features, shape (n_t, D).
        max_samples_per_domain: cap on the samples drawn from each domain.
        regularization: inverse L2 strength ``C`` of the logistic regression.
        seed: seed of the subsampling and of the split.
    """
    num_samples = min(len(source_features), len(target_features), max_samples_per_domain)
    if num_samples < 2:
        raise ValueError(
            f"proxy A-distance needs at least 2 samples per domain, got {len(source_features)} source "
            f"and {len(target_features)} target"
        )
    rng = np.random.default_rng(seed)
    source = source_features[rng.choice(len(source_features), num_samples, replace=False)]
    target = target_features[rng.choice(len(target_features), num_samples, replace=False)]

    features = np.concatenate([source, target]).astype(np.float64)
    is_target = np.repeat([0, 1], num_samples)
    train_features, test_features, train_domains, test_domains = train_test_split(
        features, is_target, test_size=0.5, stratify=is_target, random_state=seed
    )
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=1000))
    classifier.fit(train_features, train_domains)
    error = 1.0 - classifier.score(test_features, test_domains)
    return 2.0 * (1.0 - 2.0 * error)


def tsne_embedding(features: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """Return a 2-D t-SNE embedding (N, 2) of ``features`` (N, D), after PCA to at most 50 dimensions."""
    num_samples = len(features)
    if num_samples < 3:
        raise ValueError(f"t-SNE needs at least 3 samples, got {num_samples}")
    components = min(TSNE_PCA_COMPONENTS, num_samples, features.shape[1])
    if components < features.shape[1]:
        features = PCA(n_components=components, random_state=seed).fit_transform(features)
    # scikit-learn requires perplexity < number of samples.
    tsne = TSNE(n_components=2, perplexity=min(perplexity, num_samples - 1), init="pca", random_state=seed)
    return tsne.fit_transform(features)


def embedding_figure(points: np.ndarray, domains: np.ndarray, labels: np.ndarray, num_classes: int) -> Figure:
    """Draw 2-D points twice, coloured by domain (left) and by class (right, source o, target x).

    Args:
        points: 2-D coordinates, shape (N, 2).
        domains: 0 for source and 1 for target, shape (N,).
        labels: class of each point, shape (N,).
        num_classes: number of classes, which fixes the colour scale.
    """
    figure = Figure(figsize=(12, 5.5))
    domain_axes, class_axes = figure.subplots(1, 2)
    colormap = "tab10" if num_classes <= 10 else "tab20"
    for index, (domain, colour, marker) in enumerate(zip(DOMAINS, ("tab:blue", "tab:red"), ("o", "x"))):
        mask = domains == index
        domain_axes.scatter(
            points[mask, 0], points[mask, 1], s=8, c=colour, marker=marker, alpha=0.6, label=domain
        )
        class_axes.scatter(
            points[mask, 0],
            points[mask, 1],
            s=8,
            c=labels[mask],
            cmap=colormap,
            vmin=0,
            vmax=num_classes - 1,
            marker=marker,
            alpha=0.7,
            label=domain,
        )
    domain_axes.set_title("t-SNE of features by domain")
    class_axes.set_title("by class (source o, target x)")
    domain_axes.legend(loc="best")
    for axes in (domain_axes, class_axes):
        axes.set_xticks([])
        axes.set_yticks([])
    figure.tight_layout()
    return figure


def confusion_matrix_figure(labels: np.ndarray, predictions: np.ndarray, num_classes: int, title: str) -> Figure:
    """Draw the row-normalized confusion matrix (true class per row) of ``predictions``."""
    size = max(5.0, 0.45 * num_classes)
    figure = Figure(figsize=(size, size))
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(
        labels,
        predictions,
        labels=list(range(num_classes)),
        normalize="true",
        ax=axes,
        colorbar=False,
        include_values=num_classes <= MAX_CLASSES_WITH_VALUES,
        values_format=".2f",
    )
    axes.set_title(title)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------- callback
class AdaptationDiagnostics(Callback):
    """Write pictures of the source and target features and the proxy A-distance to TensorBoard.

    At fit start, and again at the end of training, the callback extracts features, logits
    and labels of the datamodule's ``[source, target]`` loaders of ``split``. It logs:

    - ``diagnostics/proxy_a_distance_start`` and ``diagnostics/proxy_a_distance_end``: proxy
      A-distance (:func:`proxy_a_distance`) before and after adaptation, plus
      ``diagnostics/proxy_a_distance`` at every point it is computed.
    - ``diagnostics/tsne`` (figure): t-SNE of at most ``max_points`` features, half per
      domain, coloured by domain and by class.
    - ``diagnostics/target_confusion_matrix`` (figure): row-normalized confusion matrix of
      the target predictions.

    The figures are written at the end of training and every ``every_n_epochs`` epochs.
    Scalars go to every logger of the Trainer, and figures only to a ``TensorBoardLogger``.
    Only the global rank-zero process computes and writes, on the model it holds, while the
    other processes go on. The class labels of the target ``split`` are read for the class
    colours and the confusion matrix, never for training or model selection.

    Note:
        When a fit resumes from a checkpoint, ``proxy_a_distance_start`` measures the restored
        model, not the model before adaptation.

    Args:
        every_n_epochs: write the figures after every this many training epochs as well.
            ``None`` writes them only at the end of training.
        split: ``"test"`` or ``"val"``: which datamodule loaders to read (``test_dataloader``
            or ``val_dataloader``, each returning ``[source, target]``).
        max_points: cap on the points of the t-SNE map, both domains together.
        perplexity: t-SNE perplexity.
        pad_max_samples: cap on the samples per domain of the proxy A-distance.
        seed: seed of the subsampling, the t-SNE and the proxy A-distance split.
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        split: str = "test",
        max_points: int = 1000,
        perplexity: float = 30.0,
        pad_max_samples: int = 2000,
        seed: int = 0,
    ) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be at least 1 or None, got {every_n_epochs}")
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        if max_points < 6:
            raise ValueError(f"max_points must be at least 6 (3 per domain for t-SNE), got {max_points}")
        self.every_n_epochs = every_n_epochs
        self.split = split
        self.max_points = max_points
        self.perplexity = perplexity
        self.pad_max_samples = pad_max_samples
        self.seed = seed
        self._last_figure_step: int | None = None
        self._last_distance: float | None = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_figure_step = None
        if not trainer.is_global_zero:
            return
        if not any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            rank_zero_warn(
                "AdaptationDiagnostics found no TensorBoardLogger, so it writes only its scalars. "
                "Pass logger=TensorBoardLogger(...) to the Trainer to get the figures."
            )
        outputs = self._collect_outputs(trainer, pl_module)
        distance = self._log_distance(trainer, outputs)
        self._log_scalars(trainer, {"diagnostics/proxy_a_distance_start": distance})
        log.info("proxy A-distance at fit start: %.4f", distance)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if trainer.is_global_zero:
            self._write_all(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self._last_figure_step == trainer.global_step:
            distance = self._last_distance
        else:
            distance = self._write_all(trainer, pl_module)
        self._log_scalars(trainer, {"diagnostics/proxy_a_distance_end": distance})
        log.info("proxy A-distance at the end of training: %.4f", distance)

    # ------------------------------------------------------------------ steps
    def _write_all(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Write the figures and the proxy A-distance of the current model, and return the distance."""
        outputs = self._collect_outputs(trainer, pl_module)
        distance = self._log_distance(trainer, outputs)
        num_classes = self._num_classes(pl_module, outputs)
        self._add_figure(trainer, "diagnostics/tsne", self._tsne_figure(outputs, num_classes))
        target_labels = outputs["target"]["labels"]
        target_predictions = outputs["target"]["logits"].argmax(axis=1)
        accuracy = float((target_predictions == target_labels).mean())
        title = f"target {self.split}: accuracy {accuracy:.3f}, step {trainer.global_step}"
        figure = confusion_matrix_figure(target_labels, target_predictions, num_classes, title)
        self._add_figure(trainer, "diagnostics/target_confusion_matrix", figure)
        self._last_figure_step = trainer.global_step
        return distance

    def _log_distance(self, trainer: Trainer, outputs: dict) -> float:
        distance = proxy_a_distance(
            outputs["source"]["features"],
            outputs["target"]["features"],
            max_samples_per_domain=self.pad_max_samples,
            seed=self.seed,
        )
        self._log_scalars(trainer, {"diagnostics/proxy_a_distance": distance})
        self._last_distance = distance
        return distance

    def _tsne_figure(self, outputs: dict, num_classes: int) -> Figure:
        rng = np.random.default_rng(self.seed)
        features, domains, labels = [], [], []
        for index, domain in enumerate(DOMAINS):
            domain_outputs = outputs[domain]
            count = len(domain_outputs["labels"])
            chosen = rng.choice(count, min(count, self.max_points // 2), replace=False)
            features.append(domain_outputs["features"][chosen])
            labels.append(domain_outputs["labels"][chosen])
            domains.append(np.full(len(chosen), index))
        points = tsne_embedding(np.concatenate(features), self.perplexity, self.seed)
        return embedding_figure(points, np.concatenate(domains), np.concatenate(labels), num_classes)

    # ------------------------------------------------------------------ helpers
    def _loaders(self, trainer: Trainer) -> list[DataLoader]:
        datamodule = trainer.datamodule
        method_name = f"{self.split}_dataloader"
        if datamodule is None or not hasattr(datamodule, method_name):
            raise ValueError(
                f"AdaptationDiagnostics reads {method_name}() of the datamodule, but the Trainer has "
                f"{type(datamodule).__name__ if datamodule else 'no datamodule'}. Pass datamodule=... to fit()."
            )
        loaders = getattr(datamodule, method_name)()
        if not isinstance(loaders, (list, tuple)) or len(loaders) != len(DOMAINS):
            raise ValueError(
                f"{type(datamodule).__name__}.{method_name}() must return the loaders [source, target], "
                f"got {type(loaders).__name__}"
            )
        return list(loaders)

    def _collect_outputs(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """Return ``{domain: {"features", "logits", "labels"}}`` as numpy arrays over the whole split."""
        if not hasattr(pl_module, "classify"):
            raise TypeError(
                f"AdaptationDiagnostics needs a module with classify(inputs) -> (features, logits), "
                f"such as a DomainAdaptationModule, got {type(pl_module).__name__}"
            )
        training_modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                return {
                    domain: self._run_loader(pl_module, loader)
                    for domain, loader in zip(DOMAINS, self._loaders(trainer))
                }
        finally:
            for module, training in training_modes.items():
                module.train(training)

    @staticmethod
    def _run_loader(pl_module: LightningModule, loader: DataLoader) -> dict:
        features, logits, labels = [], [], []
        for inputs, batch_labels in loader:
            batch_features, batch_logits = pl_module.classify(inputs.to(pl_module.device))
            features.append(batch_features.float().cpu())
            logits.append(batch_logits.float().cpu())
            labels.append(batch_labels.cpu())
        return {
            "features": torch.cat(features).flatten(1).numpy(),
            "logits": torch.cat(logits).numpy(),
            "labels": torch.cat(labels).numpy(),
        }

    @staticmethod
    def _num_classes(pl_module: LightningModule, outputs: dict) -> int:
        num_classes = getattr(pl_module, "num_classes", None)
        if num_classes is None:
            num_classes = outputs["target"]["logits"].shape[1]
        return int(num_classes)

    @staticmethod
    def _log_scalars(trainer: Trainer, scalars: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)

    @staticmethod
    def _add_figure(trainer: Trainer, tag: str, figure: Figure) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, figure, global_step=trainer.global_step)

"""The base LightningModule that owns what every domain adaptation algorithm shares."""

import math
import random
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from lightning_uda.backbones import feature_dimension
from lightning_uda.schedules import annealed_lr_factor, check_progress
from lightning_uda.validators import build_validators

EVAL_DOMAINS = ("source", "target")
STAGE_NAMES = {"val": "validation", "test": "test"}
# Key of this library's entry in Lightning checkpoints.
CHECKPOINT_KEY = "lightning_uda"


class DomainAdaptationModule(LightningModule):
    """Base class of all algorithms: classifier, evaluation, optimizers and learning-rate annealing.

    A subclass implements :meth:`adaptation_step` (its losses and its optimizer steps,
    with ``manual_backward``) and :meth:`optimizer_parameter_groups` (one parameter list
    per optimizer). Everything else lives here:

    - ``forward(x)`` returns class logits ``classifier(feature_extractor(x))``.
    - Validation and test on the source and target loaders (dataloader index 0 and 1),
      logged as ``val/source_acc``, ``val/target_acc``, ``val/source_loss``,
      ``test/source_acc`` and ``test/target_acc``.
    - One SGD optimizer per parameter group, each annealed every batch by
      ``lr_p = lr / (1 + lr_alpha * p) ** lr_beta``, where ``p`` is the training progress
      derived from the Trainer (:attr:`training_progress`), so a resumed run continues
      the schedule where it stopped.
    - Checkpoints store the algorithm's class name, ``num_classes`` and the random number
      generator states (torch, CUDA, NumPy, Python). Loading a checkpoint of another
      algorithm or another ``num_classes`` raises a ``ValueError``, and a run resumed with
      ``Trainer.fit(ckpt_path=...)`` restores the generator states when training starts, so
      dropout and noise continue as in the run that saved it.
    - Input checks: source and target inputs of a training batch must have the same
      per-sample shape, and no training, validation or test input may be NaN or infinite.

    The training batch is ``{"source": (x_s, y_s), "target": x_t}``: target labels never
    reach training.

    Args:
        feature_extractor: network mapping inputs to features; must expose ``out_features``
            unless ``classifier`` is given.
        classifier: head mapping features to ``num_classes`` logits; a linear layer by default.
        num_classes: number of classes (linked from the datamodule by ``train.py``).
        lr: initial learning rate ``lr_0``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        nesterov: use Nesterov momentum.
        lr_alpha: ``alpha`` of the annealing (0 keeps the learning rate constant).
        lr_beta: ``beta`` of the annealing.
        feature_extractor_lr_mult: learning-rate multiplier of the feature extractor, e.g.
            0.1 when fine-tuning a pretrained ResNet.
        validators: names of unsupervised validators (``"target_entropy"``, ``"im"``, ``"snd"``,
            ``"dev"``) computed on the validation loaders and logged as ``val/<name>``; see
            :mod:`lightning_uda.validators`.
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        classifier: nn.Module | None = None,
        num_classes: int = 10,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        lr_alpha: float = 10.0,
        lr_beta: float = 0.75,
        feature_extractor_lr_mult: float = 1.0,
        validators: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters(ignore=["feature_extractor", "classifier", "domain_discriminator", "generator"])
        self.automatic_optimization = False

        self.feature_extractor = feature_extractor
        if classifier is None:
            classifier = nn.Linear(feature_dimension(feature_extractor), num_classes)
        self.classifier = classifier
        self.num_classes = num_classes

        self._rng_states_to_restore: dict | None = None
        self._optimizers_without_gradient: set[int] = set()

        self.val_acc = nn.ModuleDict({d: MulticlassAccuracy(num_classes, average="micro") for d in EVAL_DOMAINS})
        self.test_acc = nn.ModuleDict({d: MulticlassAccuracy(num_classes, average="micro") for d in EVAL_DOMAINS})
        self.validators = build_validators(validators, num_classes)

    # ----------------------------------------------------------------- forward
    def forward(self, inputs: Tensor) -> Tensor:
        return self.classifier(self.feature_extractor(inputs))

    def classify(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(features, logits)`` of ``inputs``."""
        features = self.feature_extractor(inputs)
        logits = self.classifier(features)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"classifier output has shape {tuple(logits.shape)}, expected (B, {self.num_classes}). "
                "The classifier's output size must equal num_classes"
            )
        return features, logits

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        source_inputs, source_labels, target_inputs = self.unpack_train_batch(batch)
        check_same_sample_shape(source_inputs, target_inputs)
        check_finite(source_inputs, f"source training batch {batch_idx}")
        check_finite(target_inputs, f"target training batch {batch_idx}")
        self.adaptation_step(source_inputs, source_labels, target_inputs)
        self.log("train/lr", self.optimizers_list()[-1].param_groups[0]["lr"], prog_bar=False)
        self._step_lr_schedulers()

    def adaptation_step(self, source_inputs: Tensor, source_labels: Tensor, target_inputs: Tensor) -> None:
        """Compute the algorithm's losses and step its optimizers for one batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement adaptation_step")

    @staticmethod
    def unpack_train_batch(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Split ``{"source": (x_s, y_s), "target": x_t}`` into its three tensors, checking the layout."""
        if not isinstance(batch, dict) or set(batch) != {"source", "target"}:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                f"training batch must be a dict with keys 'source' and 'target', got {keys}. "
                "Use a DomainAdaptationDataModule or a CombinedLoader of those two loaders"
            )
        source_inputs, source_labels = batch["source"]
        target_inputs = batch["target"]
        if isinstance(target_inputs, (list, tuple)):
            raise ValueError("target batch must be inputs only: wrap the target dataset in UnlabeledDataset")
        return source_inputs, source_labels, target_inputs

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of class logits, computed in float32 for stability under mixed precision."""
        return F.cross_entropy(logits.float(), labels)

    def optimizers_list(self) -> list:
        """Return the optimizers as a list, whether there is one or several."""
        optimizers = self.optimizers()
        return list(optimizers) if isinstance(optimizers, Sequence) else [optimizers]

    def _step_lr_schedulers(self) -> None:
        # Stepped inside training_step rather than in on_train_batch_end, because Lightning calls
        # the callbacks' on_train_batch_end first, and a ModelCheckpoint saving there would store
        # the learning rates of the batch just done instead of those of the next batch.
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, Sequence) else [schedulers]
        for scheduler in schedulers:
            scheduler.step()

    # ----------------------------------------------------------------- progress
    @property
    def total_training_batches(self) -> int:
        """Number of training batches the Trainer will run in this fit, from its limits.

        ``estimated_stepping_batches`` counts optimizer steps, but under manual optimization
        the Trainer's ``max_steps`` counts every ``optimizer.step()`` call, so with ``k``
        optimizers per batch training stops after ``max_steps / k`` batches.
        """
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if trainer.max_steps != -1:
            steps_per_batch = max(len(self.optimizer_parameter_groups()), 1)
            by_steps = math.ceil(trainer.max_steps / steps_per_batch)
            by_epochs = trainer.num_training_batches * trainer.max_epochs if trainer.max_epochs != -1 else math.inf
            total = min(by_steps, by_epochs)
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"cannot derive the training length (got {total} batches). Set max_steps or max_epochs on the Trainer"
            )
        return int(total)

    @property
    def training_progress(self) -> float:
        """Progress ``p`` in [0, 1] of the current batch: batches done before it over the total.

        The count is the Trainer's own (``fit_loop.epoch_loop.total_batch_idx``), which is
        saved in and restored from checkpoints.
        """
        if self._trainer is None:
            return 0.0
        done = self.trainer.fit_loop.epoch_loop.total_batch_idx
        return check_progress(done / self.total_training_batches)

    def _lr_factor_for_next_batch(self, _scheduler_step: int) -> float:
        # LambdaLR calls this once at construction (before any batch, progress 0) and then
        # after each batch, when the learning rate for the next batch is wanted.
        if self._trainer is None:
            return 1.0
        done = self.trainer.fit_loop.epoch_loop.total_batch_idx + 1
        progress = done / self.total_training_batches
        return annealed_lr_factor(progress, self.hparams.lr_alpha, self.hparams.lr_beta)

    # ----------------------------------------------------------------- optimizers
    def optimizer_parameter_groups(self) -> list[list[dict]]:
        """Return, for each optimizer, its parameter groups (``{"params": ..., "lr_mult": ...}``)."""
        return [self.classifier_parameter_groups()]

    def classifier_parameter_groups(self) -> list[dict]:
        """Parameter groups of the feature extractor and classifier, with their learning-rate multipliers."""
        return [
            {"params": list(self.feature_extractor.parameters()), "lr_mult": self.hparams.feature_extractor_lr_mult},
            {"params": list(self.classifier.parameters()), "lr_mult": 1.0},
        ]

    def configure_optimizers(self):
        optimizers, schedulers = [], []
        for groups in self.optimizer_parameter_groups():
            param_groups = [
                {"params": group["params"], "lr": self.hparams.lr * group.get("lr_mult", 1.0)}
                for group in groups
                if len(group["params"]) > 0
            ]
            optimizer = torch.optim.SGD(
                param_groups,
                lr=self.hparams.lr,
                momentum=self.hparams.momentum,
                weight_decay=self.hparams.weight_decay,
                nesterov=self.hparams.nesterov,
            )
            optimizers.append(optimizer)
            schedulers.append({"scheduler": LambdaLR(optimizer, self._lr_factor_for_next_batch), "interval": "step"})
        return optimizers, schedulers

    def step_optimizer(self, optimizer, loss: Tensor) -> None:
        """Zero the gradients of ``optimizer``, back-propagate ``loss`` and step, as manual optimization wants.

        If none of the optimizer's parameters received a gradient, a warning naming the
        optimizer is issued (once per optimizer) and the step leaves its parameters unchanged.
        With a gradient scaler (``precision="16-mixed"``) the step then bypasses the scaler,
        whose ``step`` would raise for an optimizer without recorded inf checks. The call still
        counts as a Trainer step, so ``max_steps`` and the schedules stay aligned.
        """
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            optimizer.step()
            return
        self._warn_no_gradient(optimizer)
        with self._gradient_scaler_disabled():
            # torch optimizers leave parameters whose .grad is None unchanged
            optimizer.step()

    def _warn_no_gradient(self, optimizer) -> None:
        index = next(i for i, candidate in enumerate(self.optimizers_list()) if candidate is optimizer)
        if index in self._optimizers_without_gradient:
            return
        self._optimizers_without_gradient.add(index)
        owners = {id(parameter): name.split(".")[0] for name, parameter in self.named_parameters()}
        parts = sorted({owners.get(id(p), "unnamed") for group in optimizer.param_groups for p in group["params"]})
        rank_zero_warn(
            f"Optimizer {index} of {type(self).__name__} (parameters of {', '.join(parts)}) received no gradient "
            f"at batch {self.trainer.fit_loop.epoch_loop.total_batch_idx}, so its step was skipped. Check that "
            "its loss depends on these parameters and that they require grad. This warning is shown once "
            "per optimizer."
        )

    @contextmanager
    def _gradient_scaler_disabled(self):
        precision = self.trainer.precision_plugin
        scaler = getattr(precision, "scaler", None)
        if scaler is not None:
            precision.scaler = None
        try:
            yield
        finally:
            if scaler is not None:
                precision.scaler = scaler

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "algorithm": type(self).__qualname__,
            "num_classes": self.num_classes,
            "rng_states": collect_rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = checkpoint.get(CHECKPOINT_KEY, {})
        algorithm = stored.get("algorithm", type(self).__qualname__)
        if algorithm != type(self).__qualname__:
            raise ValueError(
                f"The checkpoint was saved by {algorithm}, but is being loaded into {type(self).__qualname__}; "
                f"load it with {algorithm}.load_from_checkpoint, or choose a checkpoint of {type(self).__qualname__}."
            )
        num_classes = stored.get("num_classes", checkpoint.get("hyper_parameters", {}).get("num_classes"))
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"The checkpoint was saved with num_classes={num_classes}, but this {type(self).__qualname__} has "
                f"num_classes={self.num_classes}; use a datamodule with {num_classes} classes, or train a new model."
            )
        # Restored when training starts, after the sanity check and the dataloaders have drawn their numbers.
        # Under DDP every process restores the states saved by process 0.
        self._rng_states_to_restore = stored.get("rng_states") if self._trainer is not None else None

    def on_train_start(self) -> None:
        if self._rng_states_to_restore is not None:
            set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, stage: str, metrics: nn.ModuleDict, batch, dataloader_idx: int) -> None:
        if dataloader_idx >= len(EVAL_DOMAINS):
            raise ValueError(
                f"{stage} dataloader_idx {dataloader_idx} is out of range: expected the loaders "
                f"[source, target] in this order"
            )
        domain = EVAL_DOMAINS[dataloader_idx]
        inputs, labels = batch
        check_finite(inputs, f"{domain} {STAGE_NAMES[stage]} batch")
        features, logits = self.classify(inputs)
        metrics[domain](logits, labels)
        self.log(f"{stage}/{domain}_acc", metrics[domain], on_epoch=True, add_dataloader_idx=False)
        if domain == "source":
            loss = self.task_loss(logits, labels)
            # sync_dist averages over processes, so under DDP the logged loss covers the whole set.
            self.log(f"{stage}/source_loss", loss, on_epoch=True, add_dataloader_idx=False, sync_dist=True)
        if stage == "val":
            # Target labels stay out of the validators, which must work without them.
            for validator in self.validators.values():
                validator.update(domain, features, logits, labels if domain == "source" else None)

    def on_validation_epoch_end(self) -> None:
        # Lightning calls compute(), which gathers the states under DDP, then logs the score and resets.
        for name, validator in self.validators.items():
            self.log(f"val/{name}", validator)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", self.val_acc, batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", self.test_acc, batch, dataloader_idx)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(inputs).argmax(dim=1)


def check_same_sample_shape(source_inputs: Tensor, target_inputs: Tensor) -> None:
    """Raise a ValueError unless source and target inputs have the same shape apart from the batch size."""
    if not isinstance(source_inputs, Tensor) or not isinstance(target_inputs, Tensor):
        return
    if source_inputs.shape[1:] != target_inputs.shape[1:]:
        raise ValueError(
            f"source inputs have per-sample shape {tuple(source_inputs.shape[1:])} but target inputs "
            f"{tuple(target_inputs.shape[1:])}; both domains must have the same shape, e.g. convert grey "
            "images to 3 channels (or colour images to 1) and resize both domains to one size"
        )


def check_finite(inputs: Tensor, description: str) -> None:
    """Raise a ValueError naming ``description`` if ``inputs`` contains NaN or infinite values."""
    if isinstance(inputs, Tensor) and inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise ValueError(
            f"{description} contains NaN or infinite input values; clean or impute these samples in the "
            "datamodule (e.g. torch.nan_to_num) before training"
        )


def collect_rng_states() -> dict:
    """Return the states of the torch (CPU and CUDA), NumPy and Python random number generators."""
    # NumPy's key array becomes a list, so checkpoints stay loadable by torch.load(weights_only=True).
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, keys.tolist(), position, has_gauss, cached_gaussian)
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore generator states returned by :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(states["python"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])

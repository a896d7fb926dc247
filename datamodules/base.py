"""Base LightningDataModule for unsupervised domain adaptation: a labeled source, an unlabeled target."""

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

TRAIN_MODES = ("max_size_cycle", "min_size", "max_size")
DATASET_NAMES = (
    "source_train",
    "target_train",
    "source_val",
    "target_val",
    "source_test",
    "target_test",
)


class UnlabeledDataset(Dataset):
    """View of a labeled dataset that returns only the input, so its labels cannot reach training.

    Args:
        dataset: A dataset whose items are `(x, y)` pairs.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        x, _ = self.dataset[index]
        return x


class TrainingPass:
    """Position of a training DataLoader in its current pass over the data, saved to resume mid-epoch.

    One instance is shared by a :class:`ResumableDataLoader` and the copies Lightning makes of
    it (under DDP the Trainer rebuilds each loader with a ``DistributedSampler``), so all of
    them report and resume the same position.

    Args:
        generator: the loader's random generator, which draws its shuffle order and worker seeds.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.start_state = generator.get_state()
        self.batches_yielded = 0
        self.batches_to_skip = 0

    def state_dict(self, pass_finished: bool) -> dict:
        """Return what a resumed run needs to continue this pass, or to start the next one if ``pass_finished``."""
        if pass_finished:
            return {"generator_state": self.generator.get_state(), "batches_to_skip": 0}
        return {"generator_state": self.start_state, "batches_to_skip": self.batches_yielded}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
        self.batches_to_skip = state["batches_to_skip"]


class ResumableDataLoader(DataLoader):
    """DataLoader that records its position in the current pass and can skip ahead to a saved position.

    Each ``iter()`` starts a pass: the state of ``training_pass.generator`` is recorded first,
    so the pass can be replayed, and ``training_pass.batches_to_skip`` batches are drawn and
    dropped before the first batch is returned. Skipped batches are loaded normally, so worker
    processes see the same indices as in the original run, and the random numbers their
    loading draws in the main process are drawn on a fork of torch's global generator.

    Args:
        dataset: the dataset to load from.
        training_pass: the shared position; its generator becomes the loader's ``generator``.
        **kwargs: the other arguments of ``torch.utils.data.DataLoader``.
    """

    def __init__(self, dataset: Dataset, training_pass: TrainingPass, **kwargs) -> None:
        # Lightning passes the generator back when it rebuilds a loader from its attributes.
        generator = kwargs.pop("generator", training_pass.generator)
        if generator is not training_pass.generator:
            raise ValueError(
                "ResumableDataLoader draws from training_pass.generator; pass your generator to "
                "TrainingPass instead of the loader."
            )
        super().__init__(dataset, generator=generator, **kwargs)
        self.training_pass = training_pass

    def __iter__(self):
        training_pass = self.training_pass
        skip = training_pass.batches_to_skip
        training_pass.batches_to_skip = 0
        training_pass.start_state = training_pass.generator.get_state()
        training_pass.batches_yielded = skip
        return self._count_batches(super().__iter__(), skip)

    def _count_batches(self, iterator, skip: int):
        # Runs at the first next(), after Lightning has called set_epoch on a DistributedSampler.
        with torch.random.fork_rng(devices=[]):
            for _ in range(skip):
                next(iterator, None)
        for batch in iterator:
            self.training_pass.batches_yielded += 1
            yield batch


class DomainAdaptationDataModule(L.LightningDataModule):
    """Source and target data for unsupervised domain adaptation.

    Training batches pair a labeled source batch with an unlabeled target batch:
    `{"source": (x_s, y_s), "target": x_t}`. Validation and test return two labeled loaders,
    source first (`dataloader_idx` 0) and target second (`dataloader_idx` 1), in the order of
    `eval_domains`.

    Subclasses implement `_build_datasets`, which sets the six datasets named in
    `DATASET_NAMES`, each with `(x, y)` items, `_domain_num_classes`, and the `num_classes`
    property, which must work before `setup` because LightningCLI reads it when it links
    `data.num_classes` to the model.

    Under DDP no sampler is set here: Lightning's Trainer (checked in lightning 2.6,
    `_process_dataloader` in `trainer/connectors/data_connector.py`) replaces the sampler of
    every DataLoader inside the CombinedLoader with a `DistributedSampler`, so each process
    gets its own `1 / world_size` share of each domain.

    Training loaders shuffle with their own generators, seeded from torch's global generator
    when `train_dataloader` builds them, and evaluation loaders with a fixed one, so the
    loaders themselves draw no numbers from the global generator. `state_dict` saves each training loader's
    position in its pass over the data, and a run resumed from a checkpoint continues with
    the same batches as the run that saved it, also in the middle of an epoch.

    Note:
        Random transforms that run in persistent worker processes (`num_workers > 0`) restart
        from fresh worker seeds after a resume, so only the order of samples is resumed exactly.

    Args:
        batch_size: Training batch size per domain, so one training step uses `2 * batch_size` images.
        num_workers: DataLoader worker processes per loader.
        train_mode: How the CombinedLoader pairs source and target batches when their lengths
            differ: `"max_size_cycle"` (epoch ends with the longer loader, the shorter one
            restarts), `"min_size"` (epoch ends with the shorter loader) or `"max_size"` (the
            exhausted loader yields `None` until the longer one ends).
        drop_last: Drop the last incomplete training batch of each domain.
        eval_batch_size: Validation and test batch size; `None` uses `batch_size`.
    """

    eval_domains = ("source", "target")

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        train_mode: str = "max_size_cycle",
        drop_last: bool = False,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1 or None, got {eval_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}.")
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {train_mode!r}.")

        # Collects the arguments of every __init__ in the subclass chain, not only these five.
        self.save_hyperparameters()
        self._datasets_built = False
        self._training_passes: dict[str, TrainingPass] = {}
        self._training_passes_to_load: dict[str, dict] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes shared by source and target."""
        raise NotImplementedError(f"{type(self).__name__} must define the num_classes property.")

    def _build_datasets(self) -> None:
        """Set `self.source_train`, `self.target_train`, ..., one attribute per `DATASET_NAMES`."""
        raise NotImplementedError(f"{type(self).__name__} must implement _build_datasets().")

    def _domain_num_classes(self) -> dict[str, int]:
        """Return the number of classes found in the data of each domain: `{"source": n, "target": m}`."""
        raise NotImplementedError(f"{type(self).__name__} must implement _domain_num_classes().")

    def setup(self, stage: str | None = None) -> None:
        """Build all six datasets on the first call and validate them; later calls do nothing."""
        if self._datasets_built:
            return
        self._build_datasets()
        self._validate_datasets()
        self._datasets_built = True

    def _validate_datasets(self) -> None:
        for name in DATASET_NAMES:
            dataset = getattr(self, name, None)
            if dataset is None:
                raise RuntimeError(f"{type(self).__name__}._build_datasets() did not set {name}.")
            if len(dataset) == 0:
                raise ValueError(
                    f"{name} is empty: {type(self).__name__} found no samples for it; "
                    "check the data root, the splits and the split fractions."
                )

        batch_size = self.hparams.batch_size
        for name in ("source_train", "target_train"):
            size = len(getattr(self, name))
            if self.hparams.drop_last and batch_size > size:
                raise ValueError(
                    f"{name} has {size} samples, fewer than batch_size={batch_size}, so drop_last=True "
                    "leaves no training batch; lower batch_size or set drop_last=False."
                )

        self._check_sample_shapes()
        found = self._domain_num_classes()
        expected = {domain: self.num_classes for domain in self.eval_domains}
        if found != expected:
            raise ValueError(
                f"Number of classes per domain {found} does not match num_classes={self.num_classes}; "
                "source and target must use the same label set 0..num_classes-1."
            )

    def _check_sample_shapes(self) -> None:
        # Catches grey images in one domain and colour images in the other before a network does.
        samples = {name: getattr(self, name)[0][0] for name in DATASET_NAMES}
        shapes = {name: tuple(sample.shape) for name, sample in samples.items() if isinstance(sample, torch.Tensor)}
        if len(set(shapes.values())) > 1:
            raise ValueError(
                f"Samples differ in shape between datasets: {shapes}. Source and target inputs must have "
                "the same shape, e.g. convert grey images to 3 channels (or colour images to 1) and "
                "resize both domains to one size in the datamodule."
            )

    def _dataloader_options(self, batch_size: int, drop_last: bool) -> dict:
        num_workers = self.hparams.num_workers
        return dict(
            batch_size=batch_size,
            drop_last=drop_last,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )

    def train_dataloader(self) -> CombinedLoader:
        """Return a CombinedLoader of `{"source": (x_s, y_s), "target": x_t}` batches."""
        options = self._dataloader_options(self.hparams.batch_size, self.hparams.drop_last)
        datasets = {"source": self.source_train, "target": UnlabeledDataset(self.target_train)}
        loaders = {}
        for domain, dataset in datasets.items():
            seed = int(torch.randint(2**62, ()).item())
            training_pass = TrainingPass(torch.Generator().manual_seed(seed))
            if domain in self._training_passes_to_load:
                training_pass.load_state_dict(self._training_passes_to_load.pop(domain))
            self._training_passes[domain] = training_pass
            loaders[domain] = ResumableDataLoader(dataset, training_pass=training_pass, shuffle=True, **options)
        return CombinedLoader(loaders, mode=self.hparams.train_mode)

    def _eval_dataloaders(self, split: str) -> list[DataLoader]:
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        options = self._dataloader_options(batch_size, drop_last=False)
        return [
            DataLoader(getattr(self, f"{domain}_{split}"), generator=torch.Generator().manual_seed(0), **options)
            for domain in self.eval_domains
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """Return labeled `[source, target]` validation loaders."""
        return self._eval_dataloaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """Return labeled `[source, target]` test loaders."""
        return self._eval_dataloaders("test")

    def state_dict(self) -> dict:
        """Return the position of each training loader, saved in checkpoints by the Trainer."""
        if not self._training_passes:
            return {}
        # After the last batch of an epoch the resumed run starts the next epoch, so each loader
        # starts a new pass from its current generator state instead of finishing the old one.
        trainer = self.trainer
        epoch_finished = trainer is not None and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return {
            "training_passes": {
                domain: training_pass.state_dict(pass_finished=epoch_finished)
                for domain, training_pass in self._training_passes.items()
            }
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep the saved loader positions until `train_dataloader` builds the loaders."""
        self._training_passes_to_load = dict(state_dict.get("training_passes", {}))


def stratified_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    fractions: Sequence[float],
    seed: int,
) -> list[np.ndarray]:
    """Split sample indices into disjoint parts with the class proportions of `labels`.

    Args:
        labels: Class label of each sample.
        fractions: Fraction of the samples in each part after the first; the first part gets
            the rest. Their sum must be below 1.
        seed: Seed of the shuffle, so the same seed always gives the same parts.

    Returns:
        One array of indices per part, `len(fractions) + 1` arrays in all.
    """
    labels = np.asarray(labels)
    if any(fraction <= 0 for fraction in fractions) or sum(fractions) >= 1:
        raise ValueError(f"Split fractions must be positive and sum to less than 1, got {list(fractions)}.")

    rest = np.arange(len(labels))
    parts = []
    remaining_fraction = 1.0
    for fraction in fractions:
        # Each part is a fraction of the whole, so rescale it to the samples still unassigned.
        rest, part = train_test_split(
            rest,
            test_size=fraction / remaining_fraction,
            random_state=seed,
            stratify=labels[rest],
        )
        parts.append(np.sort(part))
        remaining_fraction -= fraction
    return [np.sort(rest), *parts]

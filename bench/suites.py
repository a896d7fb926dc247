"""Benchmark suites: which configs run on which source -> target pairs, and the published numbers to show."""

from dataclasses import dataclass, field
from itertools import permutations

from datamodules.amazon import DOMAINS as AMAZON_DOMAINS

ORACLE = "oracle"
ORACLE_LABEL = "oracle (target labels)"


@dataclass(frozen=True)
class Method:
    """One algorithm of a suite.

    Args:
        name: key on the command line and in the JSON, e.g. ``"dann"``.
        label: row label in the tables.
        config: YAML config, relative to the project root, that ``train.py fit --config`` accepts.
    """

    name: str
    label: str
    config: str


@dataclass(frozen=True)
class Reference:
    """Published target accuracies (percent) of one method, shown as a row under our own numbers.

    Args:
        label: row label, naming the paper and the table.
        method: name of the suite method that the row is compared with.
        accuracy: target accuracy in percent per ``(source, target)`` pair.
    """

    label: str
    method: str
    accuracy: dict[tuple[str, str], float]


@dataclass(frozen=True)
class Suite:
    """A list of methods run on a list of domain pairs.

    Args:
        name: suite name on the command line; also the default name of the result files.
        methods: algorithms, in table order; the source-only baseline comes first.
        oracle_config: config of the oracle row: it is trained like the source-only baseline,
            with the target's labeled training split as its labeled stream.
        pairs: ordered ``(source, target)`` domain pairs.
        data_subdir: folder under ``--data-root`` passed as ``data.init_args.root``; ``None`` for
            datamodules that take no root.
        abbreviations: short domain names for the table header.
        reference: published numbers to print under our own, if any.
        pass_domains: pass each pair as ``data.init_args.source`` and ``data.init_args.target``;
            ``False`` for datamodules with one fixed pair.
    """

    name: str
    methods: tuple[Method, ...]
    oracle_config: str
    pairs: tuple[tuple[str, str], ...]
    data_subdir: str | None
    abbreviations: dict[str, str] = field(default_factory=dict)
    reference: Reference | None = None
    pass_domains: bool = True

    def method(self, name: str) -> Method:
        """Return the method called ``name``, raising a ValueError that lists the choices."""
        for method in self.methods:
            if method.name == name:
                return method
        raise ValueError(
            f"suite {self.name!r} has no method {name!r}; choose from {[m.name for m in self.methods]}"
        )

    def pair_label(self, source: str, target: str) -> str:
        """Return the column label of a pair, e.g. ``"B→D"``."""
        return f"{self.abbreviations.get(source, source)}→{self.abbreviations.get(target, target)}"


AMAZON_ABBREVIATIONS = {domain: domain[0].upper() for domain in AMAZON_DOMAINS}

# Target test accuracy (percent) of DANN in the shallow sentiment experiments of Ganin et al.,
# "Domain-Adversarial Training of Neural Networks", JMLR 2016, Table 1.
GANIN_2016_AMAZON_DANN = {
    ("books", "dvd"): 78.4,
    ("books", "electronics"): 73.3,
    ("books", "kitchen"): 77.9,
    ("dvd", "books"): 72.3,
    ("dvd", "electronics"): 75.4,
    ("dvd", "kitchen"): 78.3,
    ("electronics", "books"): 71.3,
    ("electronics", "dvd"): 73.8,
    ("electronics", "kitchen"): 85.4,
    ("kitchen", "books"): 70.9,
    ("kitchen", "dvd"): 74.0,
    ("kitchen", "electronics"): 84.3,
}

SUITES = {
    "amazon": Suite(
        name="amazon",
        methods=(
            Method("source_only", "source only", "configs/source_only_amazon.yaml"),
            Method("dann", "DANN", "configs/dann_amazon.yaml"),
        ),
        oracle_config="configs/source_only_amazon.yaml",
        pairs=tuple(permutations(AMAZON_DOMAINS, 2)),
        data_subdir="amazon_reviews",
        abbreviations=AMAZON_ABBREVIATIONS,
        reference=Reference("DANN, Ganin et al. (JMLR 2016), Table 1", "dann", GANIN_2016_AMAZON_DANN),
    ),
    "digits": Suite(
        name="digits",
        methods=(
            Method("source_only", "source only", "configs/source_only_mnist_usps.yaml"),
            Method("dann", "DANN", "configs/dann_mnist_usps.yaml"),
            Method("importance_weighting", "importance weighting", "configs/importance_weighting_mnist_usps.yaml"),
            Method("pixelda", "PixelDA", "configs/pixelda_mnist_usps.yaml"),
        ),
        oracle_config="configs/source_only_mnist_usps.yaml",
        pairs=(("mnist", "usps"),),
        data_subdir="",
        abbreviations={"mnist": "MNIST", "usps": "USPS"},
    ),
    # Offline pair shipped in pip packages: fast enough for smoke tests of the runner.
    "bundled": Suite(
        name="bundled",
        methods=(
            Method("source_only", "source only", "configs/source_only_bundled_digits.yaml"),
            Method("dann", "DANN", "configs/dann_bundled_digits.yaml"),
            Method(
                "importance_weighting",
                "importance weighting",
                "configs/importance_weighting_bundled_digits.yaml",
            ),
            Method("pixelda", "PixelDA", "configs/pixelda_bundled_digits.yaml"),
        ),
        oracle_config="configs/source_only_bundled_digits.yaml",
        pairs=(("mnist", "digits"),),
        data_subdir=None,
        abbreviations={"mnist": "MNIST sample", "digits": "UCI digits"},
        pass_domains=False,
    ),
}

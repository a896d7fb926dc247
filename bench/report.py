"""Summaries of benchmark runs: mean and spread over seeds, checkpoint selection, and the markdown table."""

import math
import statistics
from collections import defaultdict

from scipy.stats import spearmanr

from bench.suites import ORACLE, ORACLE_LABEL, Suite
from lightning_uda.validators import monitor_mode

TARGET_LABEL_CRITERIA = {"val/target_acc"}
# Source field of the oracle's summary key: the oracle trains on target labels only, so one
# run per target and seed serves every pair with that target.
ANY_SOURCE = "*"


def accuracy_summary(values: list[float]) -> dict:
    """Return mean, sample standard deviation (n - 1; 0 for one value), count and values of accuracies."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def summary_key(method: str, source: str, target: str) -> str:
    """Return the summary key of a method and pair; the oracle's omits the source, which it does not train on."""
    return f"{method}|{ANY_SOURCE if method == ORACLE else source}|{target}"


def group_runs(runs: list[dict]) -> dict[str, list[dict]]:
    """Group run records by :func:`summary_key`, each group sorted by seed."""
    groups = defaultdict(list)
    for run in runs:
        groups[summary_key(run["method"], run["source"], run["target"])].append(run)
    return {key: sorted(group, key=lambda run: run["seed"]) for key, group in groups.items()}


def criterion_direction(name: str) -> str | None:
    """Return ``"max"`` or ``"min"`` for a logged ``val/*`` score, or ``None`` if its direction is unknown."""
    try:
        return monitor_mode(name)
    except ValueError:
        return None


def select_checkpoint(checkpoints: list[dict], criterion: str, mode: str) -> dict | None:
    """Return the checkpoint with the best ``criterion`` (earliest on ties), or ``None`` if none logged it."""
    scored = [checkpoint for checkpoint in checkpoints if _is_number(checkpoint.get(criterion))]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda checkpoint: sign * checkpoint[criterion])


def oriented_spearman(checkpoints: list[dict], criterion: str, mode: str) -> float | None:
    """Return Spearman's rho between a criterion and target test accuracy over ``checkpoints``.

    The criterion is negated when lower is better, so +1 means that the criterion ranks the
    checkpoints exactly as target accuracy does. ``None`` with fewer than 3 checkpoints or a
    constant input, where rho is undefined.
    """
    pairs = [(c[criterion], c["target_test_acc"]) for c in checkpoints if _is_number(c.get(criterion))]
    if len(pairs) < 3:
        return None
    scores, accuracies = zip(*pairs)
    if len(set(scores)) < 2 or len(set(accuracies)) < 2:
        return None
    sign = 1.0 if mode == "max" else -1.0
    rho = spearmanr([sign * score for score in scores], accuracies).statistic
    return float(rho)


def checkpoint_selection(group: list[dict]) -> dict:
    """Compare checkpoint-selection criteria on the runs (seeds) of one method and pair.

    For each ``val/*`` score with a known direction: the target test accuracy of the
    checkpoint it picks in each run, and its Spearman rho with target test accuracy over the
    checkpoints of all runs pooled. ``"last"`` is the final validation and ``"best"`` the
    checkpoint with the highest target test accuracy, which only target labels can find.
    """
    runs = [run for run in group if run["checkpoints"]]
    if not runs:
        return {}
    criteria = sorted({name for run in runs for c in run["checkpoints"] for name in c if name.startswith("val/")})
    pooled = [checkpoint for run in runs for checkpoint in run["checkpoints"]]
    selection = {
        "last": {"picked_acc": [run["checkpoints"][-1]["target_test_acc"] for run in runs]},
        "best": {"picked_acc": [max(c["target_test_acc"] for c in run["checkpoints"]) for run in runs]},
    }
    for criterion in criteria:
        mode = criterion_direction(criterion)
        if mode is None:
            continue
        picked = [select_checkpoint(run["checkpoints"], criterion, mode) for run in runs]
        selection[criterion] = {
            "mode": mode,
            "picked_acc": [checkpoint["target_test_acc"] for checkpoint in picked if checkpoint is not None],
            "spearman": oriented_spearman(pooled, criterion, mode),
        }
    return selection


def summarize(suite: Suite, runs: list[dict]) -> dict:
    """Summarize runs per ``method|source|target``: final target accuracy over seeds and checkpoint selection."""
    summary = {}
    for key, group in group_runs(runs).items():
        method, source, target = key.split("|")
        summary[key] = {
            "method": method,
            "source": source,
            "target": target,
            "seeds": [run["seed"] for run in group],
            "target_acc": accuracy_summary([run["test"]["test/target_acc"] for run in group]),
            "checkpoint_selection": checkpoint_selection(group),
        }
    return summary


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _percent(summary: dict | None) -> str:
    if summary is None:
        return "–"
    if summary["n"] == 1:
        return f"{100 * summary['mean']:.1f}"
    return f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"


def _row_labels(suite: Suite, methods: list[str]) -> list[tuple[str, str]]:
    labels = [(name, suite.method(name).label) for name in methods if name != ORACLE]
    if ORACLE in methods:
        labels.append((ORACLE, ORACLE_LABEL))
    return labels


def accuracy_table(suite: Suite, methods: list[str], pairs: list[tuple[str, str]], summary: dict) -> list[str]:
    """Return the lines of the main table: one row per method, one column per pair, plus the mean over pairs."""
    header = ["method", *(suite.pair_label(*pair) for pair in pairs)]
    if len(pairs) > 1:
        header.append("mean")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    for name, label in _row_labels(suite, methods):
        cells = [summary.get(summary_key(name, *pair), {}).get("target_acc") for pair in pairs]
        row = [label, *(_percent(cell) for cell in cells)]
        if len(pairs) > 1:
            complete = all(cell is not None for cell in cells)
            row.append(f"{100 * statistics.fmean(c['mean'] for c in cells):.1f}" if complete else "–")
        lines.append("| " + " | ".join(row) + " |")

        reference = suite.reference
        if reference is not None and reference.method == name:
            published = [reference.accuracy.get(pair) for pair in pairs]
            row = [reference.label, *("–" if value is None else f"{value:.1f}" for value in published)]
            if len(pairs) > 1:
                row.append("–" if None in published else f"{statistics.fmean(published):.1f}")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def reference_comparison(suite: Suite, pairs: list[tuple[str, str]], summary: dict) -> str | None:
    """Return a sentence counting the pairs where our mean reaches the published number, or ``None``."""
    reference = suite.reference
    if reference is None:
        return None
    compared = at_or_above = 0
    for pair in pairs:
        ours = summary.get(f"{reference.method}|{pair[0]}|{pair[1]}")
        if ours is None or pair not in reference.accuracy:
            continue
        compared += 1
        # Compare at the published precision, one decimal of a percent.
        at_or_above += round(100 * ours["target_acc"]["mean"], 1) >= reference.accuracy[pair]
    if compared == 0:
        return None
    label = suite.method(reference.method).label
    return (
        f"{label} (mean over seeds, rounded to 0.1) is at or above the published number "
        f"({reference.label}) on {at_or_above} of {compared} pairs."
    )


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def _criterion_label(criterion: str, mode: str | None) -> str:
    if criterion == "last":
        return "last (default)"
    if criterion == "best":
        return "best checkpoint (target test labels, oracle)"
    if criterion in TARGET_LABEL_CRITERIA:
        return f"{criterion} (target val labels, oracle)"
    return f"{criterion} ({mode})"


def _selection_row(label: str, criterion: str, selections: list[dict]) -> str:
    entries = [selection[criterion] for selection in selections if criterion in selection]
    picked = [statistics.fmean(entry["picked_acc"]) for entry in entries if entry["picked_acc"]]
    accuracy = f"{100 * statistics.fmean(picked):.1f}" if picked else "–"
    rho = _mean_or_none([entry.get("spearman") for entry in entries])
    correlation = "–" if rho is None else f"{rho:+.2f}"
    mode = entries[0].get("mode") if entries else None
    return f"| {label} | {_criterion_label(criterion, mode)} | {accuracy} | {correlation} |"


def selection_table(suite: Suite, methods: list[str], pairs: list[tuple[str, str]], summary: dict) -> list[str]:
    """Return the lines of the checkpoint-selection table, averaged over seeds and pairs."""
    lines = [
        "| method | criterion | target acc. of picked checkpoint | Spearman ρ with target acc. |",
        "|---|---|---|---|",
    ]
    for name, label in _row_labels(suite, methods):
        groups = [summary.get(summary_key(name, *pair)) for pair in pairs]
        selections = [group["checkpoint_selection"] for group in groups if group and group["checkpoint_selection"]]
        if not selections:
            continue
        scores = sorted({criterion for selection in selections for criterion in selection} - {"last", "best"})
        for criterion in ["last", *scores, "best"]:
            lines.append(_selection_row(label, criterion, selections))
    return lines


def render_markdown(
    suite: Suite,
    methods: list[str],
    pairs: list[tuple[str, str]],
    seeds: list[int],
    summary: dict,
    command: str,
    environment: dict,
) -> str:
    """Return the markdown page of a suite: command, setup, accuracy table and checkpoint selection."""
    seed_list = ", ".join(str(seed) for seed in seeds)
    lines = [
        f"# Benchmark: {suite.name}",
        "",
        "Produced from the project root by:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Commit {environment['commit']}{' with uncommitted changes' if environment['dirty'] else ''}, "
        f"torch {environment['torch']}, lightning {environment['lightning']}, "
        f"torch threads: {environment['torch_threads']}, written {environment['written_utc']} UTC.",
        "",
        "Target test accuracy (%) of the weights at the end of training (last epoch: no checkpoint is "
        f"selected), mean ± sample standard deviation over seeds {seed_list}. Each run is "
        "`python train.py fit` with the method's config, the pair and the seed. The "
        f"{ORACLE_LABEL} row trains the source-only config on the target's labeled training split.",
        "",
        *accuracy_table(suite, methods, pairs, summary),
    ]
    comparison = reference_comparison(suite, pairs, summary)
    if comparison:
        lines += ["", comparison]
    lines += [
        "",
        "## Checkpoint selection",
        "",
        "Each run is validated every `val_check_interval` batches of its config. At each validation "
        "the runner stores the logged `val/*` scores and, for this report only, the target test "
        "accuracy. A criterion picks the checkpoint with its best score (earliest on ties); the "
        "table gives the target test accuracy of that checkpoint, mean over seeds and pairs. "
        "Spearman ρ is computed over the checkpoints of all seeds of a pair (mean over pairs), "
        "with the score negated when lower is better, so +1 means the criterion ranks checkpoints "
        "as target accuracy does. Rows marked oracle use target labels.",
        "",
        *selection_table(suite, methods, pairs, summary),
        "",
    ]
    return "\n".join(lines)

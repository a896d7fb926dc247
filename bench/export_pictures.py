"""Export the diagnostics figures and the main training curves of one run as PNG files.

Run from the project root, after a fit with ``configs/diagnostics.yaml``::

    python bench/export_pictures.py RUN_DIR OUT_DIR

``RUN_DIR`` is the TensorBoard logger's version directory (e.g.
``lightning_logs/dann_bundled_digits/version_0``), whose event files the script reads. It
writes to ``OUT_DIR``:

- ``tsne.png`` and ``target_confusion_matrix.png``: the last ``diagnostics/tsne`` and
  ``diagnostics/target_confusion_matrix`` images that ``AdaptationDiagnostics`` logged,
  as the PNG bytes stored in the event file.
- ``training_curves.png``: the losses, domain accuracy, gradient-reversal coefficient,
  validation accuracies and ``val/im`` against the step, with the proxy A-distance at fit
  start and end in the title.

It prints the last value of every scalar it plots and of ``test/target_acc``, and the proxy
A-distances. A panel whose scalars are all missing from the run (e.g. ``train/loss_domain``
of a source-only run) is left out with a message.
"""

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

IMAGE_FILES = {
    "diagnostics/tsne": "tsne.png",
    "diagnostics/target_confusion_matrix": "target_confusion_matrix.png",
}
CURVES_FILE = "training_curves.png"
# (panel title, y-axis label, scalar tags drawn in the panel)
PANELS = (
    ("Task loss on source batches", "cross-entropy", ("train/loss_task",)),
    ("Domain discriminator loss", "binary cross-entropy", ("train/loss_domain",)),
    ("Domain discriminator accuracy", "accuracy", ("train/domain_acc",)),
    ("Gradient reversal coefficient", "coefficient", ("train/grl_coeff",)),
    ("Validation accuracy", "accuracy", ("val/source_acc", "val/target_acc")),
    ("Information maximization on target (higher is better)", "nats", ("val/im",)),
)
PROXY_A_DISTANCE_TAGS = ("diagnostics/proxy_a_distance_start", "diagnostics/proxy_a_distance_end")
PRINTED_TAGS = ("test/target_acc", "test/source_acc")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="TensorBoard version directory with the event files")
    parser.add_argument("out_dir", type=Path, help="directory for the PNG files, created if missing")
    return parser.parse_args()


def load_events(run_dir: Path) -> EventAccumulator:
    """Read every scalar and image of the event files in ``run_dir``."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    if not any(run_dir.glob("events.out.tfevents.*")):
        nested = sorted({str(path.parent) for path in run_dir.rglob("events.out.tfevents.*")})
        hint = f". Event files were found in {nested}, so pass one of those" if nested else ""
        raise FileNotFoundError(f"no TensorBoard event file (events.out.tfevents.*) in {run_dir}{hint}")
    # size_guidance 0 keeps every event, because by default the accumulator keeps only a sample of them.
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def export_images(events: EventAccumulator, out_dir: Path) -> list[Path]:
    """Write the last image of each diagnostics tag to ``out_dir`` and return the paths."""
    available = events.Tags()["images"]
    missing = [tag for tag in IMAGE_FILES if tag not in available]
    if missing:
        raise ValueError(
            f"the run has no image {missing}, only {sorted(available)}. Train with configs/diagnostics.yaml "
            "and a TensorBoardLogger, so that AdaptationDiagnostics logs them"
        )
    paths = []
    for tag, file_name in IMAGE_FILES.items():
        path = out_dir / file_name
        path.write_bytes(events.Images(tag)[-1].encoded_image_string)
        paths.append(path)
    return paths


def last_scalar(events: EventAccumulator, tag: str) -> float | None:
    """Return the last logged value of ``tag``, or None if the run did not log it."""
    if tag not in events.Tags()["scalars"]:
        return None
    return events.Scalars(tag)[-1].value


def proxy_a_distance_title(events: EventAccumulator) -> str:
    start, end = (last_scalar(events, tag) for tag in PROXY_A_DISTANCE_TAGS)
    if start is None or end is None:
        return "Training curves"
    return (
        f"Training curves. Proxy A-distance between source and target: {start:.2f} at fit start, "
        f"{end:.2f} at the end"
    )


def export_curves(events: EventAccumulator, out_dir: Path) -> Path:
    """Plot the scalars of each of :data:`PANELS` against the step and return the PNG path."""
    available = set(events.Tags()["scalars"])
    panels = [panel for panel in PANELS if any(tag in available for tag in panel[2])]
    for title, _, tags in PANELS:
        if not any(tag in available for tag in tags):
            print(f"left out panel {title!r}: the run logged none of {list(tags)}")
    if not panels:
        raise ValueError(f"the run logged none of the plotted scalars, only {sorted(available)}")

    columns = 3
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows + 0.6))
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    for axes, (title, y_label, tags) in zip(axes_grid.flat, panels):
        for tag in tags:
            if tag in available:
                scalars = events.Scalars(tag)
                # Markers show the few validation points, which a line alone would hide.
                axes.plot([s.step for s in scalars], [s.value for s in scalars], marker=".", label=tag)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step")
        axes.set_ylabel(y_label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="best")
    for axes in list(axes_grid.flat)[len(panels) :]:
        axes.set_visible(False)
    figure.suptitle(proxy_a_distance_title(events))
    figure.tight_layout()

    path = out_dir / CURVES_FILE
    figure.savefig(path, dpi=100)
    return path


def print_summary(events: EventAccumulator) -> None:
    tags = [tag for _, _, panel_tags in PANELS for tag in panel_tags]
    for tag in (*tags, *PRINTED_TAGS, *PROXY_A_DISTANCE_TAGS):
        value = last_scalar(events, tag)
        if value is not None:
            print(f"{tag}: {value:.4f} (last value)")


def main() -> int:
    arguments = parse_arguments()
    events = load_events(arguments.run_dir)
    arguments.out_dir.mkdir(parents=True, exist_ok=True)

    paths = export_images(events, arguments.out_dir)
    paths.append(export_curves(events, arguments.out_dir))

    print_summary(events)
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

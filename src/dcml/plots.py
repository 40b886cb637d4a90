"""Figures: where a picture says more than a table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcml.atomic_files import write_atomically


def plot_recall_curves(curves: dict[str, np.ndarray], path: Path, *, title: str = "Recall@K") -> None:
    """Recall@K against K (log scale) for each named curve (element K-1 = Recall@K); PNG or PDF."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for name, curve in curves.items():
        ks = np.arange(1, len(curve) + 1)
        axes.plot(ks, 100 * curve, label=f"{name} (R@1 {100 * curve[0]:.1f})")
    axes.set_xscale("log")
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K (%)")
    axes.set_ylim(0, 100)
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    write_atomically({Path(path): lambda stream: figure.savefig(stream, format=suffix)})
    plt.close(figure)


def plot_training_curves(histories: dict[str, list[dict]], path: Path, *, metric: str, reference: float | None = None,
                         reference_label: str = "zero-shot") -> None:
    """Validation score per epoch for each named run (from the trainer's per-epoch records).

    Epochs where a run switched phase (divide -> conquer -> finetune) are marked on its curve;
    ``reference`` draws a horizontal line (e.g. the zero-shot score).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for name, records in histories.items():
        scored = [r for r in records if "score" in r]
        epochs = [r["epoch"] + 1 for r in scored]
        (line,) = axes.plot(epochs, [100 * r["score"] for r in scored], marker=".", label=name)
        for previous, record in zip(scored, scored[1:]):
            # With one learner, divide and conquer train the same thing: no switch worth marking.
            if record["phase"] != previous["phase"] and record.get("learners", 2) > 1:
                axes.axvline(record["epoch"] + 0.5, color=line.get_color(), linestyle=":", alpha=0.6)
                axes.annotate(record["phase"], (record["epoch"] + 0.6, 100 * record["score"]), fontsize=7, color=line.get_color())
    if reference is not None:
        axes.axhline(100 * reference, color="grey", linestyle="--", label=f"{reference_label} ({100 * reference:.1f})")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"validation {metric} (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    write_atomically({Path(path): lambda stream: figure.savefig(stream, format=suffix)})
    plt.close(figure)

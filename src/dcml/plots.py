"""Figures: where a picture says more than a table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcml.io import write_atomically


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

"""Distance thresholds for "same class or not", as pure functions on arrays.

From a labelled set of embeddings, every pair (i < j) is a trial: a match when the labels agree.
A threshold t accepts the pairs with distance <= t. ``precision(t)`` is the share of accepted pairs
that match; ``FMR(t)`` the share of non-matching pairs accepted (false match rate) and ``FNMR(t)``
the share of matching pairs rejected. Thresholds are only ever placed at an observed distance
after its last tie, so a threshold never splits pairs that have the same distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcml.errors import UserError

DEFAULT_PRECISIONS = (0.9, 0.95, 0.99)
DEFAULT_FMRS = (1e-1, 1e-2, 1e-3, 1e-4)
#: Above this many pairs, images are subsampled (pairs grow quadratically).
MAX_PAIRS = 20_000_000


@dataclass(frozen=True)
class Operating:
    """The cumulative counts at every candidate threshold (distinct distances, ascending)."""

    thresholds: np.ndarray  # float64
    true_accepts: np.ndarray  # matching pairs with distance <= threshold
    false_accepts: np.ndarray  # non-matching pairs with distance <= threshold
    positives: int
    negatives: int

    @property
    def precision(self) -> np.ndarray:
        return self.true_accepts / np.maximum(self.true_accepts + self.false_accepts, 1)

    @property
    def recall(self) -> np.ndarray:
        return self.true_accepts / max(self.positives, 1)

    @property
    def fmr(self) -> np.ndarray:
        return self.false_accepts / max(self.negatives, 1)


def pair_distances(embeddings: np.ndarray, labels: np.ndarray, *, max_pairs: int = MAX_PAIRS,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(Euclidean distances, same-label flags) of every pair i < j of L2-normalised embeddings.

    Computed in float64 from the float32 vectors, as evaluation compares distances. Above
    ``max_pairs`` pairs a seeded random subset of the images is used."""
    from dcml.model_runner import l2_normalize

    x = l2_normalize(embeddings).astype(np.float64)
    labels = np.asarray(labels)
    if len(x) != len(labels):
        raise UserError(f"{len(x)} embeddings but {len(labels)} labels")
    if len(x) < 2:
        raise UserError("calibration needs at least two labelled images")
    limit = int((1 + np.sqrt(1 + 8 * max_pairs)) / 2)
    if len(x) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))
        x, labels = x[keep], labels[keep]
    rows, cols = np.triu_indices(len(x), k=1)
    squared = np.empty(len(rows), np.float64)
    for start in range(0, len(rows), 1 << 20):  # bounded memory for the gathered rows
        r, c = rows[start : start + (1 << 20)], cols[start : start + (1 << 20)]
        squared[start : start + len(r)] = ((x[r] - x[c]) ** 2).sum(axis=1)
    return np.sqrt(squared), labels[rows] == labels[cols]


def operating_points(distances: np.ndarray, matches: np.ndarray) -> Operating:
    """Cumulative accept counts at each distinct distance (the only places a threshold changes anything)."""
    distances = np.asarray(distances, dtype=np.float64)
    matches = np.asarray(matches, dtype=bool)
    if distances.shape != matches.shape or distances.ndim != 1:
        raise UserError(f"distances {distances.shape} and match flags {matches.shape} must be equal-length vectors")
    if not matches.any():
        raise UserError("calibration needs at least one matching pair (two images of one class)")
    if matches.all():
        raise UserError("calibration needs at least one non-matching pair (two classes)")
    order = np.argsort(distances, kind="stable")
    d, m = distances[order], matches[order]
    true_accepts, false_accepts = np.cumsum(m), np.cumsum(~m)
    last_of_tie = np.r_[d[1:] != d[:-1], True]
    return Operating(d[last_of_tie], true_accepts[last_of_tie], false_accepts[last_of_tie], int(m.sum()), int((~m).sum()))


def _point(op: Operating, i: int | None, **extra) -> dict | None:
    if i is None:
        return None
    return {"distance": float(op.thresholds[i]), "precision": float(op.precision[i]), "recall": float(op.recall[i]),
            "fmr": float(op.fmr[i]), "fnmr": float(1 - op.recall[i]), **extra}


def threshold_for_precision(op: Operating, target: float) -> dict | None:
    """The largest threshold whose precision is at least ``target`` (most matches kept); None if none reaches it."""
    reach = np.flatnonzero(op.precision >= target)
    return _point(op, int(reach[-1]) if len(reach) else None, target=float(target))


def f1_optimal_threshold(op: Operating) -> dict:
    precision, recall = op.precision, op.recall
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1))  # first maximum: the smallest threshold reaching the best F1
    return _point(op, best, f1=float(f1[best]))


def fnmr_at_fmr(op: Operating, fmr_targets=DEFAULT_FMRS) -> list[dict]:
    """Per target FMR: the largest threshold with FMR <= target and its FNMR (all rejected below the first pair)."""
    rows = []
    for target in fmr_targets:
        allowed = np.flatnonzero(op.fmr <= target)
        if len(allowed):
            i = int(allowed[-1])
            rows.append({"fmr_target": float(target), "distance": float(op.thresholds[i]), "fmr": float(op.fmr[i]),
                         "fnmr": float(1 - op.recall[i])})
        else:
            rows.append({"fmr_target": float(target), "distance": None, "fmr": 0.0, "fnmr": 1.0})
    return rows


def precision_recall_curve(op: Operating) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at every operating point, ascending threshold."""
    return op.precision, op.recall, op.thresholds


def calibrate(embeddings: np.ndarray, labels: np.ndarray, precisions=DEFAULT_PRECISIONS, fmrs=DEFAULT_FMRS,
              *, max_pairs: int = MAX_PAIRS, seed: int = 0) -> tuple[dict, Operating]:
    """(report, operating points): thresholds (precision@p, f1), the FNMR@FMR table and pair counts
    as a JSON-ready dict, and the curve it came from."""
    distances, matches = pair_distances(embeddings, labels, max_pairs=max_pairs, seed=seed)
    op = operating_points(distances, matches)
    thresholds = {f"precision@{p:g}": threshold_for_precision(op, p) for p in precisions}
    thresholds["f1"] = f1_optimal_threshold(op)
    return {"distance": "euclidean", "pairs": int(len(distances)), "matching_pairs": op.positives,
            "non_matching_pairs": op.negatives, "thresholds": thresholds, "fnmr_at_fmr": fnmr_at_fmr(op, fmrs)}, op


def resolve_threshold(spec: str | float | None, calibration: dict | None) -> tuple[str, float] | None:
    """``0.8`` (a distance), ``precision@0.95`` or ``f1`` (from a calibration) -> (name, distance)."""
    if spec is None:
        return None
    try:
        value = float(spec)
    except (TypeError, ValueError):
        value = None
    if value is not None:
        if not np.isfinite(value) or value < 0:
            raise UserError(f"a distance threshold must be a number >= 0, got {spec!r}")
        return (f"distance {value:g}", value)
    if calibration is None:
        raise UserError(f"threshold {spec!r} needs a calibration: run dcml calibrate --index INDEX first, or give a distance")
    known = calibration.get("thresholds") or {}
    if spec not in known:
        raise UserError(f"the calibration has no threshold {spec!r}; it has: {', '.join(known)} (or give a distance)")
    point = known[spec]
    if not point or point.get("distance") is None:
        raise UserError(f"the calibration data never reached {spec}; choose a lower target or give a distance")
    return (spec, float(point["distance"]))


def plot_precision_recall(op: Operating, out, marks: dict | None = None) -> None:
    """PR curve PNG (matplotlib, Agg), with the chosen thresholds marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcml.atomic_files import write_atomically

    figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
    axes.plot(op.recall, op.precision, lw=1.5)
    for name, point in (marks or {}).items():
        if point:
            axes.plot(point["recall"], point["precision"], "o", ms=5)
            axes.annotate(f"{name} (d={point['distance']:.3f})", (point["recall"], point["precision"]), fontsize=7,
                          xytext=(4, -10), textcoords="offset points")
    axes.set_xlabel("recall (matching pairs accepted)")
    axes.set_ylabel("precision")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title("same class or not, by distance threshold", fontsize=9)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    data = buffer.getvalue()
    write_atomically({out: lambda stream: stream.write(data)})

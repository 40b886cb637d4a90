"""Retrieval and clustering metrics: pure functions on arrays, no model needed.

Definitions
- Recall@K: share of queries with at least one positive among their K nearest references.
- Precision@1, R-Precision, MAP@R: as in Musgrave et al., "A Metric Learning Reality Check" (2020),
  with R = the number of positive references of the query.
- NMI: k-means on the embeddings with as many clusters as classes, normalized mutual information
  with arithmetic averaging.
Queries with no positive reference are excluded from the retrieval metrics and counted in
``num_excluded_queries``. Distances are Euclidean on the vectors as given; a query is never its own
neighbour.
"""

from __future__ import annotations

import numpy as np

from dcml.backends import DEFAULT_KMEANS_ITERATIONS, DEFAULT_KMEANS_SEED, get_backend
from dcml.errors import UserError
from dcml.evaluation.ranks import PositiveRanks, positive_ranks

#: The metric keys every report uses (also the keys of `dcml metrics --json`).
MAP_AT_R = "map@r"
R_PRECISION = "r_precision"
PRECISION_AT_1 = "precision@1"
NMI = "nmi"
NUM_QUERIES = "num_queries"
NUM_EXCLUDED = "num_excluded_queries"


def recall_key(k: int) -> str:
    return f"recall@{k}"


def score_keys(ks: tuple[int, ...], with_nmi: bool) -> tuple[str, ...]:
    """The score keys (higher is better) :func:`evaluate_embeddings` returns for these arguments,
    in its order; the counts ``num_queries`` and ``num_excluded_queries`` come besides them."""
    return (*(recall_key(k) for k in ks), PRECISION_AT_1, R_PRECISION, MAP_AT_R, *((NMI,) if with_nmi else ()))


#: Largest |value| the engines get as given. Outside this window embeddings are rescaled by a power
#: of two, which is exact and scales every distance by the same factor, so ranks and k-means do not
#: change. Above it, squared distances (up to 4 x dims x max^2) could overflow float32: values near
#: 3e38 abort faiss and turn the rank engine's scores into inf. Below it, squared distances fall
#: into float32's subnormal range, where scores lose their precision and the engine's tie tolerance
#: (a multiple of the squared norms) underflows to zero, so near-ties would be misordered.
SAFE_MAGNITUDE = (2.0**-16, 2.0**16)


def _rescaled(embeddings: np.ndarray) -> np.ndarray:
    """``embeddings`` times a power of two that brings the largest |value| into [0.5, 1), if needed."""
    peak = max(embeddings.max(), -embeddings.min())  # in the input's dtype: a longdouble may exceed float64
    magnitude = float(peak)  # inf for such a longdouble, which is rescaled like any large value
    if magnitude == 0.0 or SAFE_MAGNITUDE[0] <= magnitude <= SAFE_MAGNITUDE[1]:
        return embeddings
    return np.ldexp(embeddings, -int(np.frexp(peak)[1]))  # ldexp is exact wherever the result is representable


def _validate(embeddings: np.ndarray, labels: np.ndarray, name: str = "embeddings") -> tuple[np.ndarray, np.ndarray]:
    """The checked arrays as the engines take them: float32 embeddings of a safe magnitude, int64 labels."""
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise UserError(f"{name} must be a 2-D array (rows x dims), got shape {embeddings.shape}")
    if embeddings.shape[1] == 0:
        # Zero-width vectors are all at distance 0: every rank would be a tie (faiss divides by the width).
        raise UserError(f"{name} must have at least one dimension, got shape {embeddings.shape}")
    if len(embeddings) < 2:
        raise UserError(f"{name} need at least 2 rows (a query and a reference), got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise UserError(f"{name} must hold floating-point numbers, got dtype {embeddings.dtype}")
    if labels.ndim != 1 or len(labels) != len(embeddings):
        raise UserError(f"labels must be 1-D with one entry per {name[:-1] if name.endswith('s') else name} row: got shape {labels.shape} for {len(embeddings)} rows")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels must be integers, got dtype {labels.dtype}")
    if not np.isfinite(embeddings).all():
        bad = int(np.flatnonzero(~np.isfinite(embeddings).all(1))[0])
        raise UserError(f"{name} contain NaN or infinite values (first at row {bad})")
    # Rescaled before the float32 cast, so float64 values beyond float32's range survive it.
    return _rescaled(embeddings).astype(np.float32, copy=False), labels.astype(np.int64, copy=False)


def summarize_ranks(ranks: PositiveRanks, ks: tuple[int, ...]) -> dict[str, float | int]:
    """Average the per-query ranks into Recall@K, P@1, R-Precision and MAP@R."""
    kept = ranks.num_positives > 0
    num = int(kept.sum())
    result: dict[str, float | int] = {}
    for k in ks:
        if k > ranks.rank_cap:
            raise ValueError(f"K={k} is above the rank cap {ranks.rank_cap} the ranks were computed with")
        result[recall_key(k)] = float((ranks.first_rank[kept] <= k).mean()) if num else float("nan")
    result[PRECISION_AT_1] = float((ranks.first_rank[kept] == 1).mean()) if num else float("nan")
    result[R_PRECISION] = float(ranks.r_precision[kept].mean()) if num else float("nan")
    result[MAP_AT_R] = float(ranks.average_precision_at_r[kept].mean()) if num else float("nan")
    result[NUM_QUERIES] = num
    result[NUM_EXCLUDED] = int((~kept).sum())
    return result


def retrieval_ranks(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    max_k: int,
    query_mask: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    kernel: str = "auto",
) -> PositiveRanks:
    """Validated input -> per-query positive ranks (exact up to ``max_k``), the source of every metric.

    Without ``query_mask``: leave-one-out, every row queries all other rows. With it (boolean,
    True = query): queries are searched against the non-query rows only. ``groups`` (one int per
    row): references in the query's own group are ignored (the cross-vendor protocol, or the
    same-camera rule of person re-identification).
    """
    embeddings, labels = _validate(embeddings, labels)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape or not np.issubdtype(groups.dtype, np.integer):
            raise UserError(f"groups must be integers with one entry per row: got {groups.dtype} of shape {groups.shape}")
    if query_mask is None:
        num_refs = len(embeddings) - 1
        if max_k > num_refs:
            raise UserError(f"K={max_k} is larger than the reference set ({num_refs} other rows)")
        return positive_ranks(
            embeddings,
            labels,
            embeddings,
            labels,
            query_self_index=np.arange(len(embeddings)),
            query_groups=groups,
            reference_groups=groups,
            rank_cap=max_k,
            kernel=kernel,
        )
    query_mask = np.asarray(query_mask)
    if query_mask.dtype != np.bool_ or query_mask.shape != labels.shape:
        raise UserError(f"query mask must be boolean with one entry per row: got {query_mask.dtype} of shape {query_mask.shape}")
    gallery = ~query_mask
    if not query_mask.any():
        raise UserError("query mask selects no queries")
    if not gallery.any():
        raise UserError("query mask leaves no gallery: every row is a query (False marks the rows to search)")
    if max_k > int(gallery.sum()):
        raise UserError(f"K={max_k} is larger than the reference set ({int(gallery.sum())} non-query rows)")
    return positive_ranks(
        embeddings[query_mask],
        labels[query_mask],
        embeddings[gallery],
        labels[gallery],
        query_groups=None if groups is None else groups[query_mask],
        reference_groups=None if groups is None else groups[gallery],
        rank_cap=max_k,
        kernel=kernel,
    )


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise UserError(f"every K must be a positive integer, got {ks}")
    return ks


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    query_mask: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    kernel: str = "auto",
) -> dict[str, float | int]:
    """Recall@K, Precision@1, R-Precision and MAP@R (protocols as in :func:`retrieval_ranks`)."""
    ks = _check_ks(ks)
    ranks = retrieval_ranks(embeddings, labels, max_k=ks[-1], query_mask=query_mask, groups=groups, kernel=kernel)
    return summarize_ranks(ranks, ks)


def recall_curve(ranks: PositiveRanks) -> np.ndarray:
    """Recall@K for every K = 1..rank_cap at once (element K-1), from the nearest positives' ranks."""
    kept = ranks.first_rank[ranks.num_positives > 0]
    if len(kept) == 0:
        return np.full(ranks.rank_cap, np.nan)
    hits = np.bincount(np.minimum(kept, ranks.rank_cap + 1), minlength=ranks.rank_cap + 2)[1 : ranks.rank_cap + 1]
    return np.cumsum(hits) / len(kept)


def normalized_mutual_information(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI with arithmetic averaging, from the contingency table (no N x N anything)."""
    labels_true = np.asarray(labels_true)
    labels_pred = np.asarray(labels_pred)
    n = len(labels_true)
    _, true_idx = np.unique(labels_true, return_inverse=True)
    _, pred_idx = np.unique(labels_pred, return_inverse=True)
    num_pred = int(pred_idx.max()) + 1
    pairs, joint = np.unique(true_idx.astype(np.int64) * num_pred + pred_idx, return_counts=True)
    true_counts = np.bincount(true_idx)
    pred_counts = np.bincount(pred_idx)

    def entropy(counts: np.ndarray) -> float:
        p = counts[counts > 0] / n
        return float(-(p * np.log(p)).sum())

    h_true, h_pred = entropy(true_counts), entropy(pred_counts)
    if h_true == 0.0 and h_pred == 0.0:
        return 1.0
    joint_p = joint / n
    t, p = np.divmod(pairs, num_pred)
    mutual = float((joint_p * np.log(joint_p * n * n / (true_counts[t] * pred_counts[p]))).sum())
    denominator = (h_true + h_pred) / 2
    return float(np.clip(mutual / denominator, 0.0, 1.0)) if denominator > 0 else 0.0


def nmi(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    backend: str = "auto",
    iterations: int = DEFAULT_KMEANS_ITERATIONS,
    seed: int = DEFAULT_KMEANS_SEED,
) -> float:
    """k-means with as many clusters as classes, scored by NMI against the labels."""
    from dcml.config import MAX_KMEANS_ITERATIONS  # faiss takes the iteration count as a C int

    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or not 1 <= iterations <= MAX_KMEANS_ITERATIONS:
        raise UserError(f"NMI's k-means iterations must be an integer in 1..{MAX_KMEANS_ITERATIONS}, got {iterations!r}")
    embeddings, labels = _validate(embeddings, labels)
    num_classes = int(np.unique(labels).size)
    if num_classes < 2:
        raise UserError("NMI needs at least two classes")
    assignment = get_backend(backend).kmeans(embeddings, num_classes, iterations=iterations, seed=seed).assignment
    return normalized_mutual_information(labels, assignment)


def evaluate_with_ranks(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    query_mask: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    with_nmi: bool = True,
    backend: str = "auto",
    kmeans_iterations: int = DEFAULT_KMEANS_ITERATIONS,
    seed: int = DEFAULT_KMEANS_SEED,
) -> tuple[dict[str, float | int], PositiveRanks]:
    """:func:`evaluate_embeddings`, also returning the ranks it was computed from (for curves)."""
    ks = _check_ks(ks)
    ranks = retrieval_ranks(embeddings, labels, max_k=ks[-1], query_mask=query_mask, groups=groups)
    result = summarize_ranks(ranks, ks)
    if with_nmi:
        result[NMI] = nmi(embeddings, labels, backend=backend, iterations=kmeans_iterations, seed=seed)
    return result, ranks


def evaluate_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    query_mask: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    with_nmi: bool = True,
    backend: str = "auto",
    kmeans_iterations: int = DEFAULT_KMEANS_ITERATIONS,
    seed: int = DEFAULT_KMEANS_SEED,
) -> dict[str, float | int]:
    """The full suite: Recall@K, P@1, R-Precision, MAP@R and (over all rows) NMI."""
    result, _ = evaluate_with_ranks(
        embeddings, labels, ks=ks, query_mask=query_mask, groups=groups, with_nmi=with_nmi,
        backend=backend, kmeans_iterations=kmeans_iterations, seed=seed,
    )
    return result

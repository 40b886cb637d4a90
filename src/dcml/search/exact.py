"""Exact k-nearest-neighbour search that ranks exactly as dcml's evaluation does.

Evaluation (``dcml.evaluation.ranks``) orders references by exact squared Euclidean distance,
computed in float64 from the float32 vectors, ties broken by reference index. faiss' float32
search proposes a few more candidates than asked; they are re-ranked by float64 distance and index,
and the candidate list is widened for any query whose cut-off is within float32 rounding of the
k-th distance, so no reference that belongs in the top k can be missed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Relative float32 rounding allowance for scores of magnitude (|q| + max|r|)^2 (cf. evaluation's TIE_TOLERANCE).
TOLERANCE = 1e-5
_EXTRA_CANDIDATES = 8

#: ``candidates(queries, k) -> (float32 squared distances, int64 ids)``, ascending: e.g. a faiss index's search.
Candidates = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
#: ``rows(ids) -> float32 vectors``: the database vectors of the given ids.
Rows = Callable[[np.ndarray], np.ndarray]


def squared_distances_float64(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Exact squared Euclidean distances of row pairs (``queries[i]`` vs ``vectors[i, j]``), float64."""
    difference = vectors.astype(np.float64) - queries.astype(np.float64)[:, None, :]
    return np.einsum("ijk,ijk->ij", difference, difference)


def rerank_exactly(queries: np.ndarray, candidate_ids: np.ndarray, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Candidates sorted by (float64 squared distance, id); ``-1`` ids (faiss' padding) go last."""
    safe_ids = np.where(candidate_ids < 0, 0, candidate_ids)
    vectors = rows(safe_ids.reshape(-1)).reshape(*candidate_ids.shape, -1)
    distances = squared_distances_float64(queries, vectors)
    distances[candidate_ids < 0] = np.inf
    ids_for_ties = np.where(candidate_ids < 0, np.iinfo(np.int64).max, candidate_ids)
    order = np.lexsort((ids_for_ties, distances), axis=1)
    return np.take_along_axis(distances, order, 1), np.take_along_axis(candidate_ids, order, 1)


def exact_search(queries: np.ndarray, k: int, count: int, candidates: Candidates, rows: Rows,
                 scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of ``count`` database vectors per query, in evaluation's order.

    ``scale`` is the largest database vector norm (bounds float32 rounding). Returns float64
    squared distances and int64 ids, both ``len(queries) x k``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    out_d = np.empty((len(queries), k), np.float64)
    out_i = np.empty((len(queries), k), np.int64)
    pending = np.arange(len(queries))
    width = min(count, k + _EXTRA_CANDIDATES + k // 4)
    while len(pending):
        subset = queries[pending]
        approx_d, ids = candidates(subset, width)
        exact_d, exact_i = rerank_exactly(subset, ids, rows)
        if width >= count:
            settled = np.ones(len(pending), bool)
        else:
            # Settled when the first candidate left out is clearly farther than the k-th kept one.
            kth_float32 = _float32_of(approx_d, ids, exact_i[:, :k]).max(axis=1)
            norms = np.linalg.norm(subset, axis=1)
            tolerance = TOLERANCE * (norms + scale) ** 2
            settled = approx_d[:, -1] > kth_float32 + tolerance
        done = pending[settled]
        out_d[done], out_i[done] = exact_d[settled, :k], exact_i[settled, :k]
        pending = pending[~settled]
        width = min(count, width * 2)
    return out_d, out_i


def _float32_of(approx_d: np.ndarray, ids: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """faiss' own distance of each chosen id (looked up among that row's candidates)."""
    match = ids[:, None, :] == chosen[:, :, None]
    return np.where(match, approx_d[:, None, :], -np.inf).max(axis=2)


def nearest_neighbours(database: np.ndarray, queries: np.ndarray, k: int,
                       exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest database rows of each query, both L2-normalised first, in evaluation's order.

    ``exclude[i]`` (optional): a database id query ``i`` must not return (itself, leave-one-out).
    Returns (int64 ids, float64 Euclidean distances), ``len(queries) x k``.
    """
    import faiss

    from dcml.model_runner import l2_normalize

    database = np.ascontiguousarray(l2_normalize(database))
    queries = np.ascontiguousarray(l2_normalize(queries))
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(database)
    wanted = k + (exclude is not None)
    if wanted > len(database):
        raise ValueError(f"k={k} is above the {len(database) - (exclude is not None)} rows that can be returned")
    squared, ids = exact_search(queries, wanted, len(database), index.search, lambda rows: database[rows], 1.0)
    if exclude is not None:
        keep = ids != np.asarray(exclude)[:, None]
        keep[keep.all(axis=1), -1] = False  # the excluded row was not among them: drop the farthest
        ids = ids[keep].reshape(len(ids), k)
        squared = squared[keep].reshape(len(ids), k)
    return ids, np.sqrt(np.maximum(squared, 0.0))

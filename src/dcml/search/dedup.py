"""Near-duplicate groups: images linked when their embeddings are within a distance threshold.

Pairs within the threshold (Euclidean, L2-normalised, float64 as evaluation computes) are edges;
groups are the connected components, so A~B and B~C put A, B and C together. A pure function on
arrays: the model only matters for how the embeddings were made.
"""

from __future__ import annotations

import numpy as np

from dcml.errors import UserError


def close_pairs(embeddings: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with distance <= ``threshold``."""
    import faiss

    from dcml.model_runner import l2_normalize

    if not np.isfinite(threshold) or threshold < 0:
        raise UserError(f"a duplicate threshold must be a distance >= 0, got {threshold}")
    x = np.ascontiguousarray(l2_normalize(embeddings))
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    # faiss keeps distances strictly below the radius, in float32: widen, then decide in float64.
    radius = float(threshold) ** 2 * (1 + 1e-4) + 1e-6
    limits, _, ids = index.range_search(x, radius)
    rows = np.repeat(np.arange(len(x)), np.diff(limits.astype(np.int64)))
    keep = rows < ids
    rows, cols = rows[keep], ids[keep].astype(np.int64)
    squared = ((x[rows].astype(np.float64) - x[cols].astype(np.float64)) ** 2).sum(axis=1)
    within = squared <= float(threshold) ** 2
    return rows[within], cols[within]


def duplicate_groups(embeddings: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups of two or more rows linked by close pairs, each sorted, ordered by their first row."""
    rows, cols = close_pairs(embeddings, threshold)
    parent = np.arange(len(embeddings))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(rows.tolist(), cols.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(len(embeddings)):
        groups.setdefault(root(i), []).append(i)
    return sorted((members for members in groups.values() if len(members) > 1), key=lambda g: g[0])


def duplicates_by_file(paths, groups: list[list[int]]) -> dict[str, list[str]]:
    """``{first file: [its duplicates]}`` for each group."""
    return {str(paths[group[0]]): [str(paths[i]) for i in group[1:]] for group in groups}

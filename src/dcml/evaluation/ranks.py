"""Ranks of each query's positives: the one quantity every retrieval metric here is built from.

Recall@K needs only the rank of a query's nearest positive; MAP@R, R-Precision and Precision@1 need
the ranks of its first R positives, and only those ranks that are at most R. So instead of a
1000-deep neighbour list we compute, per query, how many *negatives* precede each positive: scores
are computed tile by tile (a float32 matrix product), and a fused kernel drops every negative that
lies beyond the last positive still able to count, bins the rest between the sorted positive
distances, and adds them to a small histogram. A query whose nearest positive is already known to
rank past every cap needs no more work, and later tiles skip it. Memory stays bounded by one tile,
never N x N.

Order: by exact squared Euclidean distance, ties broken by reference index (the order a stable sort
gives). The float32 tile scores decide every comparison they can decide safely; a negative whose
score lies within float32 rounding (``TIE_TOLERANCE``) of a positive's is compared again with
distances recomputed in float64, by the same code for positives and negatives, so exact duplicates
are real ties and near-ties are ordered correctly. Excluded references (the query itself,
references in the query's group) are neither positives nor negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Reference columns per tile (small enough that finished queries drop out early); query rows per
#: block adapt so a block's buffers stay near 64 MB.
REFERENCE_TILE = 4096
_BLOCK_BYTES = 64 * 2**20
_MIN_QUERY_BLOCK = 16
_MAX_QUERY_BLOCK = 1024
NO_GROUP = -1
#: float32 scores closer than this times (|q| + max |r|)^2 are re-compared in float64. It only has
#: to exceed float32 accumulation error (~1e-7 relative); larger costs time, never correctness.
TIE_TOLERANCE = 2e-6


@dataclass(frozen=True)
class PositiveRanks:
    """Per query: R (number of positives), the nearest positive's rank, AP@R and R-Precision.

    ``first_rank`` is exact up to ``rank_cap``; larger values only say "beyond the cap".
    Queries with R = 0 have ``first_rank`` = 0 and are excluded by the metrics.
    """

    num_positives: np.ndarray
    first_rank: np.ndarray
    average_precision_at_r: np.ndarray
    r_precision: np.ndarray
    rank_cap: int


@dataclass(frozen=True)
class _TileKernel:
    """``pair_distances(a, b)``: float64 squared distances of row pairs; ``count_tile``: see below.

    Both must compute float64 distances with the same code, so duplicates tie exactly.
    """

    pair_distances: object
    count_tile: object


def _numba_kernel() -> _TileKernel | None:
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(inline="always")
    def sqdist64(a, b):
        total = 0.0
        for k in range(a.shape[0]):
            diff = np.float64(a[k]) - np.float64(b[k])
            total += diff * diff
        return total

    @numba.njit(parallel=True, cache=True)
    def pair_distances(a, b):
        out = np.empty(a.shape[0], np.float64)
        for i in numba.prange(a.shape[0]):
            out[i] = sqdist64(a[i], b[i])
        return out

    @numba.njit(parallel=True, cache=True, nogil=True)
    def count_tile(
        scores, q_vectors, r_vectors, thr32, thr64, thr_refs, tolerance, caps, active_len,
        row_label, col_label, row_group, col_group, col_offset, hist,
    ):
        rows, cols = scores.shape
        for i in numba.prange(rows):
            length = active_len[i]
            if length == 0:
                continue
            tol = tolerance[i]
            last = thr32[i, length - 1] + tol
            label = row_label[i]
            group = row_group[i]
            # Negatives before the last tracked positive; once that positive's rank passes its cap
            # it can no longer count, so stop tracking it (and, at zero, stop reading this row).
            before_last = 0
            for b in range(length):
                before_last += hist[i, b]
            for c in range(cols):
                value = scores[i, c]
                if value > last:
                    continue
                if col_label[c] == label:  # a positive, an excluded positive, or the query itself
                    continue
                if group != NO_GROUP and col_group[c] == group:
                    continue
                lo = 0
                hi = length
                while lo < hi:  # first positive this negative certainly precedes
                    mid = (lo + hi) >> 1
                    if thr32[i, mid] > value + tol:
                        hi = mid
                    else:
                        lo = mid + 1
                if lo > 0 and thr32[i, lo - 1] >= value - tol:  # too close to call in float32
                    exact = sqdist64(q_vectors[i], r_vectors[c])
                    ref = col_offset + c
                    while lo > 0 and thr32[i, lo - 1] >= value - tol and (
                        thr64[i, lo - 1] > exact or (thr64[i, lo - 1] == exact and ref < thr_refs[i, lo - 1])
                    ):
                        lo -= 1
                hist[i, lo] += 1
                if lo < length:
                    before_last += 1
                    while length > 0 and length + before_last > caps[i, length - 1]:
                        length -= 1
                        before_last -= hist[i, length]
                    if length == 0:
                        break
                    last = thr32[i, length - 1] + tol
            active_len[i] = length

    return _TileKernel(pair_distances=pair_distances, count_tile=count_tile)


def _pair_distances_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a.astype(np.float64) - b.astype(np.float64)) ** 2).sum(1)


def _count_tile_torch(
    scores, q_vectors, r_vectors, thr32, thr64, thr_refs, tolerance, caps, active_len,
    row_label, col_label, row_group, col_group, col_offset, hist,
):
    """The numba kernel's computation, vectorised with torch and numpy (the fallback path)."""
    width = thr32.shape[1]
    scores_t = torch.from_numpy(scores)
    active = torch.from_numpy(active_len)
    thr = torch.from_numpy(thr32).masked_fill(torch.arange(width)[None, :] >= active[:, None], float("inf"))
    tol = torch.from_numpy(tolerance)
    last = torch.where(active > 0, thr.gather(1, (active - 1).clamp(min=0)[:, None])[:, 0] + tol, torch.tensor(-float("inf")))
    keep = scores_t <= last[:, None]
    keep &= torch.from_numpy(col_label)[None, :] != torch.from_numpy(row_label)[:, None]
    if (row_group != NO_GROUP).any():
        keep &= ~(
            (torch.from_numpy(col_group)[None, :] == torch.from_numpy(row_group)[:, None])
            & (torch.from_numpy(row_group)[:, None] != NO_GROUP)
        )
    row_idx, col_idx = (t.numpy() for t in torch.nonzero(keep, as_tuple=True))
    values = scores[row_idx, col_idx]
    row_tol = tolerance[row_idx]
    thr_np = thr.numpy()
    bucket = np.empty(len(row_idx), np.int64)
    for row in np.unique(row_idx):  # searchsorted per row: thresholds differ by row
        sel = row_idx == row
        bucket[sel] = np.searchsorted(thr_np[row], values[sel] + row_tol[sel], side="right")
    prev = np.maximum(bucket - 1, 0)
    close = (bucket > 0) & (thr_np[row_idx, prev] >= values - row_tol)
    if close.any():
        rows_c, cols_c, b = row_idx[close], col_idx[close], bucket[close]
        exact = _pair_distances_numpy(q_vectors[rows_c], r_vectors[cols_c])
        refs = cols_c + col_offset
        while True:
            p = np.maximum(b - 1, 0)
            move = (b > 0) & (thr_np[rows_c, p] >= values[close] - row_tol[close]) & (
                (thr64[rows_c, p] > exact) | ((thr64[rows_c, p] == exact) & (refs < thr_refs[rows_c, p]))
            )
            if not move.any():
                break
            b = b - move
        bucket[close] = b
    np.add.at(hist, (row_idx, bucket), 1)
    # Positive j (0-based) ranks j + 1 + (negatives before it); keep the prefix still under its cap.
    position = np.arange(1, width + 1)
    ranks = position[None, :] + np.cumsum(hist[:, :width], axis=1)
    stop = (ranks > caps) | (position[None, :] > active_len[:, None])
    active_len[:] = np.where(stop.any(1), stop.argmax(1), width)


_NUMBA: list = []  # the compiled kernel, built on first use (or [None] where numba is missing)


def _select_kernel(kernel: str) -> _TileKernel:
    if kernel not in ("auto", "numba", "torch"):
        raise ValueError(f"kernel must be auto, numba or torch, got {kernel!r}")
    if kernel != "torch":
        if not _NUMBA:
            _NUMBA.append(_numba_kernel())
        if _NUMBA[0] is not None:
            return _NUMBA[0]
        if kernel == "numba":
            raise ImportError("numba is not installed")
    return _TileKernel(pair_distances=_pair_distances_numpy, count_tile=_count_tile_torch)


def positive_ranks(
    queries: np.ndarray,
    query_labels: np.ndarray,
    references: np.ndarray,
    reference_labels: np.ndarray,
    *,
    query_self_index: np.ndarray | None = None,
    query_groups: np.ndarray | None = None,
    reference_groups: np.ndarray | None = None,
    rank_cap: int = 1000,
    kernel: str = "auto",
) -> PositiveRanks:
    """Rank every query's positives among ``references`` (see the module docstring).

    ``query_self_index[i]`` is the row of query i inside ``references`` (leave-one-out), or -1.
    ``kernel``: "numba", "torch" or "auto" (numba when it imports).
    """
    tile_kernel = _select_kernel(kernel)
    q_np = np.ascontiguousarray(queries, dtype=np.float32)
    r_np = np.ascontiguousarray(references, dtype=np.float32)
    q_all, r_all = torch.from_numpy(q_np), torch.from_numpy(r_np)
    q_labels = np.ascontiguousarray(query_labels, dtype=np.int64)
    r_labels = np.ascontiguousarray(reference_labels, dtype=np.int64)
    num_queries, num_refs = len(q_np), len(r_np)
    self_index = np.full(num_queries, -1, np.int64) if query_self_index is None else np.asarray(query_self_index, np.int64)
    use_groups = query_groups is not None and reference_groups is not None
    q_groups = np.asarray(query_groups, np.int64) if use_groups else np.full(num_queries, NO_GROUP, np.int64)
    r_groups = np.asarray(reference_groups, np.int64) if use_groups else np.full(num_refs, NO_GROUP - 1, np.int64)

    # Reference indices grouped by class, ascending inside each class (stable sort).
    order = np.argsort(r_labels, kind="stable")
    class_values, class_starts, class_sizes = np.unique(r_labels[order], return_index=True, return_counts=True)
    r_sqnorm = (r_all * r_all).sum(1)
    q_sqnorm64 = (q_np.astype(np.float64) ** 2).sum(1)
    r_max_norm = float(r_sqnorm.max().sqrt()) if num_refs else 0.0
    q_tolerance = (TIE_TOLERANCE * (np.sqrt(q_sqnorm64) + r_max_norm) ** 2).astype(np.float32)

    num_positives = np.zeros(num_queries, np.int64)
    first_rank = np.zeros(num_queries, np.int64)
    ap_at_r = np.zeros(num_queries, np.float64)
    r_precision = np.zeros(num_queries, np.float64)

    if len(class_values):
        where = np.searchsorted(class_values, q_labels).clip(max=len(class_values) - 1)
        sizes = np.where(class_values[where] == q_labels, class_sizes[where], 0)
    else:
        where = sizes = np.zeros(num_queries, np.int64)
    widest = int(sizes.max(initial=0))
    block = int(np.clip(_BLOCK_BYTES // (4 * max(REFERENCE_TILE, widest * (q_np.shape[1] + 8))), _MIN_QUERY_BLOCK, _MAX_QUERY_BLOCK))
    tile_buffer = torch.empty(block * min(REFERENCE_TILE, max(num_refs, 1)), dtype=torch.float32)

    for start in range(0, num_queries, block):
        rows = np.arange(start, min(start + block, num_queries))
        width = int(sizes[rows].max(initial=0))
        if width == 0:
            continue
        # Candidate positives (B x width), -1 padded, then exclusions (self, same group).
        offsets = np.arange(width)
        valid = offsets[None, :] < sizes[rows][:, None]
        slots = np.where(valid, class_starts[where[rows]][:, None] + offsets[None, :], 0)
        pos_refs = np.where(valid, order[slots], -1)
        valid &= pos_refs != self_index[rows][:, None]
        if use_groups:
            valid &= r_groups[pos_refs.clip(min=0)] != q_groups[rows][:, None]
        counts = valid.sum(1)
        num_positives[rows] = counts

        # Exact (float64) positive distances, sorted by (distance, index): candidates are in
        # ascending reference order, so a stable sort breaks ties by index. +inf pads.
        thr64 = np.full((len(rows), width), np.inf)
        pair_rows, pair_cols = np.nonzero(valid)
        thr64[pair_rows, pair_cols] = tile_kernel.pair_distances(q_np[rows[pair_rows]], r_np[pos_refs[pair_rows, pair_cols]])
        perm = np.argsort(thr64, axis=1, kind="stable")
        thr64 = np.ascontiguousarray(np.take_along_axis(thr64, perm, 1))
        thr_refs = np.ascontiguousarray(np.take_along_axis(pos_refs, perm, 1))
        # The same thresholds in the tiles' units (||r||^2 - 2 q.r, i.e. without ||q||^2).
        thr32 = (thr64 - q_sqnorm64[rows][:, None]).astype(np.float32)

        caps = np.empty((len(rows), width), np.int64)
        caps[:] = counts[:, None]
        caps[:, 0] = np.maximum(counts, rank_cap)
        hist = np.zeros((len(rows), width + 1), np.int64)
        active_len = counts.copy()
        q_block = q_all[rows]
        row_labels, row_groups, row_tolerance = q_labels[rows], q_groups[rows], q_tolerance[rows]

        for col in range(0, num_refs, REFERENCE_TILE):
            live = np.flatnonzero(active_len > 0)
            if len(live) == 0:
                break
            col_end = min(col + REFERENCE_TILE, num_refs)
            tile = tile_buffer[: len(live) * (col_end - col)].view(len(live), col_end - col)
            live_queries = q_block[torch.from_numpy(live)]
            torch.addmm(r_sqnorm[col:col_end].expand(len(live), -1), live_queries, r_all[col:col_end].T, alpha=-2.0, out=tile)
            live_hist, live_len = hist[live], active_len[live]  # copies, written back below
            tile_kernel.count_tile(
                tile.numpy(),
                live_queries.numpy(),
                r_np[col:col_end],
                thr32[live],
                thr64[live],
                thr_refs[live],
                row_tolerance[live],
                caps[live],
                live_len,
                row_labels[live],
                r_labels[col:col_end],
                row_groups[live],
                r_groups[col:col_end],
                col,
                live_hist,
            )
            hist[live], active_len[live] = live_hist, live_len

        position = np.arange(1, width + 1)
        ranks = position[None, :] + np.cumsum(hist[:, :width], axis=1)
        first_rank[rows] = np.where(counts > 0, np.where(active_len > 0, ranks[:, 0], rank_cap + 1), 0)
        usable = (position[None, :] <= active_len[:, None]) & (ranks <= counts[:, None])
        safe_counts = np.maximum(counts, 1)
        ap_at_r[rows] = np.where(usable, position[None, :] / ranks, 0.0).sum(1) / safe_counts
        r_precision[rows] = usable.sum(1) / safe_counts

    return PositiveRanks(
        num_positives=num_positives,
        first_rank=first_rank,
        average_precision_at_r=ap_at_r,
        r_precision=r_precision,
        rank_cap=rank_cap,
    )

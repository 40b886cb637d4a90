"""Ranks of each query's positives: the one quantity every retrieval metric here is built from.

Recall@K needs only the rank of a query's nearest positive; MAP@R, R-Precision and Precision@1 need
the ranks of its first R positives, and only those ranks that are at most R. So instead of a
1000-deep neighbour list we compute, per query, how many *negatives* precede each positive: scores
are computed tile by tile (a matrix product), and a fused kernel drops every negative that lies
beyond the last positive still able to count, bins the rest between the sorted positive distances,
and adds them to a small histogram. A query whose nearest positive is already known to rank past
every cap needs no more work, and later tiles skip it. Memory stays bounded by one tile, never
N x N.

Order: by squared Euclidean distance; ties are broken by reference index, the order a stable sort
gives. Two scores count as tied when they agree to float32 rounding (``TIE_TOLERANCE`` relative to
the squared norms involved): positive and negative scores come from different matrix products, and
exact duplicates must still be ordered the same way every time. Excluded references (the query itself, references in the query's group) are neither
positives nor negatives.
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
#: Scores closer than this times (|q| + max |r|)^2 are ties (float32 accumulation error is ~1e-7).
TIE_TOLERANCE = 5e-7


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


def _numba_kernel():
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(parallel=True, cache=True, nogil=True)
    def count_tile(scores, thresholds, threshold_refs, tolerance, caps, active_len, row_label, col_label, row_group, col_group, col_offset, hist):
        rows, cols = scores.shape
        for i in numba.prange(rows):
            length = active_len[i]
            if length == 0:
                continue
            tol = tolerance[i]
            last = thresholds[i, length - 1] + tol
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
                    if thresholds[i, mid] > value + tol:
                        hi = mid
                    else:
                        lo = mid + 1
                ref = col_offset + c
                while lo > 0 and thresholds[i, lo - 1] >= value - tol and ref < threshold_refs[i, lo - 1]:
                    lo -= 1  # a tie, and the negative has the lower index
                hist[i, lo] += 1
                if lo < length:
                    before_last += 1
                    while length > 0 and length + before_last > caps[i, length - 1]:
                        length -= 1
                        before_last -= hist[i, length]
                    if length == 0:
                        break
                    last = thresholds[i, length - 1] + tol
            active_len[i] = length

    return count_tile


_NUMBA_KERNEL = None
_NUMBA_TRIED = False


def _get_numba_kernel():
    global _NUMBA_KERNEL, _NUMBA_TRIED
    if not _NUMBA_TRIED:
        _NUMBA_TRIED = True
        _NUMBA_KERNEL = _numba_kernel()
    return _NUMBA_KERNEL


def _count_tile_torch(scores, thresholds, threshold_refs, tolerance, caps, active_len, row_label, col_label, row_group, col_group, col_offset, hist):
    """The same computation as the numba kernel, vectorised with torch (the fallback path)."""
    rows, width = thresholds.shape
    scores_t = torch.from_numpy(scores)
    positions = torch.arange(width)
    active = torch.from_numpy(active_len)
    thr = torch.from_numpy(thresholds).masked_fill(positions[None, :] >= active[:, None], float("inf"))
    tol = torch.from_numpy(tolerance)
    last = torch.where(active > 0, thr.gather(1, (active - 1).clamp(min=0)[:, None])[:, 0] + tol, torch.tensor(-float("inf")))
    keep = scores_t <= last[:, None]
    keep &= torch.from_numpy(col_label)[None, :] != torch.from_numpy(row_label)[:, None]
    if (row_group != NO_GROUP).any():
        keep &= ~(
            (torch.from_numpy(col_group)[None, :] == torch.from_numpy(row_group)[:, None])
            & (torch.from_numpy(row_group)[:, None] != NO_GROUP)
        )
    row_idx, col_idx = torch.nonzero(keep, as_tuple=True)
    values = scores_t[row_idx, col_idx]
    row_tol = tol[row_idx]
    bucket = torch.searchsorted(thr[row_idx], (values + row_tol)[:, None], right=True)[:, 0]
    # Ties with a positive's score: the lower reference index comes first.
    thr_refs = torch.from_numpy(threshold_refs)
    refs = col_idx + col_offset
    while True:
        prev = (bucket - 1).clamp(min=0)
        move = (bucket > 0) & (thr[row_idx, prev] >= values - row_tol) & (refs < thr_refs[row_idx, prev])
        if not move.any():
            break
        bucket = bucket - move.long()
    flat = torch.from_numpy(hist).view(-1)
    flat.index_add_(0, row_idx * hist.shape[1] + bucket, torch.ones_like(bucket))
    # Positive j (0-based) ranks j + 1 + (negatives before it); keep the prefix still under its cap.
    position = np.arange(1, width + 1)
    ranks = position[None, :] + np.cumsum(hist[:, :width], axis=1)
    stop = (ranks > caps) | (position[None, :] > active_len[:, None])
    active_len[:] = np.where(stop.any(1), stop.argmax(1), width)


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)


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
    count_tile = {"numba": _get_numba_kernel, "torch": lambda: _count_tile_torch, "auto": _get_numba_kernel}[kernel]()
    if count_tile is None:
        if kernel == "numba":
            raise ImportError("numba is not installed")
        count_tile = _count_tile_torch

    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    r_all = torch.from_numpy(np.ascontiguousarray(references, dtype=np.float32))
    q_labels = np.ascontiguousarray(query_labels, dtype=np.int64)
    r_labels = np.ascontiguousarray(reference_labels, dtype=np.int64)
    num_queries, num_refs = len(q_all), len(r_all)
    self_index = np.full(num_queries, -1, np.int64) if query_self_index is None else np.asarray(query_self_index, np.int64)
    q_groups = np.full(num_queries, NO_GROUP, np.int64) if query_groups is None else np.asarray(query_groups, np.int64)
    r_groups = np.full(num_refs, NO_GROUP - 1, np.int64) if reference_groups is None else np.asarray(reference_groups, np.int64)

    # Reference indices grouped by class, ascending inside each class (stable sort).
    order = np.argsort(r_labels, kind="stable")
    class_values, class_starts, class_sizes = np.unique(r_labels[order], return_index=True, return_counts=True)
    r_sqnorm = _squared_norms(r_all)
    r_max_norm = float(r_sqnorm.max().sqrt()) if num_refs else 0.0
    q_tolerance = (TIE_TOLERANCE * (_squared_norms(q_all).sqrt() + r_max_norm) ** 2).numpy().astype(np.float32)

    num_positives = np.zeros(num_queries, np.int64)
    first_rank = np.zeros(num_queries, np.int64)
    ap_at_r = np.zeros(num_queries, np.float64)
    r_precision = np.zeros(num_queries, np.float64)

    where = np.searchsorted(class_values, q_labels).clip(max=max(len(class_values) - 1, 0))
    has_class = (class_values[where] == q_labels) if len(class_values) else np.zeros(num_queries, bool)
    sizes = np.where(has_class, class_sizes[where] if len(class_values) else 0, 0)
    widest = int(sizes.max(initial=0))
    block = int(np.clip(_BLOCK_BYTES // (4 * max(REFERENCE_TILE, widest * (q_all.shape[1] + 4))), _MIN_QUERY_BLOCK, _MAX_QUERY_BLOCK))
    tile_buffer = torch.empty(block * min(REFERENCE_TILE, max(num_refs, 1)), dtype=torch.float32)

    for start in range(0, num_queries, block):
        stop = min(start + block, num_queries)
        rows = np.arange(start, stop)
        width = int(sizes[rows].max(initial=0))
        if width == 0:
            continue
        # Candidate positives (B x width), -1 padded, then exclusions (self, same group).
        offsets = np.arange(width)
        valid = offsets[None, :] < sizes[rows][:, None]
        slots = np.where(valid, class_starts[where[rows]][:, None] + offsets[None, :], 0)
        pos_refs = np.where(valid, order[slots], -1)
        valid &= pos_refs != self_index[rows][:, None]
        if query_groups is not None and reference_groups is not None:
            valid &= r_groups[pos_refs.clip(min=0)] != q_groups[rows][:, None]
        counts = valid.sum(1)
        num_positives[rows] = counts

        # Positive scores ||r||^2 - 2 q.r (||q||^2 is the same for a whole row), sorted; +inf pads.
        q_block = q_all[rows]
        gathered = r_all[torch.from_numpy(pos_refs.clip(min=0))]
        pos_scores = r_sqnorm[torch.from_numpy(pos_refs.clip(min=0))] - 2.0 * torch.einsum("bd,bpd->bp", q_block, gathered)
        pos_scores.masked_fill_(torch.from_numpy(~valid), float("inf"))
        # Candidates are already in ascending reference order, so a stable sort breaks ties by index.
        pos_scores, perm = torch.sort(pos_scores, dim=1, stable=True)
        thresholds = np.ascontiguousarray(pos_scores.numpy())
        threshold_refs = np.ascontiguousarray(np.take_along_axis(pos_refs, perm.numpy(), 1))
        del gathered

        caps = np.full((len(rows), width), 0, np.int64)
        caps[:] = counts[:, None]
        caps[:, 0] = np.maximum(counts, rank_cap)
        hist = np.zeros((len(rows), width + 1), np.int64)
        active_len = counts.copy()
        row_labels = q_labels[rows]
        row_groups = q_groups[rows]
        position = np.arange(1, width + 1)

        row_tolerance = q_tolerance[rows]
        for col in range(0, num_refs, REFERENCE_TILE):
            live = np.flatnonzero(active_len > 0)
            if len(live) == 0:
                break
            col_end = min(col + REFERENCE_TILE, num_refs)
            tile = tile_buffer[: len(live) * (col_end - col)].view(len(live), col_end - col)
            torch.addmm(r_sqnorm[col:col_end].expand(len(live), -1), q_block[torch.from_numpy(live)], r_all[col:col_end].T, alpha=-2.0, out=tile)
            live_hist, live_len = hist[live], active_len[live]  # copies, written back below
            count_tile(
                tile.numpy(),
                thresholds[live],
                threshold_refs[live],
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

        ranks = position[None, :] + np.cumsum(hist[:, :width], axis=1)
        ok = counts > 0
        first_rank[rows] = np.where(ok, np.where(active_len > 0, ranks[:, 0], rank_cap + 1), 0)
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

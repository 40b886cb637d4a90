"""The fused tile kernels of :mod:`dcml.evaluation.ranks`, compiled with numba.

Module-level functions so numba's on-disk cache works (closures are recompiled in every process).
Importing this module fails without numba; ranks.py then uses its torch/numpy fallback.
"""

import numba
import numpy as np

from dcml.evaluation.constants import COLUMN_CHUNK as _COLUMN_CHUNK
from dcml.evaluation.constants import NO_GROUP

_RUN = 32  # scores checked at once by the vectorised "anything close?" test


@numba.njit(inline="always")
def sqdist64(a, b):
    total = 0.0
    for k in range(a.shape[0]):
        diff = np.float64(a[k]) - np.float64(b[k])
        total += diff * diff
    return total


@numba.njit(parallel=True, cache=True)
def pair_distances(a, b, a_rows, b_rows):
    """Exact squared distances between a[a_rows[k]] and b[b_rows[k]], for every k."""
    out = np.empty(a_rows.shape[0], np.float64)
    for k in numba.prange(a_rows.shape[0]):
        out[k] = sqdist64(a[a_rows[k]], b[b_rows[k]])
    return out


@numba.njit(inline="always")
def place(q, value, query_vector, ref_vector, ref, tol, thr32, thr64, thr_refs, caps, hist, length, before_last):
    """Bin one negative of query ``q``; return the tracked length and the count before its end."""
    lo = 0
    hi = length
    while lo < hi:  # first positive this negative certainly precedes
        mid = (lo + hi) >> 1
        if thr32[q, mid] > value + tol:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and thr32[q, lo - 1] >= value - tol:  # too close to call in float32
        exact = sqdist64(query_vector, ref_vector)
        while lo > 0 and thr32[q, lo - 1] >= value - tol and (
            thr64[q, lo - 1] > exact or (thr64[q, lo - 1] == exact and ref < thr_refs[q, lo - 1])
        ):
            lo -= 1
    hist[q, lo] += 1
    if lo < length:
        before_last += 1
        # Once the last tracked positive's rank passes its cap it can no longer count.
        while length > 0 and length + before_last > caps[q, length - 1]:
            length -= 1
            before_last -= hist[q, length]
    return length, before_last


@numba.njit(inline="always")
def tracked_prefix(q, active_len, hist):
    length = active_len[q]
    before_last = 0
    for b in range(length):
        before_last += hist[q, b]
    return length, before_last


@numba.njit(inline="always", fastmath=True)
def any_row_below(dots, i, col_sqnorm, start, stop, last):
    """Whether any score in dots[i, start:stop] is <= last: a branch-free minimum that vectorises,
    so the common case (a whole run of far negatives) costs a few SIMD instructions."""
    low = np.float32(np.inf)
    for c in range(start, stop):
        low = min(low, col_sqnorm[c] - np.float32(2.0) * dots[i, c])
    return low <= last


@numba.njit(inline="always", fastmath=True)
def any_col_below(dots, i, norm, start, stop, last, offset):
    low = np.float32(np.inf)
    for c in range(start, stop):
        low = min(low, norm - np.float32(2.0) * dots[i, c] - last[c - offset])
    return low <= 0


@numba.njit(parallel=True, cache=True, nogil=True)
def count_rows(
    dots, rows, row_vectors, row_label, row_group, col_offset, col_vectors, col_sqnorm, col_label, col_group,
    thr32, thr64, thr_refs, tolerance, caps, active_len, hist,
):
    """Queries are the tile's rows (state ids ``rows``), references its columns."""
    n_cols = dots.shape[1]
    for i in numba.prange(dots.shape[0]):
        q = rows[i]
        length, before_last = tracked_prefix(q, active_len, hist)
        if length == 0:
            continue
        tol = tolerance[q]
        last = thr32[q, length - 1] + tol
        label = row_label[i]
        group = row_group[i]
        for start in range(0, n_cols, _RUN):
            stop = min(start + _RUN, n_cols)
            if not any_row_below(dots, i, col_sqnorm, start, stop, last):
                continue
            for c in range(start, stop):
                value = col_sqnorm[c] - np.float32(2.0) * dots[i, c]
                if value > last:
                    continue
                if col_label[c] == label:  # a positive, an excluded positive, or the query itself
                    continue
                if group != NO_GROUP and col_group[c] == group:
                    continue
                length, before_last = place(
                    q, value, row_vectors[i], col_vectors[c], col_offset + c, tol, thr32, thr64, thr_refs, caps, hist, length, before_last
                )
                if length == 0:
                    break
                last = thr32[q, length - 1] + tol
            if length == 0:
                break
        active_len[q] = length


@numba.njit(parallel=True, cache=True, nogil=True)
def count_cols(
    dots, cols, col_vectors, col_label, col_group, row_offset, row_vectors, row_sqnorm, row_label, row_group,
    thr32, thr64, thr_refs, tolerance, caps, active_len, hist,
):
    """Queries are the tile's columns (state ids ``cols``), references its rows: the transposed
    use of a tile, so a symmetric problem computes each product once. Each thread owns a chunk
    of columns and walks down the rows, so reads stay contiguous."""
    n_rows, n_cols = dots.shape
    n_chunks = (n_cols + _COLUMN_CHUNK - 1) // _COLUMN_CHUNK
    for k in numba.prange(n_chunks):
        c0 = k * _COLUMN_CHUNK
        width = min(_COLUMN_CHUNK, n_cols - c0)
        length = np.empty(width, np.int64)
        before = np.empty(width, np.int64)
        last = np.empty(width, np.float32)
        for j in range(width):
            q = cols[c0 + j]
            length[j], before[j] = tracked_prefix(q, active_len, hist)
            last[j] = thr32[q, length[j] - 1] + tolerance[q] if length[j] > 0 else -np.inf
        for i in range(n_rows):
            norm = row_sqnorm[i]
            label = row_label[i]
            group = row_group[i]
            for start in range(c0, c0 + width, _RUN):
                stop = min(start + _RUN, c0 + width)
                if not any_col_below(dots, i, norm, start, stop, last, c0):
                    continue
                for c in range(start, stop):
                    j = c - c0
                    value = norm - np.float32(2.0) * dots[i, c]
                    if value > last[j]:
                        continue
                    if col_label[c] == label:
                        continue
                    if group != NO_GROUP and col_group[c] == group:
                        continue
                    q = cols[c]
                    length[j], before[j] = place(
                        q, value, col_vectors[c], row_vectors[i], row_offset + i, tolerance[q], thr32, thr64, thr_refs,
                        caps, hist, length[j], before[j],
                    )
                    last[j] = thr32[q, length[j] - 1] + tolerance[q] if length[j] > 0 else -np.inf
        for j in range(width):
            active_len[cols[c0 + j]] = length[j]

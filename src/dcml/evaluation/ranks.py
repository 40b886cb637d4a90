"""Ranks of each query's positives: the one quantity every retrieval metric here is built from.

Recall@K needs only the rank of a query's nearest positive; MAP@R, R-Precision and Precision@1 need
the ranks of its first R positives, and only those ranks that are at most R. So instead of a
1000-deep neighbour list we compute, per query, how many *negatives* precede each positive: scores
are computed tile by tile (a float32 matrix product), and a fused kernel drops every negative that
lies beyond the last positive still able to count, bins the rest between the sorted positive
distances, and adds them to a small histogram. A query whose nearest positive is already known to
rank past every cap needs no more work, and later tiles skip it. Leave-one-out is symmetric, so
there each product is computed once and binned for both of its points (a transposed pass over the
same tile). Memory stays bounded by one tile plus a few numbers per query, never N x N.

Order: by exact squared Euclidean distance, ties broken by reference index (the order a stable sort
gives). The float32 tile scores decide every comparison they can decide safely; a negative whose
score lies within float32 rounding (``TIE_TOLERANCE``) of a positive's is compared again with
distances recomputed in float64, by the same code for positives and negatives, so exact duplicates
are real ties and near-ties are ordered correctly. Excluded references (the query itself,
references in the query's group) are neither positives nor negatives.

Device: with ``device`` set, only the tile products run there (torch, full float32: TF32 is turned
off for them); binning and every float64 re-check stay on the host, unchanged. A device's product
differs from the host's only in summation order, which is float32 accumulation error of the size
``TIE_TOLERANCE`` already covers, so the ranks are the same as on the host.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from dcml.evaluation.constants import NO_GROUP

#: Reference columns per tile (small enough that finished queries drop out early); query rows per
#: block adapt so a block's buffers stay near 64 MB.
REFERENCE_TILE = 4096
_BLOCK_BYTES = 64 * 2**20
_MIN_QUERY_BLOCK = 16
_MAX_QUERY_BLOCK = 1024
#: Square tiles of the symmetric (leave-one-out) path, and the most memory its per-query state
#: may take before the general path is used instead (many huge classes).
SYMMETRIC_BLOCK = 2048
_SYMMETRIC_STATE_BYTES = 512 * 2**20
_PAIR_CHUNK = 65536  # positive pairs per chunk when the numpy fallback computes exact distances
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
    """``pair_distances(a, b)``: float64 squared distances of row pairs. ``count_rows`` bins a
    tile's negatives for the queries on its rows; ``count_cols`` (None: unavailable) for the
    queries on its columns. Float64 distances must come from the same code everywhere, so
    duplicates tie exactly."""

    pair_distances: object
    count_rows: object
    count_cols: object = None
    #: ``threads(n)``: a context in which the kernel's own parallel loops use at most n threads
    #: (the default does nothing: a kernel without a thread pool of its own).
    threads: object = lambda count: nullcontext()


@contextmanager
def _numba_threads(count: int):
    """numba's parallel loops run on numba's own thread team, sized to every core and blind to
    ``torch.set_num_threads`` and ``OMP_NUM_THREADS``. A process limited to one torch thread then
    still evaluated on two (side-by-side runs on two cores found it as an extra busy thread). Each
    query's counts come from one thread whatever the team size, so the ranks do not change."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _numba_kernel() -> _TileKernel | None:
    try:
        from dcml.evaluation import _numba_kernels as compiled
    except ImportError:
        return None
    return _TileKernel(
        pair_distances=compiled.pair_distances, count_rows=compiled.count_rows, count_cols=compiled.count_cols, threads=_numba_threads
    )


def _pair_distances_numpy(a: np.ndarray, b: np.ndarray, a_rows: np.ndarray, b_rows: np.ndarray) -> np.ndarray:
    out = np.empty(len(a_rows), np.float64)
    for start in range(0, len(a_rows), _PAIR_CHUNK):  # bounded memory for the gathered rows
        rows = slice(start, start + _PAIR_CHUNK)
        out[rows] = ((a[a_rows[rows]].astype(np.float64) - b[b_rows[rows]].astype(np.float64)) ** 2).sum(1)
    return out


def _count_rows_torch(
    dots, rows, row_vectors, row_label, row_group, col_offset, col_vectors, col_sqnorm, col_label, col_group,
    thr32, thr64, thr_refs, tolerance, caps, active_len, hist,
):
    """The numba ``count_rows``, vectorised with torch and numpy (the fallback path)."""
    width = thr32.shape[1]
    t32, t64, t_refs, t_caps = thr32[rows], thr64[rows], thr_refs[rows], caps[rows]
    tol, lengths, counts = tolerance[rows], active_len[rows].copy(), hist[rows].copy()
    scores = col_sqnorm[None, :] - 2.0 * dots
    thr = np.where(np.arange(width)[None, :] >= lengths[:, None], np.float32(np.inf), t32)
    last = np.where(lengths > 0, thr[np.arange(len(rows)), np.maximum(lengths - 1, 0)] + tol, -np.inf)
    keep = torch.from_numpy(scores <= last[:, None])
    keep &= torch.from_numpy(col_label)[None, :] != torch.from_numpy(row_label)[:, None]
    if (row_group != NO_GROUP).any():
        same_group = torch.from_numpy(col_group)[None, :] == torch.from_numpy(row_group)[:, None]
        keep &= ~(same_group & torch.from_numpy(row_group != NO_GROUP)[:, None])
    row_idx, col_idx = (t.numpy() for t in torch.nonzero(keep, as_tuple=True))
    values, row_tol = scores[row_idx, col_idx], tol[row_idx]
    bucket = np.empty(len(row_idx), np.int64)
    for row in np.unique(row_idx):  # thresholds differ by row
        sel = row_idx == row
        bucket[sel] = np.searchsorted(thr[row], values[sel] + row_tol[sel], side="right")
    close = (bucket > 0) & (thr[row_idx, np.maximum(bucket - 1, 0)] >= values - row_tol)
    if close.any():  # too close to call in float32: compare exact distances
        r, c, b = row_idx[close], col_idx[close], bucket[close]
        exact = _pair_distances_numpy(row_vectors, col_vectors, r, c)
        refs = c + col_offset
        while True:
            p = np.maximum(b - 1, 0)
            move = (b > 0) & (thr[r, p] >= values[close] - row_tol[close]) & (
                (t64[r, p] > exact) | ((t64[r, p] == exact) & (refs < t_refs[r, p]))
            )
            if not move.any():
                break
            b = b - move
        bucket[close] = b
    np.add.at(counts, (row_idx, bucket), 1)
    # Positive j (0-based) ranks j + 1 + (negatives before it); keep the prefix still under its cap.
    position = np.arange(1, width + 1)
    ranks = position[None, :] + np.cumsum(counts[:, :width], axis=1)
    stop = (ranks > t_caps) | (position[None, :] > lengths[:, None])
    hist[rows] = counts
    active_len[rows] = np.where(stop.any(1), stop.argmax(1), width)


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
    return _TileKernel(pair_distances=_pair_distances_numpy, count_rows=_count_rows_torch)


@dataclass
class _QueryState:
    """Per query (one row each): its sorted positives and the negatives binned between them so far."""

    counts: np.ndarray  # R
    thr32: np.ndarray  # positive distances minus ||q||^2, float32 (the tiles' units); +inf pads
    thr64: np.ndarray  # exact positive distances, float64, ascending
    thr_refs: np.ndarray  # reference index of each positive
    caps: np.ndarray  # a positive's rank only matters up to this
    tolerance: np.ndarray  # float32 scores closer than this to a threshold are re-compared exactly
    hist: np.ndarray  # hist[q, j]: negatives before positive j and after positive j-1
    active_len: np.ndarray  # positives still tracked (a prefix); 0 = the query is finished

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.__dataclass_fields__)


class _Problem:
    """Queries, references, labels, groups and the class index, prepared once."""

    def __init__(self, queries, query_labels, references, reference_labels, query_self_index, query_groups, reference_groups, rank_cap, kernel,
                 device=None):
        self.kernel = kernel
        self.rank_cap = rank_cap
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.r = np.ascontiguousarray(references, dtype=np.float32)
        self.q_labels = np.ascontiguousarray(query_labels, dtype=np.int64)
        self.r_labels = np.ascontiguousarray(reference_labels, dtype=np.int64)
        n_q, n_r = len(self.q), len(self.r)
        self.self_index = np.full(n_q, -1, np.int64) if query_self_index is None else np.asarray(query_self_index, np.int64)
        self.use_groups = query_groups is not None and reference_groups is not None
        if self.use_groups:
            # Relabelled 0..G-1: the kernels read NO_GROUP (-1) as "exclude nothing", so a caller's
            # own group -1 would otherwise silently retrieve its own members.
            _, ids = np.unique(np.concatenate([np.asarray(query_groups).ravel(), np.asarray(reference_groups).ravel()]),
                               return_inverse=True)
            ids = ids.reshape(-1).astype(np.int64)
            self.q_groups, self.r_groups = ids[:n_q], ids[n_q:]
        else:
            self.q_groups, self.r_groups = np.full(n_q, NO_GROUP, np.int64), np.full(n_r, NO_GROUP - 1, np.int64)
        self.r_sqnorm = (self.r.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.q_torch = torch.from_numpy(self.q)
        self.r_columns = torch.from_numpy(self.r).T.contiguous()  # (dims x refs): the fastest mm layout here
        # The device path keeps its own copies there; None: products on the host, into the buffer directly.
        self.device = None if device is None else torch.device(device)
        if self.device is not None:
            self.q_device, self.r_columns_device = self.q_torch.to(self.device), self.r_columns.to(self.device)
        self.q_sqnorm64 = (self.q.astype(np.float64) ** 2).sum(1)
        r_max_norm = float(np.sqrt(self.r_sqnorm.max())) if n_r else 0.0
        self.tolerance = (TIE_TOLERANCE * (np.sqrt(self.q_sqnorm64) + r_max_norm) ** 2).astype(np.float32)
        # Reference indices grouped by class, ascending inside each class (stable sort).
        self.order = np.argsort(self.r_labels, kind="stable")
        values, self.class_starts, sizes = np.unique(self.r_labels[self.order], return_index=True, return_counts=True)
        if len(values):
            self.where = np.searchsorted(values, self.q_labels).clip(max=len(values) - 1)
            self.sizes = np.where(values[self.where] == self.q_labels, sizes[self.where], 0)
        else:
            self.where = self.sizes = np.zeros(n_q, np.int64)

    def state(self, rows: np.ndarray) -> _QueryState:
        """Sorted positives of the queries ``rows`` (exclusions applied), ready for binning."""
        width = max(int(self.sizes[rows].max(initial=0)), 1)
        offsets = np.arange(width)
        valid = offsets[None, :] < self.sizes[rows][:, None]
        slots = np.where(valid, self.class_starts[self.where[rows]][:, None] + offsets[None, :], 0)
        pos_refs = np.where(valid, self.order[slots], -1)
        valid &= pos_refs != self.self_index[rows][:, None]
        if self.use_groups:
            valid &= self.r_groups[pos_refs.clip(min=0)] != self.q_groups[rows][:, None]
        counts = valid.sum(1)
        # Exact distances sorted by (distance, index): candidates are in ascending reference order,
        # so a stable sort breaks ties by index.
        thr64 = np.full((len(rows), width), np.inf)
        pair_rows, pair_cols = np.nonzero(valid)
        thr64[pair_rows, pair_cols] = self.kernel.pair_distances(self.q, self.r, rows[pair_rows], pos_refs[pair_rows, pair_cols])
        perm = np.argsort(thr64, axis=1, kind="stable")
        thr64 = np.ascontiguousarray(np.take_along_axis(thr64, perm, 1))
        caps = np.empty((len(rows), width), np.int64)
        caps[:] = counts[:, None]
        caps[:, 0] = np.maximum(counts, self.rank_cap)
        return _QueryState(
            counts=counts,
            thr32=(thr64 - self.q_sqnorm64[rows][:, None]).astype(np.float32),
            thr64=thr64,
            thr_refs=np.ascontiguousarray(np.take_along_axis(pos_refs, perm, 1)),
            caps=caps,
            tolerance=self.tolerance[rows],
            hist=np.zeros((len(rows), width + 1), np.int64),
            active_len=counts.copy(),
        )

    def dots(self, buffer: torch.Tensor, query_rows: np.ndarray | slice, ref_start: int, ref_end: int) -> np.ndarray:
        """q.r for the given queries and a contiguous range of references, into ``buffer``.

        torch's BLAS rather than numpy's: numpy's threads spin after a call and then fight the
        kernels' threads for the cores (measured 2x slower overall on two cores).
        """
        if self.device is not None:
            return self._device_dots(buffer, query_rows, ref_start, ref_end)
        queries = self.q_torch[query_rows] if isinstance(query_rows, slice) else self.q_torch[torch.from_numpy(query_rows)]
        out = buffer[: len(queries) * (ref_end - ref_start)].view(len(queries), ref_end - ref_start)
        torch.mm(queries, self.r_columns[:, ref_start:ref_end], out=out)
        return out.numpy()

    def _device_dots(self, buffer: torch.Tensor, query_rows, ref_start: int, ref_end: int) -> np.ndarray:
        rows = query_rows if isinstance(query_rows, slice) else torch.from_numpy(query_rows).to(self.device)
        queries = self.q_device[rows]
        out = buffer[: len(queries) * (ref_end - ref_start)].view(len(queries), ref_end - ref_start)
        # TF32 (what "high" / "medium" matmul precision allows) has ~1e-3 relative error, far beyond
        # TIE_TOLERANCE: the products must be full float32, whatever the caller's setting.
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            product = torch.mm(queries, self.r_columns_device[:, ref_start:ref_end])
        finally:
            torch.set_float32_matmul_precision(previous)
        out.copy_(product)  # synchronous: the kernels read the host buffer next
        return out.numpy()

    def new_buffer(self, size: int) -> torch.Tensor:
        """The host buffer the tile products land in (page-locked for a CUDA device: faster copies)."""
        pinned = self.device is not None and self.device.type == "cuda"
        return torch.empty(size, dtype=torch.float32, pin_memory=pinned)

    def count_rows(self, dots, state: _QueryState, state_rows: np.ndarray, query_rows: np.ndarray, ref_start: int, ref_end: int) -> None:
        """Bin the negatives of a tile for the queries on its rows."""
        refs = slice(ref_start, ref_end)
        self.kernel.count_rows(
            dots, state_rows, self.q[query_rows], self.q_labels[query_rows], self.q_groups[query_rows],
            ref_start, self.r[refs], self.r_sqnorm[refs], self.r_labels[refs], self.r_groups[refs],
            state.thr32, state.thr64, state.thr_refs, state.tolerance, state.caps, state.active_len, state.hist,
        )

    def count_cols(self, dots, state: _QueryState, query_start: int, query_end: int, ref_start: int, ref_end: int) -> None:
        """Bin the negatives of a tile for the queries on its columns (symmetric problems only)."""
        queries, refs = slice(query_start, query_end), slice(ref_start, ref_end)
        self.kernel.count_cols(
            dots, np.arange(query_start, query_end), self.q[queries], self.q_labels[queries], self.q_groups[queries],
            ref_start, self.r[refs], self.r_sqnorm[refs], self.r_labels[refs], self.r_groups[refs],
            state.thr32, state.thr64, state.thr_refs, state.tolerance, state.caps, state.active_len, state.hist,
        )


def _finish(state: _QueryState, rank_cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-positive rank, AP@R and R-Precision from the binned counts."""
    width = state.thr64.shape[1]
    position = np.arange(1, width + 1)
    ranks = position[None, :] + np.cumsum(state.hist[:, :width], axis=1)
    counts, active = state.counts, state.active_len
    first = np.where(counts > 0, np.where(active > 0, ranks[:, 0], rank_cap + 1), 0)
    usable = (position[None, :] <= active[:, None]) & (ranks <= counts[:, None])
    safe = np.maximum(counts, 1)
    return first, np.where(usable, position[None, :] / ranks, 0.0).sum(1) / safe, usable.sum(1) / safe


def _run_blocks(problem: _Problem, out: dict[str, np.ndarray]) -> None:
    """General case: query blocks against reference tiles."""
    n_q, n_r = len(problem.q), len(problem.r)
    widest = int(problem.sizes.max(initial=1))
    block = int(np.clip(_BLOCK_BYTES // (4 * max(REFERENCE_TILE, widest * (problem.q.shape[1] + 10))), _MIN_QUERY_BLOCK, _MAX_QUERY_BLOCK))
    buffer = problem.new_buffer(block * min(REFERENCE_TILE, max(n_r, 1)))
    for start in range(0, n_q, block):
        rows = np.arange(start, min(start + block, n_q))
        state = problem.state(rows)
        for ref_start in range(0, n_r, REFERENCE_TILE):
            live = np.flatnonzero(state.active_len > 0)
            if len(live) == 0:
                break
            ref_end = min(ref_start + REFERENCE_TILE, n_r)
            dots = problem.dots(buffer, rows[live], ref_start, ref_end)
            problem.count_rows(dots, state, live, rows[live], ref_start, ref_end)
        out["num_positives"][rows] = state.counts
        out["first_rank"][rows], out["ap"][rows], out["r_precision"][rows] = _finish(state, problem.rank_cap)


def _run_symmetric(problem: _Problem, state: _QueryState, out: dict[str, np.ndarray]) -> None:
    """Leave-one-out: every product q.r is computed once and used by both of its points."""
    n = len(problem.q)
    buffer = problem.new_buffer(SYMMETRIC_BLOCK * min(SYMMETRIC_BLOCK, n))
    starts = range(0, n, SYMMETRIC_BLOCK)
    for i_start in starts:
        i_end = min(i_start + SYMMETRIC_BLOCK, n)
        for j_start in starts[i_start // SYMMETRIC_BLOCK :]:
            j_end = min(j_start + SYMMETRIC_BLOCK, n)
            live_i = i_start + np.flatnonzero(state.active_len[i_start:i_end] > 0)
            live_j = j_start + np.flatnonzero(state.active_len[j_start:j_end] > 0) if j_start != i_start else live_i[:0]
            if len(live_i) and len(live_j) and len(live_i) + len(live_j) >= i_end - i_start:
                # Enough unfinished queries on both sides: one shared tile is the cheaper product.
                dots = problem.dots(buffer, slice(i_start, i_end), j_start, j_end)
                problem.count_rows(dots, state, np.arange(i_start, i_end), np.arange(i_start, i_end), j_start, j_end)
                problem.count_cols(dots, state, j_start, j_end, i_start, i_end)
                continue
            # Otherwise only the unfinished queries' rows (most queries of random-like data finish early).
            if len(live_i):
                problem.count_rows(problem.dots(buffer, live_i, j_start, j_end), state, live_i, live_i, j_start, j_end)
            if len(live_j):
                problem.count_rows(problem.dots(buffer, live_j, i_start, i_end), state, live_j, live_j, i_start, i_end)
    out["num_positives"][:] = state.counts
    out["first_rank"][:], out["ap"][:], out["r_precision"][:] = _finish(state, problem.rank_cap)


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
    device: str | torch.device | None = None,
) -> PositiveRanks:
    """Rank every query's positives among ``references`` (see the module docstring).

    ``query_self_index[i]`` is the row of query i inside ``references`` (leave-one-out), or -1.
    When the queries are the references (the same arrays, each query its own index), the
    problem is symmetric and each distance is computed once. ``kernel``: "numba", "torch" or
    "auto" (numba when it imports). ``device`` (e.g. "cuda"): compute the tile products there with
    torch, the same ranks as without it (None: on the host, the default).
    """
    tile_kernel = _select_kernel(kernel)
    problem = _Problem(queries, query_labels, references, reference_labels, query_self_index, query_groups, reference_groups, rank_cap, tile_kernel, device)
    n_q = len(problem.q)
    out = {
        "num_positives": np.zeros(n_q, np.int64),
        "first_rank": np.zeros(n_q, np.int64),
        "ap": np.zeros(n_q, np.float64),
        "r_precision": np.zeros(n_q, np.float64),
    }
    symmetric = (
        tile_kernel.count_cols is not None
        and queries is references
        and query_labels is reference_labels
        and query_groups is reference_groups
        and query_self_index is not None
        and np.array_equal(problem.self_index, np.arange(n_q))
    )
    # One knob for the caller's thread budget: the kernel's loops follow torch's thread count.
    with tile_kernel.threads(torch.get_num_threads()):
        state = problem.state(np.arange(n_q)) if symmetric and n_q else None
        if state is not None and state.nbytes() <= _SYMMETRIC_STATE_BYTES:
            _run_symmetric(problem, state, out)
        else:
            del state
            _run_blocks(problem, out)
    return PositiveRanks(
        num_positives=out["num_positives"],
        first_rank=out["first_rank"],
        average_precision_at_r=out["ap"],
        r_precision=out["r_precision"],
        rank_cap=rank_cap,
    )

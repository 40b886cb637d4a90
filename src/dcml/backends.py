"""One small contract for every k-nearest-neighbour and k-means call.

``get_backend("faiss")`` and ``get_backend("torch")`` return objects with the same two methods, so
evaluation, clustering and serving code never import faiss directly. faiss is the default (about 5x
faster than scikit-learn for k-means and 3x faster than torch for exact kNN on two cores); the
torch backend needs nothing beyond torch and is the fallback when faiss cannot be imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dcml.errors import UserError

#: k-means iterations when a caller does not say (faiss's and pytorch-metric-learning's NMI use 20).
DEFAULT_KMEANS_ITERATIONS = 20
#: k-means seed when a caller does not say: faiss's own default, so NMI matches other faiss-based
#: tools (pytorch-metric-learning) computed on the same embeddings.
DEFAULT_KMEANS_SEED = 1234
#: Rows of queries per block in the torch kNN, so memory stays bounded for any N.
_TORCH_QUERY_BLOCK = 2048


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32
    assignment: np.ndarray  # (n,) int64 in 0..k-1


class SearchBackend(Protocol):
    """Exact squared-L2 kNN and k-means on float32 arrays."""

    name: str

    def knn(self, queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (squared distances, indices), each (len(queries), k), nearest first."""
        ...

    def kmeans(self, x: np.ndarray, k: int, *, iterations: int = DEFAULT_KMEANS_ITERATIONS, seed: int = DEFAULT_KMEANS_SEED) -> KMeansResult:
        """Lloyd's k-means, initialised with k random points drawn with ``seed``."""
        ...


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


#: Seeds each engine accepts: faiss stores its k-means seed in a C ``int``; torch's
#: ``manual_seed`` takes -2**63 .. 2**64 - 1.
_FAISS_SEEDS = (-(2**31), 2**31)
_TORCH_SEEDS = (-(2**63), 2**64)


def fold_seed(seed: int, accepted: tuple[int, int]) -> int:
    """``seed`` itself when the engine accepts it, else folded into its range (modulo its width).

    Callers derive seeds arithmetically (the trainer's per-epoch k-means seed is seed x 100003 +
    epoch, which passes 2**31 for seeds >= 21475); folding only the out-of-range ones keeps every
    seed that worked before, so existing results (seeds 0..10 and any epoch count) do not change.
    """
    seed = int(seed)
    low, high = accepted
    return seed if low <= seed < high else (seed - low) % (high - low) + low


class FaissBackend:
    name = "faiss"

    def __init__(self) -> None:
        import faiss  # imported here so a broken faiss only matters if this backend is chosen

        self._faiss = faiss

    def knn(self, queries, references, k):
        index = self._faiss.IndexFlatL2(references.shape[1])
        index.add(_as_float32(references))
        distances, indices = index.search(_as_float32(queries), k)
        return distances, indices.astype(np.int64)

    def kmeans(self, x, k, *, iterations=DEFAULT_KMEANS_ITERATIONS, seed=DEFAULT_KMEANS_SEED):
        x = _as_float32(x)
        kmeans = self._faiss.Kmeans(
            x.shape[1],
            k,
            niter=iterations,
            seed=fold_seed(seed, _FAISS_SEEDS),
            # Never subsample: evaluation and re-clustering must see every point.
            max_points_per_centroid=max(1, -(-len(x) // k)),
            min_points_per_centroid=1,  # few points per class is normal here, not worth a warning
            verbose=False,
        )
        kmeans.train(x)
        _, assignment = kmeans.index.search(x, 1)
        return KMeansResult(centroids=kmeans.centroids.copy(), assignment=assignment[:, 0].astype(np.int64))


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self._torch = torch

    def _sqdist(self, a, b, b_sqnorm):
        torch = self._torch
        return torch.addmm(b_sqnorm[None, :], a, b.T, alpha=-2.0).add_((a * a).sum(1, keepdim=True)).clamp_(min=0)

    def knn(self, queries, references, k):
        torch = self._torch
        q = torch.from_numpy(_as_float32(queries))
        r = torch.from_numpy(_as_float32(references))
        r_sqnorm = (r * r).sum(1)
        distances, indices = [], []
        for start in range(0, len(q), _TORCH_QUERY_BLOCK):
            block = self._sqdist(q[start : start + _TORCH_QUERY_BLOCK], r, r_sqnorm)
            d, i = torch.topk(block, k, dim=1, largest=False, sorted=True)
            distances.append(d)
            indices.append(i)
        return torch.cat(distances).numpy(), torch.cat(indices).numpy().astype(np.int64)

    def _assign(self, x, centroids):
        torch = self._torch
        c_sqnorm = (centroids * centroids).sum(1)
        parts = []
        for start in range(0, len(x), _TORCH_QUERY_BLOCK):
            parts.append(self._sqdist(x[start : start + _TORCH_QUERY_BLOCK], centroids, c_sqnorm).argmin(1))
        return torch.cat(parts)

    def kmeans(self, x, k, *, iterations=DEFAULT_KMEANS_ITERATIONS, seed=DEFAULT_KMEANS_SEED):
        torch = self._torch
        points = torch.from_numpy(_as_float32(x))
        generator = torch.Generator().manual_seed(fold_seed(seed, _TORCH_SEEDS))
        centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
        for _ in range(iterations):
            assignment = self._assign(points, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
            counts = torch.bincount(assignment, minlength=k)
            empty = counts == 0
            centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
            if empty.any():
                # An empty cluster takes the point farthest from its centroid, as faiss splits big ones.
                distances = ((points - centroids[assignment]) ** 2).sum(1)
                far = torch.topk(distances, int(empty.sum())).indices
                centroids[empty] = points[far]
        assignment = self._assign(points, centroids)
        return KMeansResult(centroids=centroids.numpy(), assignment=assignment.numpy().astype(np.int64))


_BACKENDS = {"faiss": FaissBackend, "torch": TorchBackend}


def get_backend(name: str = "auto") -> SearchBackend:
    """``"faiss"``, ``"torch"`` or ``"auto"`` (faiss when it imports, else torch)."""
    if name == "auto":
        try:
            return FaissBackend()
        except ImportError:
            return TorchBackend()
    if name not in _BACKENDS:
        raise UserError(f"unknown search backend {name!r}; choose one of: auto, {', '.join(_BACKENDS)}")
    try:
        return _BACKENDS[name]()
    except ImportError as error:
        raise UserError(f"search backend {name!r} is not installed ({error}); use --backend torch") from None

"""faiss index kinds: exact (flat) and approximate (HNSW, IVF, IVF-PQ), their parameters and measured recall.

Every kind searches squared Euclidean distance on L2-normalised embeddings, the distance evaluation
ranks by. An approximate kind trades recall for speed; :func:`measured_recall` is how much, measured
against exact search on a sample of the items.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from dcml.errors import UserError

KINDS = ("flat", "hnsw", "ivf", "ivfpq")
RECALL_K = 10
RECALL_SAMPLE = 1000
#: IVF training points per list (faiss warns below 39; more brings little).
TRAIN_POINTS_PER_LIST = 64
MAX_TRAIN_POINTS = 262144


def default_parameters(kind: str, count: int, dimension: int) -> dict:
    """Parameters that reach Recall@10 near 0.95 on clustered data (see benchmarks/search.py)."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"m": 16, "ef_construction": 80, "ef_search": 128}
    nlist = max(1, min(int(round(math.sqrt(count))), count // 39 or 1))
    params = {"nlist": nlist, "nprobe": min(nlist, 16)}
    if kind == "ivfpq":
        m = next(m for m in (dimension // 4, dimension // 2, dimension, 1) if m and dimension % m == 0)
        # 2^nbits centroids per sub-quantizer want >= 39 training points each (faiss' own rule).
        params.update(m=m, nbits=max(1, min(8, int(math.log2(max(count // 39, 2))))))
    return params


def check_parameters(kind: str, params: dict, count: int, dimension: int) -> dict:
    """Defaults filled in, then every value checked; one-line UserError for a bad one."""
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")
    merged = {**default_parameters(kind, count, dimension), **{k: v for k, v in params.items() if v is not None}}
    unknown = set(merged) - set(default_parameters(kind, max(count, 1), dimension))
    if unknown:
        raise UserError(f"index kind {kind} takes no parameter {', '.join(sorted(unknown))}")
    for name, value in merged.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"index parameter {name} must be a positive integer, got {value!r}")
    if kind in ("ivf", "ivfpq"):
        if merged["nlist"] > count:
            raise UserError(f"nlist={merged['nlist']} is above the number of items ({count}); lower --nlist")
        merged["nprobe"] = min(merged["nprobe"], merged["nlist"])
    if kind == "ivfpq":
        if dimension % merged["m"]:
            raise UserError(f"--pq-m {merged['m']} does not divide the embedding dimension {dimension}")
        if merged["nbits"] > 16 or 2 ** merged["nbits"] > count:
            raise UserError(f"--pq-bits {merged['nbits']} needs at least {2 ** merged['nbits']} items to train (and at most 16 bits); "
                            f"the index has {count}")
    return merged


def new_index(kind: str, params: dict, dimension: int):
    import faiss

    if kind == "flat":
        return faiss.IndexFlatL2(dimension)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, params["m"])
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
        return index
    quantizer = faiss.IndexFlatL2(dimension)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dimension, params["nlist"], faiss.METRIC_L2)
    else:
        index = faiss.IndexIVFPQ(quantizer, dimension, params["nlist"], params["m"], params["nbits"])
    index.referenced_objects = [quantizer]  # keeps the quantizer alive as long as the index
    index.nprobe = params["nprobe"]
    return index


def apply_search_parameters(index, kind: str, params: dict) -> None:
    """Search-time settings (not all survive faiss' file format)."""
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    elif kind in ("ivf", "ivfpq"):
        index.nprobe = params["nprobe"]


def needs_training(kind: str) -> bool:
    return kind in ("ivf", "ivfpq")


def training_size(params: dict, count: int) -> int:
    wanted = params["nlist"] * TRAIN_POINTS_PER_LIST
    if "nbits" in params:
        wanted = max(wanted, 2 ** params["nbits"] * TRAIN_POINTS_PER_LIST)
    return min(count, wanted, MAX_TRAIN_POINTS)


def exact_neighbours(queries: np.ndarray, chunks: Iterable[np.ndarray], k: int) -> np.ndarray:
    """Ids of each query's ``k`` nearest rows over a database given in chunks (bounded memory)."""
    import faiss

    best_d = np.full((len(queries), k), np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    offset = 0
    for chunk in chunks:
        d, i = faiss.knn(queries, np.ascontiguousarray(chunk), min(k, len(chunk)))
        all_d = np.concatenate([best_d, d], axis=1)
        all_i = np.concatenate([best_i, i + offset], axis=1)
        order = np.argsort(all_d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)
        offset += len(chunk)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true k nearest ids that the approximate search returned."""
    k = truth.shape[1]
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k) if len(hits) else float("nan")

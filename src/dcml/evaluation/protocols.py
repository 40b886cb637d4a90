"""The field's evaluation protocols, as functions of a split's embeddings (see method.md)."""

from __future__ import annotations

import numpy as np

from dcml.backends import DEFAULT_KMEANS_SEED

from dcml.evaluation.metrics import NMI, NUM_EXCLUDED, NUM_QUERIES, evaluate_embeddings, retrieval_metrics

#: Random gallery draws averaged by VehicleID's standard protocol.
VEHICLEID_REPEATS = 10


def vehicleid_gallery_mask(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random image per vehicle goes to the gallery (False); every other image is a query (True)."""
    labels = np.asarray(labels)
    order = rng.permutation(len(labels))
    _, first = np.unique(labels[order], return_index=True)
    query_mask = np.ones(len(labels), dtype=bool)
    query_mask[order[first]] = False
    return query_mask


def vehicleid_standard(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    ks: tuple[int, ...] = (1, 5),
    repeats: int = VEHICLEID_REPEATS,
    seed: int = DEFAULT_KMEANS_SEED,
) -> dict[str, float | int]:
    """VehicleID's standard protocol: mean over ``repeats`` random galleries of one image per vehicle.

    Also reports the spread (``<metric>_std``) across draws.
    """
    rng = np.random.default_rng(seed)
    runs = [retrieval_metrics(embeddings, labels, ks=ks, query_mask=vehicleid_gallery_mask(labels, rng)) for _ in range(repeats)]
    result: dict[str, float | int] = {}
    for key in runs[0]:
        values = np.array([run[key] for run in runs], dtype=np.float64)
        if key in (NUM_QUERIES, NUM_EXCLUDED):
            result[key] = int(values[0])
        else:
            result[key] = float(values.mean())
            result[f"{key}_std"] = float(values.std())
    result["repeats"] = repeats
    return result


def vehicleid_leave_one_out(embeddings: np.ndarray, labels: np.ndarray, *, ks: tuple[int, ...] = (1, 5)) -> dict[str, float | int]:
    """What both official repositories computed: every test image queries all the others."""
    return retrieval_metrics(embeddings, labels, ks=ks)


def leave_one_out_and_cross_group(
    embeddings: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    with_nmi: bool = True,
    seed: int = DEFAULT_KMEANS_SEED,
) -> dict[str, dict[str, float | int]]:
    """Both emoji protocols: plain leave-one-out, and cross-group (never retrieve the query's own group).

    NMI does not depend on the protocol, so it is computed once and reported in both.
    """
    loo = evaluate_embeddings(embeddings, labels, ks=ks, with_nmi=with_nmi, seed=seed)
    cross = retrieval_metrics(embeddings, labels, ks=ks, groups=groups)
    if with_nmi:
        cross[NMI] = loo[NMI]
    return {"leave_one_out": loo, "cross_vendor": cross}

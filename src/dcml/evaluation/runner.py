"""Evaluate a dataset's test data under its own protocol, given a way to embed a split.

The one place that knows which splits each protocol uses; callers (zero-shot evaluation now,
training later) pass ``embed(split) -> (N x D array)`` and get named rows of metrics back.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from dcml.backends import DEFAULT_KMEANS_SEED

from dcml.data.records import Dataset, Protocol, Split
from dcml.embedding import l2_normalize
from dcml.evaluation.metrics import evaluate_embeddings
from dcml.evaluation.protocols import leave_one_out_and_cross_group, vehicleid_leave_one_out, vehicleid_standard

Embed = Callable[[Split], np.ndarray]
Metrics = dict[str, float | int]


def _usable_ks(ks: tuple[int, ...], num_references: int) -> tuple[int, ...]:
    """The protocol's Ks that the reference set can answer; a small user dataset drops the rest."""
    usable = tuple(k for k in ks if k <= num_references)
    if len(usable) < len(ks):
        dropped = ", ".join(str(k) for k in ks if k > num_references)
        warnings.warn(f"Recall@{dropped} skipped: only {num_references} references per query", stacklevel=3)
    return usable or (1,)


def splits_to_embed(dataset: Dataset, split: str | None = None) -> tuple[str, ...]:
    """The splits :func:`evaluate_dataset` embeds for the same arguments (embed them ahead, e.g. in shards)."""
    spec = dataset.evaluation
    if split is not None:
        return (split,)
    if spec.protocol in (Protocol.LEAVE_ONE_OUT, Protocol.CROSS_GROUP):
        return spec.splits[:1]
    return tuple(spec.splits)


def evaluate_dataset(
    dataset: Dataset,
    embed: Embed,
    *,
    split: str | None = None,
    with_nmi: bool = True,
    seed: int = DEFAULT_KMEANS_SEED,
) -> dict[str, Metrics]:
    """Metrics rows named by protocol, e.g. {"leave_one_out": M, "cross_vendor": M}.

    Embeddings are L2-normalised before ranking (the method evaluates normalised embeddings).
    ``split`` overrides the protocol's test split(s) with one split evaluated leave-one-out (and
    cross-group where the dataset has groups), e.g. the emoji validation split.
    """
    spec = dataset.evaluation
    ks = spec.recall_ks
    if split is not None or spec.protocol in (Protocol.LEAVE_ONE_OUT, Protocol.CROSS_GROUP):
        chosen = dataset.split(split or spec.splits[0])
        ks = _usable_ks(ks, chosen.num_images - 1)
        x = l2_normalize(embed(chosen))
        if chosen.groups is not None:
            return leave_one_out_and_cross_group(x, chosen.labels, chosen.groups, ks=ks, with_nmi=with_nmi, seed=seed)
        return {"leave_one_out": evaluate_embeddings(x, chosen.labels, ks=ks, with_nmi=with_nmi, seed=seed)}
    if spec.protocol is Protocol.QUERY_GALLERY:
        query, gallery = (dataset.split(name) for name in spec.splits)
        ks = _usable_ks(ks, gallery.num_images)
        x = l2_normalize(np.concatenate([embed(query), embed(gallery)]))
        labels = np.concatenate([query.labels, gallery.labels])
        mask = np.zeros(len(labels), dtype=bool)
        mask[: query.num_images] = True
        return {"query_gallery": evaluate_embeddings(x, labels, ks=ks, query_mask=mask, with_nmi=with_nmi, seed=seed)}
    if spec.protocol is Protocol.VEHICLEID:
        rows: dict[str, Metrics] = {}
        for name in spec.splits:
            test = dataset.split(name)
            ks = _usable_ks(spec.recall_ks, len(np.unique(test.labels)))  # the gallery: one image per vehicle
            x = l2_normalize(embed(test))
            rows[f"{name}/standard"] = vehicleid_standard(x, test.labels, ks=ks, seed=seed)
            rows[f"{name}/leave_one_out"] = vehicleid_leave_one_out(x, test.labels, ks=ks)
        return rows
    raise ValueError(f"no evaluation for protocol {spec.protocol}")


def format_table(rows: dict[str, Metrics], ks: tuple[int, ...]) -> str:
    """A plain-text table: one line per row, Recall@K, MAP@R, R-Precision, NMI (in %)."""
    ks = tuple(k for k in ks if any(f"recall@{k}" in metrics for metrics in rows.values()))
    columns = [f"recall@{k}" for k in ks] + ["map@r", "r_precision", "nmi"]
    headers = [f"R@{k}" for k in ks] + ["MAP@R", "R-Prec", "NMI"]
    width = max(len(name) for name in rows) + 2
    lines = [" " * width + "".join(f"{h:>8}" for h in headers)]
    for name, metrics in rows.items():
        cells = "".join(f"{100 * metrics[c]:8.2f}" if c in metrics else f"{'-':>8}" for c in columns)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)

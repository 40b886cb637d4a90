"""Evaluate a dataset's test data under its own protocol, given a way to embed a split.

The one place that knows which splits each protocol uses; callers (zero-shot evaluation now,
training later) pass ``embed(split) -> (N x D array)`` and get named rows of metrics back.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dcml.backends import DEFAULT_KMEANS_SEED

from dcml.data.records import Dataset, Protocol, Split
from dcml.embedding import l2_normalize
from dcml.evaluation.metrics import evaluate_embeddings, score_keys
from dcml.evaluation.protocols import leave_one_out_and_cross_group, vehicleid_leave_one_out, vehicleid_standard

Embed = Callable[[Split], np.ndarray]
Metrics = dict[str, float | int]


@dataclass(frozen=True)
class ReportRow:
    """One row of metrics :func:`evaluate_dataset` returns, known before anything is embedded."""

    ks: tuple[int, ...]  # its Recall@K list: the protocol's Ks that its reference set can answer
    references: int  # references a query is ranked against (Ks above it are dropped)
    scores: tuple[str, ...]  # its score keys (higher is better); the num_* counts come besides them


def _usable_ks(ks: tuple[int, ...], num_references: int) -> tuple[int, ...]:
    """The protocol's Ks that the reference set can answer; a small user dataset drops the rest."""
    return tuple(k for k in ks if k <= num_references) or (1,)


def report_rows(dataset: Dataset, split: str | None = None, with_nmi: bool = True) -> dict[str, ReportRow]:
    """Name -> :class:`ReportRow` of every row :func:`evaluate_dataset` returns for the same arguments.

    :func:`evaluate_dataset` takes its row names and Recall@K lists from here, so a check made
    before training (the selection metric) sees exactly the names the evaluation will produce.
    """
    spec = dataset.evaluation

    def row(references: int, nmi: bool, spread: bool = False) -> ReportRow:
        ks = _usable_ks(spec.recall_ks, references)
        scores = score_keys(ks, nmi)
        if spread:  # VehicleID's standard protocol also reports each score's spread over its draws
            scores = tuple(name for key in scores for name in (key, f"{key}_std"))
        return ReportRow(ks, references, scores)

    if split is not None or spec.protocol in (Protocol.LEAVE_ONE_OUT, Protocol.CROSS_GROUP):
        chosen = dataset.split(split or spec.splits[0])
        names = ("leave_one_out", "cross_vendor") if chosen.groups is not None else ("leave_one_out",)
        return {name: row(chosen.num_images - 1, with_nmi) for name in names}
    if spec.protocol is Protocol.QUERY_GALLERY:
        return {"query_gallery": row(dataset.split(spec.splits[1]).num_images, with_nmi)}
    if spec.protocol is Protocol.VEHICLEID:
        rows: dict[str, ReportRow] = {}
        for name in spec.splits:  # no NMI in either row; both use the Ks one gallery image per vehicle allows
            test = dataset.split(name)
            standard = rows[f"{name}/standard"] = row(len(np.unique(test.labels)), False, spread=True)
            rows[f"{name}/leave_one_out"] = ReportRow(standard.ks, test.num_images - 1, score_keys(standard.ks, False))
        return rows
    raise ValueError(f"no evaluation for protocol {spec.protocol}")


def _warn_dropped_ks(ks: tuple[int, ...], rows: dict[str, ReportRow]) -> None:
    for references in sorted({r.references for r in rows.values() if r.ks != ks}):
        dropped = ", ".join(str(k) for k in ks if k > references)
        if dropped:
            warnings.warn(f"Recall@{dropped} skipped: only {references} references per query", stacklevel=3)


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
    cross-group where the dataset has groups), e.g. the emoji validation split. The rows and their
    Recall@K lists are those of :func:`report_rows`.
    """
    spec = dataset.evaluation
    plan = report_rows(dataset, split, with_nmi)
    _warn_dropped_ks(spec.recall_ks, plan)
    if split is not None or spec.protocol in (Protocol.LEAVE_ONE_OUT, Protocol.CROSS_GROUP):
        chosen = dataset.split(split or spec.splits[0])
        ks = plan["leave_one_out"].ks
        x = l2_normalize(embed(chosen))
        if chosen.groups is not None:
            return leave_one_out_and_cross_group(x, chosen.labels, chosen.groups, ks=ks, with_nmi=with_nmi, seed=seed)
        return {"leave_one_out": evaluate_embeddings(x, chosen.labels, ks=ks, with_nmi=with_nmi, seed=seed)}
    if spec.protocol is Protocol.QUERY_GALLERY:
        query, gallery = (dataset.split(name) for name in spec.splits)
        x = l2_normalize(np.concatenate([embed(query), embed(gallery)]))
        labels = np.concatenate([query.labels, gallery.labels])
        mask = np.zeros(len(labels), dtype=bool)
        mask[: query.num_images] = True
        ks = plan["query_gallery"].ks
        return {"query_gallery": evaluate_embeddings(x, labels, ks=ks, query_mask=mask, with_nmi=with_nmi, seed=seed)}
    rows: dict[str, Metrics] = {}
    for name in spec.splits:  # VehicleID
        test = dataset.split(name)
        ks = plan[f"{name}/standard"].ks
        x = l2_normalize(embed(test))
        rows[f"{name}/standard"] = vehicleid_standard(x, test.labels, ks=ks, seed=seed)
        rows[f"{name}/leave_one_out"] = vehicleid_leave_one_out(x, test.labels, ks=ks)
    return rows


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

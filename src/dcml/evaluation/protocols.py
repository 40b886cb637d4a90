"""The field's evaluation protocols (see method.md): for each one, which splits it embeds, the rows
of metrics it reports and their names, and how it computes them.

This module is the one place that knows a protocol. :mod:`dcml.evaluation.runner` evaluates through
:data:`PROTOCOLS`, the pre-flight checks take row names from :meth:`EvaluationProtocol.report_rows`,
and the configuration's ``evaluation.protocol`` accepts :func:`protocol_names`. A new protocol is
one :class:`EvaluationProtocol` here, named as the datasets' :class:`~dcml.data.records.Protocol`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dcml.backends import DEFAULT_KMEANS_SEED
from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split
from dcml.model_runner import l2_normalize
from dcml.evaluation.metrics import (
    NMI,
    NUM_EXCLUDED,
    NUM_QUERIES,
    evaluate_embeddings,
    retrieval_metrics,
    score_keys,
)

Embed = Callable[[Split], np.ndarray]
Metrics = dict[str, float | int]

#: Row names, as results, tables, logs and ``evaluation.selection_metric`` ("<row>/<metric>") spell them.
LEAVE_ONE_OUT_ROW = "leave_one_out"  # every image queries all the others
CROSS_GROUP_ROW = "cross_vendor"  # the same, never retrieving the query's own group (emoji's groups are vendors)
UNSEEN_GROUP_ROW = "unseen_vendor"  # a group training never saw (data.held_out_group) queries the other groups
QUERY_GALLERY_ROW = "query_gallery"  # queries searched against a gallery split
STANDARD_ROW = "standard"  # VehicleID's own protocol; its rows are "<test split>/standard" and "<test split>/leave_one_out"

#: What each row measures, as ``dcml data info`` explains it.
ROW_DESCRIPTIONS = {
    LEAVE_ONE_OUT_ROW: "every test image queries all the others",
    CROSS_GROUP_ROW: "every test image queries the other groups' test images (emoji: never its own vendor's)",
    UNSEEN_GROUP_ROW: "training and validation leave one group out (data.held_out_group, emoji: a vendor); "
                      "its test images query the other groups' test images",
    QUERY_GALLERY_ROW: "the query split searched against the gallery split",
    STANDARD_ROW: "one random gallery image per vehicle, the rest query it (mean over draws)",
}

#: Random gallery draws averaged by VehicleID's standard protocol.
VEHICLEID_REPEATS = 10


# ---------------------------------------------------------------------------- metrics of each protocol
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
    return {LEAVE_ONE_OUT_ROW: loo, CROSS_GROUP_ROW: cross}


def unseen_group_queries(groups: np.ndarray, unseen_group: int) -> np.ndarray:
    """The unseen row's query mask: that group's images query; every other group's images are the references."""
    return np.asarray(groups) == unseen_group


# ---------------------------------------------------------------------------- the protocols
@dataclass(frozen=True)
class ReportRow:
    """One row of metrics a protocol reports, known before anything is embedded."""

    ks: tuple[int, ...]  # its Recall@K list: the protocol's Ks that its reference set can answer
    references: int  # references a query is ranked against (Ks above it are dropped)
    scores: tuple[str, ...]  # its score keys (higher is better); the num_* counts come besides them
    excludes_own_group: bool = False  # a query never retrieves images of its own group


def _usable_ks(ks: tuple[int, ...], num_references: int) -> tuple[int, ...]:
    """The protocol's Ks that the reference set can answer; a small user dataset drops the rest."""
    return tuple(k for k in ks if k <= num_references) or (1,)


def _row(spec: EvaluationSpec, references: int, with_nmi: bool, *, spread: bool = False,
         excludes_own_group: bool = False) -> ReportRow:
    ks = _usable_ks(spec.recall_ks, references)
    scores = score_keys(ks, with_nmi)
    if spread:  # VehicleID's standard protocol also reports each score's spread over its draws
        scores = tuple(name for key in scores for name in (key, f"{key}_std"))
    return ReportRow(ks, references, scores, excludes_own_group)


class EvaluationProtocol:
    """How a dataset's test data (or one named split) is evaluated.

    ``splits`` is what :meth:`splits_to_embed` chose; :meth:`report_rows` names the rows and their
    Recall@K lists before anything is embedded, and :meth:`evaluate` computes exactly those rows
    (embeddings L2-normalised first: the method evaluates normalised embeddings).
    """

    def __init__(self, name: str, description: str):
        self.name = name
        self.description = description

    def splits_to_embed(self, spec: EvaluationSpec) -> tuple[str, ...]:
        return tuple(spec.splits)

    def report_rows(self, dataset: Dataset, splits: tuple[str, ...], with_nmi: bool) -> dict[str, ReportRow]:
        raise NotImplementedError

    def evaluate(self, dataset: Dataset, splits: tuple[str, ...], embed: Embed, rows: dict[str, ReportRow], *,
                 with_nmi: bool, seed: int) -> dict[str, Metrics]:
        raise NotImplementedError


class LeaveOneOut(EvaluationProtocol):
    """Every image of one split queries all the others; where the split has groups, also a row
    that never retrieves the query's own group (cross-group)."""

    def splits_to_embed(self, spec: EvaluationSpec) -> tuple[str, ...]:
        return tuple(spec.splits[:1])

    def report_rows(self, dataset, splits, with_nmi):
        (chosen,) = (dataset.split(name) for name in splits)
        spec, references = dataset.evaluation, chosen.num_images - 1
        rows = {LEAVE_ONE_OUT_ROW: _row(spec, references, with_nmi)}
        if chosen.groups is not None:
            rows[CROSS_GROUP_ROW] = _row(spec, references, with_nmi, excludes_own_group=True)
            # Only the evaluation splits keep the held-out group's images (validation has none).
            if spec.unseen_group is not None and chosen.name in spec.splits:
                others = int((~unseen_group_queries(chosen.groups, spec.unseen_group)).sum())
                # No NMI: clustering does not depend on which images query (leave-one-out reports it).
                rows[UNSEEN_GROUP_ROW] = _row(spec, others, False, excludes_own_group=True)
        return rows

    def evaluate(self, dataset, splits, embed, rows, *, with_nmi, seed):
        (chosen,) = (dataset.split(name) for name in splits)
        ks = rows[LEAVE_ONE_OUT_ROW].ks
        x = l2_normalize(embed(chosen))
        if chosen.groups is not None:
            metrics = leave_one_out_and_cross_group(x, chosen.labels, chosen.groups, ks=ks, with_nmi=with_nmi, seed=seed)
            if UNSEEN_GROUP_ROW in rows:
                queries = unseen_group_queries(chosen.groups, dataset.evaluation.unseen_group)
                metrics[UNSEEN_GROUP_ROW] = retrieval_metrics(x, chosen.labels, ks=rows[UNSEEN_GROUP_ROW].ks, query_mask=queries)
            return metrics
        return {LEAVE_ONE_OUT_ROW: evaluate_embeddings(x, chosen.labels, ks=ks, with_nmi=with_nmi, seed=seed)}


class QueryGallery(EvaluationProtocol):
    """A query split searched against a gallery split (In-shop): the splits are (query, gallery)."""

    def report_rows(self, dataset, splits, with_nmi):
        _, gallery = splits
        return {QUERY_GALLERY_ROW: _row(dataset.evaluation, dataset.split(gallery).num_images, with_nmi)}

    def evaluate(self, dataset, splits, embed, rows, *, with_nmi, seed):
        query, gallery = (dataset.split(name) for name in splits)
        x = l2_normalize(np.concatenate([embed(query), embed(gallery)]))
        labels = np.concatenate([query.labels, gallery.labels])
        mask = np.zeros(len(labels), dtype=bool)
        mask[: query.num_images] = True
        ks = rows[QUERY_GALLERY_ROW].ks
        return {QUERY_GALLERY_ROW: evaluate_embeddings(x, labels, ks=ks, query_mask=mask, with_nmi=with_nmi, seed=seed)}


class VehicleID(EvaluationProtocol):
    """Per test split: the standard protocol (random galleries of one image per vehicle, mean and
    spread) and leave-one-out, both without NMI and with the Ks one gallery image per vehicle allows."""

    def report_rows(self, dataset, splits, with_nmi):
        rows: dict[str, ReportRow] = {}
        for name in splits:
            test = dataset.split(name)
            standard = rows[f"{name}/{STANDARD_ROW}"] = _row(dataset.evaluation, len(np.unique(test.labels)), False, spread=True)
            rows[f"{name}/{LEAVE_ONE_OUT_ROW}"] = ReportRow(standard.ks, test.num_images - 1, score_keys(standard.ks, False))
        return rows

    def evaluate(self, dataset, splits, embed, rows, *, with_nmi, seed):
        metrics: dict[str, Metrics] = {}
        for name in splits:
            test = dataset.split(name)
            ks = rows[f"{name}/{STANDARD_ROW}"].ks
            x = l2_normalize(embed(test))
            metrics[f"{name}/{STANDARD_ROW}"] = vehicleid_standard(x, test.labels, ks=ks, seed=seed)
            metrics[f"{name}/{LEAVE_ONE_OUT_ROW}"] = vehicleid_leave_one_out(x, test.labels, ks=ks)
        return metrics


#: Every protocol by the name datasets declare it under (``EvaluationSpec.protocol``) and
#: ``evaluation.protocol`` accepts.
PROTOCOLS: dict[str, EvaluationProtocol] = {
    protocol.name: protocol
    for protocol in (
        LeaveOneOut(Protocol.LEAVE_ONE_OUT.value, "every test image queries all the others"),
        QueryGallery(Protocol.QUERY_GALLERY.value, "query images searched against a gallery split"),
        VehicleID(Protocol.VEHICLEID.value, "VehicleID's random galleries of one image per vehicle, and leave-one-out"),
        LeaveOneOut(Protocol.CROSS_GROUP.value, "leave-one-out, and never retrieving the query's own group"),
    )
}

#: What ``split=NAME`` evaluates: that split alone, leave-one-out (and cross-group where it has groups).
ONE_SPLIT = PROTOCOLS[Protocol.LEAVE_ONE_OUT.value]


def protocol_names() -> tuple[str, ...]:
    return tuple(PROTOCOLS)


def protocol_of(spec: EvaluationSpec) -> EvaluationProtocol:
    """The protocol a dataset's evaluation spec names."""
    name = spec.protocol.value if isinstance(spec.protocol, Protocol) else spec.protocol
    if name not in PROTOCOLS:
        raise ValueError(f"no evaluation for protocol {spec.protocol}")
    return PROTOCOLS[name]

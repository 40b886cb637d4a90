"""Evaluate a dataset's test data under its own protocol, given a way to embed a split.

Callers (zero-shot evaluation, training) pass ``embed(split) -> (N x D array)`` and get named rows
of metrics back; which splits each protocol uses and what it reports is
:mod:`dcml.evaluation.protocols`.
"""

from __future__ import annotations

import warnings

from dcml.backends import DEFAULT_KMEANS_SEED
from dcml.data.records import Dataset
from dcml.evaluation.protocols import ONE_SPLIT, Embed, EvaluationProtocol, Metrics, ReportRow, protocol_of

__all__ = ["Embed", "Metrics", "ReportRow", "evaluate_dataset", "format_table", "report_rows", "splits_to_embed"]


def _protocol(dataset: Dataset, split: str | None) -> tuple[EvaluationProtocol, tuple[str, ...]]:
    """The protocol to run and its splits: the dataset's own, or ``split`` alone evaluated leave-one-out."""
    if split is not None:
        return ONE_SPLIT, (split,)
    protocol = protocol_of(dataset.evaluation)
    return protocol, protocol.splits_to_embed(dataset.evaluation)


def report_rows(dataset: Dataset, split: str | None = None, with_nmi: bool = True) -> dict[str, ReportRow]:
    """Name -> :class:`ReportRow` of every row :func:`evaluate_dataset` returns for the same arguments.

    :func:`evaluate_dataset` takes its row names and Recall@K lists from here, so a check made
    before training (the selection metric) sees exactly the names the evaluation will produce.
    """
    protocol, splits = _protocol(dataset, split)
    return protocol.report_rows(dataset, splits, with_nmi)


def _warn_dropped_ks(ks: tuple[int, ...], rows: dict[str, ReportRow]) -> None:
    for references in sorted({r.references for r in rows.values() if r.ks != ks}):
        dropped = ", ".join(str(k) for k in ks if k > references)
        if dropped:
            warnings.warn(f"Recall@{dropped} skipped: only {references} references per query", stacklevel=3)


def splits_to_embed(dataset: Dataset, split: str | None = None) -> tuple[str, ...]:
    """The splits :func:`evaluate_dataset` embeds for the same arguments (embed them ahead, e.g. in shards)."""
    return _protocol(dataset, split)[1]


def evaluate_dataset(
    dataset: Dataset,
    embed: Embed,
    *,
    split: str | None = None,
    with_nmi: bool = True,
    seed: int = DEFAULT_KMEANS_SEED,
) -> dict[str, Metrics]:
    """Metrics rows named by protocol, e.g. {"leave_one_out": M} (row names: :mod:`dcml.evaluation.protocols`).

    Embeddings are L2-normalised before ranking (the method evaluates normalised embeddings).
    ``split`` overrides the protocol's test split(s) with one split evaluated leave-one-out (and
    cross-group where the dataset has groups), e.g. the emoji validation split. The rows and their
    Recall@K lists are those of :func:`report_rows`.
    """
    protocol, splits = _protocol(dataset, split)
    plan = protocol.report_rows(dataset, splits, with_nmi)
    _warn_dropped_ks(dataset.evaluation.recall_ks, plan)
    return protocol.evaluate(dataset, splits, embed, plan, with_nmi=with_nmi, seed=seed)


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

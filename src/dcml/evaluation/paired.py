"""Is model A better than model B on the same test data? Per-query scores and a paired bootstrap.

Two models evaluated on the same queries give paired scores: per query, whether its nearest
reference is a positive (hit@1; their mean is Recall@1) and its average precision at R (the mean
is MAP@R). The difference of the means is the difference of the reported metrics; its uncertainty
comes from which test classes happened to be drawn. The queries of one class are not independent
(they retrieve each other and share the same gallery images), so the bootstrap resamples whole
classes with replacement and keeps each class's queries together. It needs no extra training, so
it is cheap; it says nothing about the spread across training seeds, which only more runs measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcml.errors import UserError
from dcml.evaluation.metrics import MAP_AT_R, recall_key, retrieval_ranks

#: The per-query scores whose means are the reported Recall@1 and MAP@R.
PAIRED_METRICS = (recall_key(1), MAP_AT_R)
#: Upper end of ``resamples``: far beyond what a percentile interval needs, and bounded so a typo
#: cannot start an hour-long loop.
MAX_RESAMPLES = 1_000_000


@dataclass(frozen=True)
class QueryScores:
    """The queries that count (at least one positive reference) with one score array per metric.

    ``rows``: their row indices in the evaluated array; ``classes``: their labels; ``scores``:
    metric key (:data:`PAIRED_METRICS`) -> one float per query, in the order of ``rows``.
    """

    rows: np.ndarray
    classes: np.ndarray
    scores: dict[str, np.ndarray]

    def mean(self, metric: str) -> float:
        """The metric as :func:`~dcml.evaluation.metrics.summarize_ranks` reports it."""
        return float(self.scores[metric].mean()) if len(self.rows) else float("nan")


def query_scores(embeddings: np.ndarray, labels: np.ndarray, *, groups: np.ndarray | None = None,
                 query_mask: np.ndarray | None = None, kernel: str = "auto") -> QueryScores:
    """Hit@1 and AP@R of every query, leave-one-out (every row queries all others).

    With ``groups`` a query never retrieves a row of its own group (emoji's cross-vendor protocol).
    Computed by the same rank engine as the reported metrics, so their means equal Recall@1 and
    MAP@R exactly; queries without a positive are left out, as the metrics leave them out.
    """
    # Recall@1 needs only the nearest positive's rank; AP@R does not depend on the rank cap.
    ranks = retrieval_ranks(embeddings, labels, max_k=1, groups=groups, query_mask=query_mask, kernel=kernel)
    # Row indices of the evaluated array: with a query mask the rank engine numbers the queries only.
    query_rows = np.arange(len(labels)) if query_mask is None else np.flatnonzero(query_mask)
    kept = np.flatnonzero(ranks.num_positives > 0)
    rows = query_rows[kept]
    hits = (ranks.first_rank[kept] == 1).astype(np.float64)
    return QueryScores(rows=rows, classes=np.asarray(labels)[rows],
                       scores={recall_key(1): hits, MAP_AT_R: ranks.average_precision_at_r[kept].astype(np.float64)})


def protocol_query_scores(embeddings: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                          unseen_group: int | None = None) -> dict[str, QueryScores]:
    """The emoji protocols' per-query scores, named as the metric rows are (the unseen row when
    ``unseen_group`` names the group training never saw)."""
    from dcml.evaluation.protocols import CROSS_GROUP_ROW, LEAVE_ONE_OUT_ROW, UNSEEN_GROUP_ROW, unseen_group_queries

    scores = {CROSS_GROUP_ROW: query_scores(embeddings, labels, groups=groups),
              LEAVE_ONE_OUT_ROW: query_scores(embeddings, labels)}
    if unseen_group is not None:
        scores[UNSEEN_GROUP_ROW] = query_scores(embeddings, labels, query_mask=unseen_group_queries(groups, unseen_group))
    return scores


@dataclass(frozen=True)
class PairedDifference:
    """mean(A) - mean(B) over the same queries, with a percentile bootstrap interval over classes."""

    difference: float
    low: float
    high: float
    level: float
    resamples: int
    classes: int
    queries: int

    @property
    def distinguishable(self) -> bool:
        """Whether the interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {"difference": self.difference, "low": self.low, "high": self.high, "level": self.level,
                "resamples": self.resamples, "classes": self.classes, "queries": self.queries,
                "distinguishable": self.distinguishable}


def _check_bootstrap_inputs(scores_a: np.ndarray, scores_b: np.ndarray, query_classes: np.ndarray,
                            resamples: int, level: float) -> None:
    if scores_a.ndim != 1 or scores_a.shape != scores_b.shape or scores_a.shape != query_classes.shape:
        raise UserError(f"paired scores need two 1-D arrays and classes of one length: got shapes "
                        f"{scores_a.shape}, {scores_b.shape}, {query_classes.shape}")
    if len(scores_a) == 0:
        raise UserError("paired scores are empty: no query to compare")
    if not (np.isfinite(scores_a).all() and np.isfinite(scores_b).all()):
        raise UserError("paired scores contain NaN or infinite values")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or not 1 <= resamples <= MAX_RESAMPLES:
        raise UserError(f"resamples must be an integer in 1..{MAX_RESAMPLES}, got {resamples!r}")
    if not 0.0 < level < 1.0:
        raise UserError(f"level must lie strictly between 0 and 1, got {level!r}")


def paired_class_bootstrap(scores_a: np.ndarray, scores_b: np.ndarray, query_classes: np.ndarray, *,
                           resamples: int = 2000, seed: int = 0, level: float = 0.95) -> PairedDifference:
    """mean(scores_a - scores_b) and its ``level`` percentile interval, resampling test classes.

    Each resample draws as many classes as there are, with replacement (resample r takes the
    classes ``rng.integers(0, C, size=C)`` of the sorted class list, ``rng = default_rng(seed)``),
    and averages the differences of every query of every drawn class, a class drawn twice counting
    twice. So each resample is the statistic the metric would report on that draw of classes.
    """
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    classes = np.asarray(query_classes)
    _check_bootstrap_inputs(a, b, classes, resamples, level)
    difference = a - b
    _, class_of_query = np.unique(classes, return_inverse=True)
    class_of_query = class_of_query.reshape(-1)
    num_classes = int(class_of_query.max()) + 1
    # A resample's mean is (sum over drawn classes of their difference sums) / (their query counts).
    class_sums = np.bincount(class_of_query, weights=difference, minlength=num_classes)
    class_sizes = np.bincount(class_of_query, minlength=num_classes).astype(np.float64)
    rng = np.random.default_rng(seed)
    statistics = np.empty(resamples, np.float64)
    for r in range(resamples):
        times_drawn = np.bincount(rng.integers(0, num_classes, size=num_classes), minlength=num_classes)
        statistics[r] = (times_drawn @ class_sums) / (times_drawn @ class_sizes)
    tail = (1.0 - level) / 2
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    return PairedDifference(difference=float(difference.mean()), low=float(low), high=float(high), level=float(level),
                            resamples=int(resamples), classes=num_classes, queries=len(difference))


def paired_differences(a: QueryScores, b: QueryScores, *, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> dict[str, PairedDifference]:
    """A minus B for every metric of :data:`PAIRED_METRICS`; both must score the same queries."""
    if not (np.array_equal(a.rows, b.rows) and np.array_equal(a.classes, b.classes)):
        raise UserError("paired scores must come from the same queries (same rows and labels in both)")
    return {metric: paired_class_bootstrap(a.scores[metric], b.scores[metric], a.classes,
                                           resamples=resamples, seed=seed, level=level)
            for metric in PAIRED_METRICS}

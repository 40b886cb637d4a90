"""Per-query scores and the paired class bootstrap, checked against obvious loops."""

from __future__ import annotations

import numpy as np
import pytest

from dcml.errors import UserError
from dcml.evaluation.metrics import retrieval_metrics
from dcml.evaluation.paired import (PairedDifference, QueryScores, paired_class_bootstrap, paired_differences, protocol_query_scores,
                                    query_scores)


def loop_query_scores(x: np.ndarray, labels: np.ndarray, groups: np.ndarray | None):
    """Per query: sort the other rows (outside its group) by (distance, index); hit@1 and AP@R."""
    x = np.asarray(x, dtype=np.float64)
    rows, hits, aps = [], [], []
    for q in range(len(x)):
        refs = np.array([r for r in range(len(x)) if r != q and (groups is None or groups[r] != groups[q])], dtype=np.int64)
        ranked = refs[np.argsort(((x[refs] - x[q]) ** 2).sum(1), kind="stable")]
        relevant = labels[ranked] == labels[q]
        big_r = int(relevant.sum())
        if big_r == 0:
            continue
        precision = np.cumsum(relevant[:big_r]) / np.arange(1, big_r + 1)
        rows.append(q)
        hits.append(float(relevant[0]))
        aps.append(float((precision * relevant[:big_r]).sum() / big_r))
    return np.array(rows), np.array(hits), np.array(aps)


def loop_bootstrap(a, b, classes, resamples, seed, level):
    """Draw classes, gather every query of every drawn class, average its differences; percentiles."""
    names = np.unique(classes)
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(names), size=len(names))
        differences = []
        for c in drawn:
            for q in range(len(a)):
                if classes[q] == names[c]:
                    differences.append(a[q] - b[q])
        means.append(sum(differences) / len(differences))
    tail = (1 - level) / 2
    return float(np.mean(a - b)), *np.quantile(means, [tail, 1 - tail])


def synthetic_split(seed: int, classes: int = 12, groups: int = 3):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), rng.integers(1, 6, size=classes))
    x = rng.normal(size=(len(labels), 5)) + 1.5 * rng.normal(size=(classes, 5))[labels]
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels, rng.integers(0, groups, size=len(labels))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grouped", [False, True])
def test_query_scores_match_a_loop_and_average_to_the_reported_metrics(seed, grouped):
    x, labels, groups = synthetic_split(seed)
    groups = groups if grouped else None
    scores = query_scores(x, labels, groups=groups)
    rows, hits, aps = loop_query_scores(x, labels, groups)
    assert np.array_equal(scores.rows, rows) and np.array_equal(scores.classes, labels[rows])
    assert np.array_equal(scores.scores["recall@1"], hits)
    np.testing.assert_allclose(scores.scores["map@r"], aps, rtol=0, atol=1e-12)
    reported = retrieval_metrics(x, labels, ks=(1, 2, 4, 8), groups=groups)
    # Exactly the reported numbers, not just close: the demo prints both side by side.
    assert scores.mean("recall@1") == reported["recall@1"] and scores.mean("map@r") == reported["map@r"]
    assert len(rows) == reported["num_queries"]


def test_cross_vendor_scores_never_use_the_query_s_own_group():
    # Two classes, each drawn by two vendors; a query's nearest row is its own vendor's other class,
    # the next its own class by the other vendor.
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 2.0]])
    labels, groups = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    both = protocol_query_scores(x, labels, groups)
    assert np.array_equal(both["leave_one_out"].scores["recall@1"], [0, 0, 0, 0])
    assert np.array_equal(both["cross_vendor"].scores["recall@1"], [1, 1, 1, 1])


@pytest.mark.parametrize("seed", [0, 3])
def test_bootstrap_matches_a_loop(seed):
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 7, size=30) * 10  # labels need not be 0..C-1
    a, b = rng.random(30), rng.random(30)
    result = paired_class_bootstrap(a, b, classes, resamples=200, seed=seed, level=0.9)
    difference, low, high = loop_bootstrap(a, b, classes, 200, seed, 0.9)
    assert result.difference == pytest.approx(difference, abs=1e-12)
    assert result.low == pytest.approx(low, abs=1e-12) and result.high == pytest.approx(high, abs=1e-12)
    assert result.classes == 7 and result.queries == 30 and result.low <= result.difference <= result.high


def test_identical_scores_give_a_zero_interval():
    rng = np.random.default_rng(0)
    a = rng.random(50)
    result = paired_class_bootstrap(a, a.copy(), rng.integers(0, 9, size=50))
    assert (result.difference, result.low, result.high) == (0.0, 0.0, 0.0)
    assert not result.distinguishable


def _shifted_scores(rng, shift: float, classes: int = 80):
    """Query differences = shift + a class effect shared by its queries + query noise."""
    sizes = rng.integers(1, 12, size=classes)
    labels = np.repeat(np.arange(classes), sizes)
    b = rng.random(len(labels))
    a = b + shift + rng.normal(0, 0.3, size=classes)[labels] + rng.normal(0, 0.05, size=len(labels))
    return a, b, labels


def test_interval_covers_a_known_shift_at_about_its_level():
    # The class effect dominates, so queries are far from independent: resampling single queries
    # would cover the shift much less often than 95%.
    rng = np.random.default_rng(7)
    covered = []
    for _ in range(100):
        a, b, labels = _shifted_scores(rng, shift=0.1)
        result = paired_class_bootstrap(a, b, labels, resamples=400, seed=int(rng.integers(2**31)))
        covered.append(result.low <= 0.1 <= result.high)
    assert 0.88 <= np.mean(covered) <= 1.0


def test_a_large_shift_is_distinguishable_and_no_shift_usually_is_not():
    rng = np.random.default_rng(1)
    a, b, labels = _shifted_scores(rng, shift=0.5)
    assert paired_class_bootstrap(a, b, labels).distinguishable
    a, b, labels = _shifted_scores(rng, shift=0.0)
    result = paired_class_bootstrap(a, b, labels)
    assert result.low < 0 < result.high and not result.distinguishable
    assert paired_class_bootstrap(b, a, labels).difference == pytest.approx(-result.difference)


def test_same_seed_same_interval_and_wider_at_a_higher_level():
    rng = np.random.default_rng(2)
    a, b, labels = _shifted_scores(rng, shift=0.0)
    assert paired_class_bootstrap(a, b, labels, seed=5) == paired_class_bootstrap(a, b, labels, seed=5)
    narrow, wide = (paired_class_bootstrap(a, b, labels, level=level) for level in (0.5, 0.99))
    assert wide.low < narrow.low and narrow.high < wide.high


def test_paired_differences_per_metric_and_refuses_other_queries():
    x, labels, groups = synthetic_split(0)
    first = query_scores(x, labels, groups=groups)
    noisy = query_scores(x + np.random.default_rng(0).normal(0, 0.5, size=x.shape), labels, groups=groups)
    differences = paired_differences(noisy, first)
    assert set(differences) == {"recall@1", "map@r"}
    for metric, difference in differences.items():
        assert isinstance(difference, PairedDifference)
        assert difference.difference == pytest.approx(noisy.mean(metric) - first.mean(metric), abs=1e-12)
    assert paired_differences(first, first)["map@r"].to_dict()["distinguishable"] is False
    fewer = QueryScores(rows=first.rows[1:], classes=first.classes[1:], scores={k: v[1:] for k, v in first.scores.items()})
    with pytest.raises(UserError, match="same queries"):
        paired_differences(first, fewer)


@pytest.mark.parametrize("kwargs, message", [
    ({"resamples": 0}, "resamples"), ({"resamples": True}, "resamples"), ({"level": 1.0}, "level"), ({"level": 0}, "level"),
])
def test_bootstrap_refuses_bad_settings_in_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        paired_class_bootstrap(np.zeros(3), np.zeros(3), np.arange(3), **kwargs)


def test_bootstrap_refuses_mismatched_or_non_finite_scores():
    with pytest.raises(UserError, match="one length"):
        paired_class_bootstrap(np.zeros(3), np.zeros(4), np.arange(3))
    with pytest.raises(UserError, match="NaN"):
        paired_class_bootstrap(np.array([0.0, np.nan]), np.zeros(2), np.arange(2))
    with pytest.raises(UserError, match="empty"):
        paired_class_bootstrap(np.zeros(0), np.zeros(0), np.zeros(0, np.int64))

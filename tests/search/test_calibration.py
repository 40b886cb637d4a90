"""Calibration against a slow reference, dedup groups, grids."""

from __future__ import annotations

import numpy as np
import pytest

from dcml.errors import UserError
from dcml.search import calibration as cal
from dcml.search.dedup import duplicate_groups, duplicates_by_file


def _pairs(seed=0, n=600):
    rng = np.random.default_rng(seed)
    matches = rng.random(n) < 0.3
    distances = np.where(matches, rng.normal(0.6, 0.2, n), rng.normal(1.1, 0.2, n)).round(2)  # rounding makes ties
    return distances, matches


def _slow_precision_threshold(distances, matches, target):
    best = None
    for t in sorted(set(distances.tolist())):
        accepted = distances <= t
        precision = matches[accepted].mean()
        if precision >= target:
            best = t
    return best


def _slow_f1(distances, matches):
    best, best_f1 = None, -1.0
    for t in sorted(set(distances.tolist())):
        accepted = distances <= t
        tp = (accepted & matches).sum()
        precision, recall = tp / accepted.sum(), tp / matches.sum()
        f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
        if f1 > best_f1 + 1e-15:
            best, best_f1 = t, f1
    return best, best_f1


def _slow_fnmr_at_fmr(distances, matches, target):
    chosen = None
    for t in sorted(set(distances.tolist())):
        if ((distances <= t) & ~matches).sum() / (~matches).sum() <= target:
            chosen = t
    if chosen is None:
        return None, 1.0
    return chosen, 1 - ((distances <= chosen) & matches).sum() / matches.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_match_a_slow_reference(seed):
    distances, matches = _pairs(seed)
    op = cal.operating_points(distances, matches)
    for target in (0.8, 0.9, 0.95, 0.99):
        point = cal.threshold_for_precision(op, target)
        expected = _slow_precision_threshold(distances, matches, target)
        assert (point is None and expected is None) or point["distance"] == expected
    f1 = cal.f1_optimal_threshold(op)
    expected_t, expected_f1 = _slow_f1(distances, matches)
    assert f1["distance"] == expected_t and f1["f1"] == pytest.approx(expected_f1)
    for row in cal.fnmr_at_fmr(op, (0.1, 0.01, 0.001)):
        t, fnmr = _slow_fnmr_at_fmr(distances, matches, row["fmr_target"])
        assert row["distance"] == t and row["fnmr"] == pytest.approx(fnmr)


def test_pair_distances_are_every_pair():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3, 0])
    distances, matches = cal.pair_distances(x, labels)
    assert len(distances) == 36 and matches.sum() == 3 + 3 + 1
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert distances[0] == pytest.approx(np.linalg.norm(unit[0] - unit[1]))
    report, op = cal.calibrate(x, labels)
    assert set(report["thresholds"]) == {"precision@0.9", "precision@0.95", "precision@0.99", "f1"}
    assert op.positives == 7


def test_resolve_threshold():
    calibration = {"thresholds": {"precision@0.95": {"distance": 0.5}, "precision@0.99": None}}
    assert cal.resolve_threshold("precision@0.95", calibration) == ("precision@0.95", 0.5)
    assert cal.resolve_threshold("0.7", None)[1] == 0.7
    for spec, calib in (("precision@0.99", calibration), ("f1", calibration), ("precision@0.9", None), ("-1", None)):
        with pytest.raises(UserError):
            cal.resolve_threshold(spec, calib)


def test_single_class_is_a_one_line_error():
    with pytest.raises(UserError, match="non-matching"):
        cal.operating_points(np.array([0.1, 0.2]), np.array([True, True]))


def test_dedup_groups_are_connected_components():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 8)).astype(np.float32) * 10
    x = np.concatenate([base, base[[0]] + 0.001, base[[0]] + 0.002, base[[3]] + 0.001])
    groups = duplicate_groups(x, 0.01)
    assert groups == [[0, 6, 7], [3, 8]]
    assert duplicates_by_file([f"f{i}" for i in range(9)], groups) == {"f0": ["f6", "f7"], "f3": ["f8"]}
    assert duplicate_groups(x, 0.0) == []


def test_worst_queries_grid(tmp_path):
    from PIL import Image

    from dcml.search.grid import worst_queries, worst_queries_grid

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 3)
    x = (np.eye(4)[labels] + 0.05 * rng.normal(size=(12, 4))).astype(np.float32)
    x[5] = np.eye(4)[3]  # a class-1 image that sits among class 3: the worst query
    chosen, ap = worst_queries(x, labels, 2)
    assert chosen[0] == 5 and ap[0] <= ap[1]
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 30), (20 * i, 0, 0)).save(paths[-1])
    out = worst_queries_grid(tmp_path / "worst.png", x, labels, paths, count=3, k=4, thumb=32)
    image = Image.open(out)
    assert image.size[1] > 3 * 32 and image.size[0] > 5 * 32
    # The worst query's first result is of another class: its border is red.
    from dcml.search.grid import GREEN, RED

    pixels = np.array(image)
    assert (pixels == RED).all(-1).any() and (pixels == GREEN).all(-1).any()

import numpy as np
import pytest
from reference import reference_retrieval

from dcml.evaluation.protocols import (
    leave_one_out_and_cross_group,
    vehicleid_gallery_mask,
    vehicleid_leave_one_out,
    vehicleid_standard,
)


def test_vehicleid_gallery_has_one_image_per_vehicle():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), rng.integers(2, 7, 20))
    mask = vehicleid_gallery_mask(labels, rng)
    gallery = labels[~mask]
    assert sorted(gallery) == list(range(20))
    assert mask.sum() == len(labels) - 20


def test_vehicleid_standard_is_the_mean_over_random_galleries():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(15), 4)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    result = vehicleid_standard(x, labels, ks=(1, 5), repeats=3, seed=7)
    draws = np.random.default_rng(7)
    expected = np.mean(
        [reference_retrieval(x, labels, (1, 5), query_mask=vehicleid_gallery_mask(labels, draws))["recall@1"] for _ in range(3)]
    )
    assert result["recall@1"] == pytest.approx(expected, abs=1e-12)
    assert result["repeats"] == 3 and "recall@1_std" in result
    assert vehicleid_standard(x, labels, ks=(1, 5), repeats=3, seed=7) == result  # seeded


def test_vehicleid_leave_one_out_is_plain_leave_one_out():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(10), 3)
    x = rng.integers(-3, 4, (30, 3)).astype(np.float32)
    got = vehicleid_leave_one_out(x, labels, ks=(1, 5))
    assert got["recall@5"] == pytest.approx(reference_retrieval(x, labels, (1, 5))["recall@5"], abs=1e-12)


def test_cross_group_never_retrieves_the_same_vendor():
    # Two vendors; each class drawn twice by vendor 0 (identical) and once by vendor 1 (far away).
    labels = np.array([0, 0, 0, 1, 1, 1])
    groups = np.array([0, 0, 1, 0, 0, 1])
    x = np.array([[0, 0], [0, 0], [3, 0], [10, 10], [10, 10], [13, 10]], dtype=np.float32)
    result = leave_one_out_and_cross_group(x, labels, groups, ks=(1,), with_nmi=False)
    assert result["leave_one_out"]["recall@1"] == 1.0
    cross = result["cross_vendor"]
    assert cross["recall@1"] == 1.0  # the other vendor's drawing of the same class is the nearest allowed
    assert cross["num_queries"] == 6
    assert cross["map@r"] < result["leave_one_out"]["map@r"] or cross["map@r"] == 1.0

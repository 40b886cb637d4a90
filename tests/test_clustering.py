"""Clustering for the divide phase: Hungarian matching, k-means units, singletons, repair, hierarchy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dcml.clustering import (
    Clustering,
    cluster_training_set,
    match_clusters,
    split_clusters,
)
from dcml.errors import UserError

BACKENDS = ("faiss", "torch")
UNITS = ("image", "class")


def overlap(a, b):
    return int((np.asarray(a) == np.asarray(b)).sum())


def same_partition(a, b):
    """True when b is a relabelling of a (a bijection between their labels)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def blobs(rng, num_blobs, classes_per_blob, images_per_class, dim=8, spread=0.05):
    """Classes grouped into far-apart blobs; returns (features, labels, blob of every image)."""
    centres = np.eye(dim, dtype=np.float32)[:num_blobs] * 10
    blob_of_class = np.repeat(np.arange(num_blobs), classes_per_blob)
    labels = np.repeat(np.arange(len(blob_of_class)), images_per_class)
    blob = blob_of_class[labels]
    features = centres[blob] + spread * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return features, labels, blob


# ---- match_clusters -------------------------------------------------------------------------------


def test_three_cycle_is_undone_and_the_inverse_mistake_is_not():
    previous = np.repeat(np.arange(3), 4)
    new = (previous + 1) % 3
    matched = match_clusters(previous, new)
    np.testing.assert_array_equal(matched, previous)
    assert matched.dtype == np.int64
    # The authors applied the inverse permutation: new label -> inverse(mapping)[new label].
    mapping = np.empty(3, dtype=np.int64)
    mapping[new] = matched
    inverse = np.argsort(mapping)
    assert not np.array_equal(inverse[new], previous)


def test_random_permutations_are_recovered_exactly():
    rng = np.random.default_rng(0)
    for num_clusters in (2, 3, 7, 16, 32):
        previous = rng.integers(0, num_clusters, 400)
        permutation = rng.permutation(num_clusters)
        np.testing.assert_array_equal(match_clusters(previous, permutation[previous]), previous)


def test_noisy_permutations_reach_the_brute_force_optimum():
    rng = np.random.default_rng(1)
    for num_clusters in (2, 3, 4, 5):
        for _ in range(3):
            previous = rng.integers(0, num_clusters, 60)
            new = rng.permutation(num_clusters)[previous]
            noisy = rng.random(len(new)) < 0.1
            new[noisy] = rng.integers(0, num_clusters, noisy.sum())
            matched = match_clusters(previous, new)
            best = max(overlap(np.array(p)[new], previous) for p in itertools.permutations(range(num_clusters)))
            assert overlap(matched, previous) == best
            # A relabelling: same partition as new, labels mapped one to one.
            assert len(set(zip(new.tolist(), matched.tolist()))) == len(np.unique(new))


def test_match_clusters_validates_its_input():
    with pytest.raises(ValueError, match="length"):
        match_clusters(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="non-negative"):
        match_clusters(np.array([0, -1]), np.array([0, 1]))


# ---- cluster_training_set -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unit", UNITS)
def test_separated_blobs_are_recovered(backend, unit):
    features, labels, blob = blobs(np.random.default_rng(2), num_blobs=3, classes_per_blob=4, images_per_class=5)
    result = cluster_training_set(features, labels, 3, unit=unit, backend=backend, iterations=20)
    assert result.assignment.dtype == np.int64 and result.num_clusters == 3
    assert same_partition(blob, result.assignment)
    assert result.usable.all()
    np.testing.assert_array_equal(result.cluster_sizes(), [20, 20, 20])
    np.testing.assert_array_equal(result.classes_per_cluster(), [4, 4, 4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_unit_never_splits_a_class(backend):
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(12), 6)
    features = rng.standard_normal((len(labels), 4)).astype(np.float32)  # no structure: image k-means would split
    result = cluster_training_set(features, labels, 3, unit="class", backend=backend, iterations=10)
    for label in range(12):
        assert len(np.unique(result.assignment[labels == label])) == 1
    image_unit = cluster_training_set(features, labels, 3, unit="image", backend=backend, iterations=10)
    assert any(len(np.unique(image_unit.assignment[labels == label])) > 1 for label in range(12))


def test_single_images_inside_a_cluster_are_unusable():
    features, labels, blob = blobs(np.random.default_rng(4), num_blobs=2, classes_per_blob=3, images_per_class=4)
    straddler = labels.max() + 1  # one image in each blob
    features = np.concatenate([features, features[[0, -1]] + 0.01])
    labels = np.concatenate([labels, [straddler, straddler]])
    lonely = labels.max() + 1  # a class with a single image in the whole training set
    features = np.concatenate([features, features[[1]]])
    labels = np.concatenate([labels, [lonely]])
    result = cluster_training_set(features, labels, 2, backend="faiss")
    assert not result.usable[labels == straddler].any()
    assert not result.usable[labels == lonely].any()
    assert result.usable[labels < straddler].all()
    np.testing.assert_array_equal(result.classes_per_cluster(), [3, 3])


def test_k_equal_one_puts_everything_in_cluster_zero():
    labels = np.array([0, 0, 1, 1, 1, 2])
    features = np.random.default_rng(5).standard_normal((6, 3)).astype(np.float32)
    result = cluster_training_set(features, labels, 1)
    np.testing.assert_array_equal(result.assignment, 0)
    np.testing.assert_array_equal(result.usable, labels != 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_previous_keeps_learners_on_their_regions(backend):
    features, labels, _ = blobs(np.random.default_rng(6), num_blobs=3, classes_per_blob=3, images_per_class=4)
    raw = cluster_training_set(features, labels, 3, backend=backend, iterations=20)
    for permutation in ([1, 2, 0], [2, 0, 1], [1, 0, 2]):  # as if the last clustering had named them differently
        previous = np.array(permutation)[raw.assignment]
        kept = cluster_training_set(features, labels, 3, backend=backend, iterations=20, previous=previous)
        np.testing.assert_array_equal(kept.assignment, previous)
        np.testing.assert_array_equal(kept.usable, raw.usable)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tiny_outlier_cluster_takes_the_nearest_class(backend):
    features, labels, _ = blobs(np.random.default_rng(7), num_blobs=1, classes_per_blob=6, images_per_class=4, dim=4)
    outlier_class, nearest_class = 6, 2
    features[labels == nearest_class] += np.array([0, 2, 0, 0], dtype=np.float32)  # toward the outlier
    features = np.concatenate([features, np.tile(np.array([[0, 10, 0, 0]], np.float32), (3, 1))])
    labels = np.concatenate([labels, np.full(3, outlier_class)])
    result = cluster_training_set(features, labels, 2, backend=backend, iterations=20)
    outlier_cluster = result.assignment[labels == outlier_class][0]
    classes_there = set(labels[result.assignment == outlier_cluster].tolist())
    assert classes_there == {outlier_class, nearest_class}
    np.testing.assert_array_equal(np.sort(result.classes_per_cluster()), [2, 5])
    # Deterministic: the same call gives the same clustering.
    again = cluster_training_set(features, labels, 2, backend=backend, iterations=20)
    np.testing.assert_array_equal(again.assignment, result.assignment)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unit", UNITS)
def test_identical_points_leave_no_learner_starved(backend, unit):
    labels = np.repeat(np.arange(9), 3)
    features = np.ones((len(labels), 5), dtype=np.float32)  # k-means cannot separate anything
    result = cluster_training_set(features, labels, 3, unit=unit, backend=backend, iterations=5)
    assert (result.classes_per_cluster() >= 2).all()
    assert result.usable.all()
    for label in range(9):  # repairs move whole classes
        assert len(np.unique(result.assignment[labels == label])) == 1


def test_repair_respects_a_larger_minimum():
    labels = np.repeat(np.arange(12), 2)
    features = np.ones((len(labels), 3), dtype=np.float32)
    result = cluster_training_set(features, labels, 3, backend="torch", iterations=3, min_classes_per_cluster=4)
    np.testing.assert_array_equal(result.classes_per_cluster(), [4, 4, 4])


def test_too_many_clusters_for_the_classes_is_a_user_error():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4])  # 4 classes with two images, one with a single image
    features = np.random.default_rng(8).standard_normal((9, 3)).astype(np.float32)
    with pytest.raises(UserError, match="too large"):
        cluster_training_set(features, labels, 3)
    assert cluster_training_set(features, labels, 2).classes_per_cluster().sum() == 4


def test_bad_settings_are_user_errors():
    features = np.ones((4, 2), np.float32)
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(UserError, match="unit"):
        cluster_training_set(features, labels, 1, unit="pixel")
    with pytest.raises(UserError, match="NaN"):
        cluster_training_set(np.full((4, 2), np.nan, np.float32), labels, 1)
    with pytest.raises(UserError, match="positive integer"):
        cluster_training_set(features, labels, 0)


def test_clustering_validates_its_fields():
    with pytest.raises(ValueError):
        Clustering(assignment=np.array([0, 2]), usable=np.array([True, True]), num_clusters=2)


# ---- hierarchical division ------------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS)
def test_children_are_subsets_of_their_parent(unit):
    features, labels, blob = blobs(np.random.default_rng(9), num_blobs=4, classes_per_blob=3, images_per_class=4)
    parents = blob // 2  # two blobs per parent: the 2-means should find them
    children = split_clusters(features, labels, parents, unit=unit, iterations=20)
    assert children.num_clusters == 4
    np.testing.assert_array_equal(children.assignment // 2, parents)
    assert same_partition(blob, children.assignment)
    assert (children.classes_per_cluster() >= 2).all()


def test_a_parent_too_small_to_split_is_repaired():
    features, labels, _ = blobs(np.random.default_rng(10), num_blobs=2, classes_per_blob=4, images_per_class=3)
    parents = np.where(labels == 0, 1, 0)  # parent 1 holds a single class: its split starves a child
    children = split_clusters(features, labels, parents, backend="torch", iterations=10)
    np.testing.assert_array_equal(children.classes_per_cluster(), [2, 2, 2, 2])


"""The "divide" step: split the training set into K clusters, one per learner.

Every (re-)clustering L2-normalises the features it is given (backbone features or embeddings, the
caller decides), runs k-means through :mod:`dcml.backends`, and returns a :class:`Clustering`.

Units. ``unit="image"`` (the paper) clusters every image's feature, so a class may straddle
clusters. ``unit="class"`` clusters the class means (mean of the normalised features, normalised
again) and gives every image its class's cluster, so a class never straddles two learners.

Singletons. Inside a cluster, a class with a single image has no positive pair there; such images
are marked not ``usable`` and are left out of batches until the next re-clustering (as the authors
did).

Degenerate clusterings (the repair rule). A learner whose cluster holds fewer than
``min_classes_per_cluster`` usable classes (a class is usable in a cluster when it has >= 2 images
there) would silently get no training signal, so every clustering is repaired before it is
returned:

1. Up front, if the training set has fewer than ``K * min_classes_per_cluster`` classes with at least
   two images, no clustering can satisfy every learner: :class:`~dcml.errors.UserError` (K is too
   large for the number of training classes).
2. While some cluster is starved (fewer usable classes than the minimum), take the starved cluster
   with the fewest usable classes (lowest id on ties) and move ONE whole class into it: all of that
   class's images, wherever they are. The candidates are the classes with >= 2 images that are not
   yet usable in the starved cluster and that are usable only in clusters holding MORE than the
   minimum (so no donor becomes starved). Among them, the class whose mean feature is closest to the
   starved cluster's centre moves (lowest class index on ties); the centre is the mean feature of the
   cluster's current images, or its k-means centroid when it is empty.
3. Repeat. Each move raises the starved cluster's count by one and never lowers a cluster to or
   below the minimum, so the loop ends; a counting argument shows a candidate always exists when
   step 1 passed.

The rule is deterministic (k-means is seeded, ties break by index) and prints nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from dcml.backends import get_backend
from dcml.errors import UserError

#: k-means iterations per (re-)clustering, as in the authors' code (faiss, 100 iterations).
DEFAULT_CLUSTERING_ITERATIONS = 100
#: Usable classes every learner needs at least: one positive class and one negative class.
DEFAULT_MIN_CLASSES_PER_CLUSTER = 2
#: Images a class needs inside a cluster to give a positive pair there.
MIN_IMAGES_PER_USABLE_CLASS = 2
#: Guards the division when normalising an all-zero feature vector.
_NORM_EPSILON = 1e-12

UNIT_IMAGE = "image"
UNIT_CLASS = "class"
UNITS = (UNIT_IMAGE, UNIT_CLASS)


def match_clusters(previous: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Relabel ``new`` so that its total overlap with ``previous`` is maximal.

    Both are label arrays of the same length with values in 0..K-1 (K = the larger maximum + 1).
    The Hungarian algorithm on the K x K overlap matrix pairs every new cluster with one old label;
    new cluster ``i`` then takes the old label it was matched to, so learners keep their regions
    across re-clusterings. Returns the relabelled ``new`` (int64): the same partition as ``new``.

    The authors' code (CVPR v1 and TPAMI v2) applied the INVERSE of this permutation by mistake,
    which is right only when the permutation is its own inverse (always for K = 2, not for a
    3-cycle).
    """
    previous = np.asarray(previous)
    new = np.asarray(new)
    if previous.ndim != 1 or new.ndim != 1:
        raise ValueError(f"cluster assignments must be 1-D, got shapes {previous.shape} and {new.shape}")
    if len(previous) != len(new):
        raise ValueError(f"cluster assignments differ in length: {len(previous)} previous vs {len(new)} new")
    if len(new) == 0:
        return new.astype(np.int64)
    if not (np.issubdtype(previous.dtype, np.integer) and np.issubdtype(new.dtype, np.integer)):
        raise ValueError("cluster assignments must be integer arrays")
    if previous.min() < 0 or new.min() < 0:
        raise ValueError("cluster labels must be non-negative")
    num_clusters = int(max(previous.max(), new.max())) + 1
    overlap = np.zeros((num_clusters, num_clusters), dtype=np.int64)
    np.add.at(overlap, (new, previous), 1)  # rows: new labels, columns: old labels
    new_labels, old_labels = linear_sum_assignment(overlap, maximize=True)
    relabel = np.empty(num_clusters, dtype=np.int64)
    relabel[new_labels] = old_labels
    return relabel[new.astype(np.int64)]


@dataclass(frozen=True)
class Clustering:
    """The result of one (re-)clustering of the training set."""

    assignment: np.ndarray  # (n_images,) int64 cluster id of every training image, 0..K-1
    usable: np.ndarray  # (n_images,) bool: False for a class's only image inside its cluster
    num_clusters: int
    labels: np.ndarray | None = None  # (n_images,) class labels the clustering was built from

    def __post_init__(self) -> None:
        if self.assignment.ndim != 1 or self.usable.shape != self.assignment.shape:
            raise ValueError(f"assignment {self.assignment.shape} and usable {self.usable.shape} must be equal 1-D shapes")
        if self.labels is not None and self.labels.shape != self.assignment.shape:
            raise ValueError(f"labels {self.labels.shape} must match assignment {self.assignment.shape}")
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {self.num_clusters}")
        if len(self.assignment) and (self.assignment.min() < 0 or self.assignment.max() >= self.num_clusters):
            raise ValueError(f"cluster ids must lie in 0..{self.num_clusters - 1}")

    def cluster_sizes(self) -> np.ndarray:
        """Usable images per cluster, shape (K,)."""
        return np.bincount(self.assignment[self.usable], minlength=self.num_clusters)

    def classes_per_cluster(self, labels: np.ndarray | None = None) -> np.ndarray:
        """Classes with >= 2 usable images per cluster, shape (K,); ``labels`` default to the stored ones."""
        labels = self.labels if labels is None else np.asarray(labels)
        if labels is None:
            raise ValueError("this Clustering stores no labels: pass them")
        _, class_index = np.unique(labels, return_inverse=True)
        return _usable_class_counts(self.assignment, class_index.reshape(-1), self.num_clusters)[0]


def _usable_class_counts(assignment: np.ndarray, class_index: np.ndarray, num_clusters: int):
    """Per cluster the number of usable classes, plus the usable (cluster, class) pairs and per-image flags."""
    num_classes = int(class_index.max()) + 1 if len(class_index) else 0
    pair_key = assignment * num_classes + class_index
    keys, inverse, counts = np.unique(pair_key, return_inverse=True, return_counts=True)
    usable_pair = counts >= MIN_IMAGES_PER_USABLE_CLASS
    usable_image = usable_pair[inverse.reshape(-1)]
    usable_clusters = keys[usable_pair] // max(num_classes, 1)
    usable_classes = keys[usable_pair] % max(num_classes, 1)
    per_cluster = np.bincount(usable_clusters, minlength=num_clusters)
    return per_cluster, usable_clusters, usable_classes, usable_image


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, _NORM_EPSILON)).astype(np.float32)


def _class_means(normalised: np.ndarray, class_index: np.ndarray, num_classes: int) -> np.ndarray:
    sums = np.zeros((num_classes, normalised.shape[1]), dtype=np.float64)
    np.add.at(sums, class_index, normalised)
    return _normalise_rows(sums)


@dataclass(frozen=True)
class _Prepared:
    normalised: np.ndarray  # (n, D) float32 unit rows
    class_index: np.ndarray  # (n,) int64 in 0..num_classes-1
    class_means: np.ndarray  # (num_classes, D) float32 unit rows
    class_sizes: np.ndarray  # (num_classes,) images per class


def _prepare(features, labels, num_clusters, unit, min_classes_per_cluster) -> _Prepared:
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(f"features must be (n, D) and labels (n,), got {features.shape} and {labels.shape}")
    if unit not in UNITS:
        raise UserError(f"unknown clustering unit {unit!r}; choose one of: {', '.join(UNITS)}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise UserError(f"the number of clusters must be a positive integer, got {num_clusters!r}")
    if min_classes_per_cluster < 1:
        raise UserError(f"min classes per cluster must be >= 1, got {min_classes_per_cluster}")
    if not np.isfinite(features).all():
        raise UserError("features contain NaN or infinite values; cannot cluster them")
    _, class_index = np.unique(labels, return_inverse=True)
    class_index = class_index.reshape(-1).astype(np.int64)
    class_sizes = np.bincount(class_index)
    trainable_classes = int((class_sizes >= MIN_IMAGES_PER_USABLE_CLASS).sum())
    needed = num_clusters * min_classes_per_cluster
    if trainable_classes < needed:
        raise UserError(
            f"K={num_clusters} clusters is too large for the training set: they need {needed} classes with >= "
            f"{MIN_IMAGES_PER_USABLE_CLASS} images ({min_classes_per_cluster} per cluster), found {trainable_classes}"
        )
    normalised = _normalise_rows(features)
    return _Prepared(normalised, class_index, _class_means(normalised, class_index, len(class_sizes)), class_sizes)


def _kmeans_assignment(prepared: _Prepared, members: np.ndarray, k: int, unit: str, backend, iterations: int, seed: int):
    """k-means of the images ``members`` into k groups; returns (group per member, centroids)."""
    if unit == UNIT_IMAGE:
        result = backend.kmeans(prepared.normalised[members], k, iterations=iterations, seed=seed)
        return result.assignment, result.centroids
    member_classes, member_class_position = np.unique(prepared.class_index[members], return_inverse=True)
    means = _class_means(prepared.normalised[members], member_class_position.reshape(-1), len(member_classes))
    result = backend.kmeans(means, k, iterations=iterations, seed=seed)
    return result.assignment[member_class_position.reshape(-1)], result.centroids


def _repair(prepared: _Prepared, assignment: np.ndarray, centroids: np.ndarray, num_clusters: int, minimum: int) -> np.ndarray:
    """Move whole classes into starved clusters until each has ``minimum`` usable classes (module docstring)."""
    assignment = assignment.copy()
    trainable = prepared.class_sizes >= MIN_IMAGES_PER_USABLE_CLASS
    while True:
        per_cluster, usable_clusters, usable_classes, _ = _usable_class_counts(assignment, prepared.class_index, num_clusters)
        if per_cluster.min() >= minimum:
            return assignment
        starved = int(np.argmin(per_cluster))  # fewest usable classes; argmin picks the lowest id on ties
        blocked = np.zeros(len(trainable), dtype=bool)
        blocking_pair = (usable_clusters == starved) | (per_cluster[usable_clusters] <= minimum)
        blocked[usable_classes[blocking_pair]] = True
        candidates = np.flatnonzero(trainable & ~blocked)
        if len(candidates) == 0:  # impossible once _prepare's count check passed
            raise RuntimeError(f"cluster repair found no class to move into cluster {starved}")
        members = assignment == starved
        centre = prepared.normalised[members].mean(axis=0) if members.any() else centroids[starved]
        distances = ((prepared.class_means[candidates] - centre) ** 2).sum(axis=1)
        moved_class = candidates[np.argmin(distances)]  # candidates are sorted: ties go to the lowest index
        assignment[prepared.class_index == moved_class] = starved


def _finish(prepared: _Prepared, labels, assignment, centroids, num_clusters, minimum, previous) -> Clustering:
    assignment = _repair(prepared, assignment.astype(np.int64), centroids, num_clusters, minimum)
    if previous is not None:
        assignment = match_clusters(previous, assignment)
    usable = _usable_class_counts(assignment, prepared.class_index, num_clusters)[3]
    return Clustering(assignment=assignment, usable=usable, num_clusters=num_clusters, labels=np.asarray(labels).copy())


def cluster_training_set(
    features: np.ndarray,
    labels: np.ndarray,
    num_clusters: int,
    *,
    unit: str = UNIT_IMAGE,
    backend: str = "auto",
    iterations: int = DEFAULT_CLUSTERING_ITERATIONS,
    seed: int = 0,
    min_classes_per_cluster: int = DEFAULT_MIN_CLASSES_PER_CLUSTER,
    previous: np.ndarray | None = None,
) -> Clustering:
    """Cluster the training images into ``num_clusters`` learners' regions (see the module docstring).

    ``features`` (n, D) are L2-normalised here; ``unit`` is "image" (paper) or "class"; ``previous``
    (the last assignment, same K) relabels the result with :func:`match_clusters` so learners keep
    their regions. K = 1 puts everything in cluster 0 without k-means.
    """
    prepared = _prepare(features, labels, num_clusters, unit, min_classes_per_cluster)
    if previous is not None:
        previous = np.asarray(previous)
        if previous.shape != prepared.class_index.shape or previous.min() < 0 or previous.max() >= num_clusters:
            raise ValueError(f"previous assignment must be ({len(prepared.class_index)},) with ids in 0..{num_clusters - 1}")
    everything = np.arange(len(prepared.class_index))
    if num_clusters == 1:
        assignment = np.zeros(len(everything), dtype=np.int64)
        centroids = prepared.normalised.mean(axis=0, keepdims=True)
    else:
        search = get_backend(backend)
        assignment, centroids = _kmeans_assignment(prepared, everything, num_clusters, unit, search, iterations, seed)
    return _finish(prepared, labels, assignment, centroids, num_clusters, min_classes_per_cluster, previous)


def split_clusters(
    features: np.ndarray,
    labels: np.ndarray,
    assignment: np.ndarray,
    *,
    unit: str = UNIT_IMAGE,
    backend: str = "auto",
    iterations: int = DEFAULT_CLUSTERING_ITERATIONS,
    seed: int = 0,
    min_classes_per_cluster: int = DEFAULT_MIN_CLASSES_PER_CLUSTER,
) -> Clustering:
    """Hierarchical division (TPAMI): split every cluster c in two with 2-means on its own members.

    Cluster c's children are 2c and 2c+1, so child learners inherit their parent's place in the
    ordering. Units, singletons and the repair rule are those of :func:`cluster_training_set`
    (the repair may move whole classes between children of different parents).
    """
    assignment = np.asarray(assignment)
    if assignment.ndim != 1 or len(assignment) != len(np.asarray(labels)) or len(assignment) == 0:
        raise ValueError(f"assignment must be 1-D with one entry per image, got {assignment.shape}")
    if not np.issubdtype(assignment.dtype, np.integer) or assignment.min() < 0:
        raise ValueError("assignment must hold non-negative integer cluster ids")
    num_parents = int(assignment.max()) + 1
    num_children = 2 * num_parents
    prepared = _prepare(features, labels, num_children, unit, min_classes_per_cluster)
    search = get_backend(backend)
    children = np.empty(len(assignment), dtype=np.int64)
    centroids = np.zeros((num_children, prepared.normalised.shape[1]), dtype=np.float32)
    for parent in range(num_parents):
        members = np.flatnonzero(assignment == parent)
        points = len(members) if unit == UNIT_IMAGE else len(np.unique(prepared.class_index[members]))
        if points < 2:  # nothing to split: the second child starts empty and the repair fills it
            children[members] = 2 * parent
            if len(members):
                centroids[2 * parent : 2 * parent + 2] = prepared.normalised[members].mean(axis=0)
            continue
        halves, half_centroids = _kmeans_assignment(prepared, members, 2, unit, search, iterations, seed + parent)
        children[members] = 2 * parent + halves
        centroids[2 * parent : 2 * parent + 2] = half_centroids
    return _finish(prepared, labels, children, centroids, num_children, min_classes_per_cluster, previous=None)


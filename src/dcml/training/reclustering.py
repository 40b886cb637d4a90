"""Dividing the training set among the learners: k-means on features, matched to the previous clusters.

A pure function on arrays (the trainer supplies the features): K = 1 is one cluster; a hierarchical
run whose K just doubled splits each cluster in two (TPAMI); otherwise k-means, with the new
clusters relabelled to overlap the previous ones as much as possible (Hungarian matching), so each
learner keeps its region of the data.
"""

from __future__ import annotations

import numpy as np

from dcml.clustering import Clustering, cluster_training_set, split_clusters

#: Seeds of the per-epoch k-means: run seed x this + epoch, so epochs and runs never share one.
KMEANS_SEED_STRIDE = 100_003


def kmeans_seed(run_seed: int, epoch: int) -> int:
    return run_seed * KMEANS_SEED_STRIDE + epoch


def divide(features: np.ndarray | None, labels: np.ndarray, learners: int, previous: Clustering | None, clustering_config,
           seed: int) -> Clustering:
    """The clustering of an epoch that re-clusters into ``learners`` clusters (``features`` unused for K = 1)."""
    c = clustering_config
    if learners == 1:
        dummy = np.zeros((len(labels), 1), dtype=np.float32)  # K = 1 needs no features
        return cluster_training_set(dummy, labels, 1, min_classes_per_cluster=c.min_classes_per_cluster)
    options = dict(unit=c.unit, backend=c.backend, iterations=c.kmeans_iterations, seed=seed,
                   min_classes_per_cluster=c.min_classes_per_cluster)
    if c.hierarchical and previous is not None and learners == 2 * previous.num_clusters:
        return split_clusters(features, labels, previous.assignment, **options)
    same_k = previous is not None and previous.num_clusters == learners
    return cluster_training_set(features, labels, learners, previous=previous.assignment if same_k else None, **options)

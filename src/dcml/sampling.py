"""Batches for the divide phase: every batch comes from ONE cluster and carries its learner id.

Policies (all deterministic in ``(seed, epoch)``):

- A batch draws P = ``classes_per_batch`` classes without replacement from one cluster's usable
  images, then M = ``images_per_class`` images of each, without replacement. A class with fewer
  than M usable images in the cluster (but >= 2, see :mod:`dcml.clustering`) contributes all of
  them, never duplicates (the emoji benchmark has many classes of exactly 3 images). A cluster with
  fewer than P usable classes gives batches of all its classes; with ``fill_small_clusters`` those
  classes give more than M images each (P x M / classes, still without duplicates), so the batch
  keeps P x M images where the images exist, as the authors' samplers keep full batches (v1 by
  drawing classes again, v2 by drawing more images per class).
- Each cluster has its own class stream: a shuffled pass over its classes, P at a time. When fewer
  than P remain, the batch is topped up from the next shuffled pass (skipping classes already in
  the batch), so batches are always full and no class waits more than one pass. A full pass is
  therefore ``ceil(classes / P)`` batches (at least 1): :meth:`ClusterBatchSampler.batches_per_cluster`.
  With ``pass_unit="images"`` a cluster's pass is counted as the authors' code counts it instead:
  ``floor(usable images / (P x M))`` batches (at least 1), as if the cluster's images were dealt
  out in batches once. On datasets with many images per class (CUB: ~60, CARS: ~80) that is several
  times more batches than one pass over the classes.
- Clusters take turns batch by batch (0, 1, ..., K-1, 0, 1, ...). ``epoch_length="largest"`` (the
  authors' code) runs as many rounds as the largest cluster's pass, small clusters restarting
  their streams; ``"smallest"`` (the author's later advice) stops after the smallest cluster's pass.
  ``batches_per_epoch`` fixes the count instead (clusters still take turns): runs with different K
  then get exactly the same number of steps and images, which a fair comparison needs.
- With ``num_replicas`` > 1 (DDP) the full sequence is cut to a multiple of ``num_replicas`` and
  replica ``rank`` yields batches ``rank, rank + num_replicas, ...``; all replicas yield the same count.

With a single cluster this is ordinary class-balanced P x M sampling.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dcml.clustering import Clustering
from dcml.config import (
    MAX_CLASSES_PER_BATCH,
    MAX_IMAGES_PER_CLASS,
    MIN_CLASSES_PER_BATCH,
    MIN_IMAGES_PER_CLASS,
    SamplerConfig,
)
from dcml.errors import UserError

EPOCH_LARGEST = "largest"
EPOCH_SMALLEST = "smallest"
EPOCH_LENGTHS = (EPOCH_LARGEST, EPOCH_SMALLEST)
PASS_CLASSES = "classes"
PASS_IMAGES = "images"
PASS_UNITS = (PASS_CLASSES, PASS_IMAGES)


class _ClassStream:
    """One cluster's endless sequence of P-class draws, reshuffled every pass."""

    def __init__(self, num_classes: int, classes_per_batch: int, rng: np.random.Generator) -> None:
        self._num_classes = num_classes
        self._per_batch = min(classes_per_batch, num_classes)
        self._rng = rng
        self._queue = rng.permutation(num_classes)

    def next_classes(self) -> np.ndarray:
        taken = self._queue[: self._per_batch]
        self._queue = self._queue[self._per_batch :]
        if len(taken) < self._per_batch:
            fresh_pass = self._rng.permutation(self._num_classes)
            fresh_pass = fresh_pass[~np.isin(fresh_pass, taken)]  # no class twice in one batch
            missing = self._per_batch - len(taken)
            # The carried classes stay in the new pass, so each class still appears once per pass.
            self._queue = np.concatenate([fresh_pass[missing:], taken])
            self._queue = self._queue[self._rng.permutation(len(self._queue))]
            taken = np.concatenate([taken, fresh_pass[:missing]])
        return taken


class ClusterBatchSampler:
    """Batch sampler yielding lists of ``(image_index, learner_id)`` pairs, each batch from one cluster.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)`` with a dataset whose
    ``__getitem__((index, learner))`` returns the learner id with the image. Call :meth:`set_epoch`
    before every epoch. Policies are in the module docstring.
    """

    def __init__(
        self,
        labels: np.ndarray,
        clustering: Clustering,
        *,
        classes_per_batch: int,
        images_per_class: int,
        epoch_length: str = SamplerConfig.epoch_length,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        batches_per_epoch: int | None = SamplerConfig.batches_per_epoch,
        pass_unit: str = SamplerConfig.pass_unit,
        fill_small_clusters: bool = SamplerConfig.fill_small_clusters,
    ) -> None:
        labels = np.asarray(labels)
        if labels.shape != clustering.assignment.shape:
            raise ValueError(f"labels {labels.shape} do not match the clustering's assignment {clustering.assignment.shape}")
        if epoch_length not in EPOCH_LENGTHS:
            raise UserError(f"unknown epoch length {epoch_length!r}; choose one of: {', '.join(EPOCH_LENGTHS)}")
        # The configuration's ranges (sampler.classes_per_batch, sampler.images_per_class).
        if not (MIN_CLASSES_PER_BATCH <= classes_per_batch <= MAX_CLASSES_PER_BATCH
                and MIN_IMAGES_PER_CLASS <= images_per_class <= MAX_IMAGES_PER_CLASS):
            raise UserError(
                f"classes per batch and images per class must be in {MIN_CLASSES_PER_BATCH}..{MAX_CLASSES_PER_BATCH} "
                f"and {MIN_IMAGES_PER_CLASS}..{MAX_IMAGES_PER_CLASS}, got {classes_per_batch} and {images_per_class}"
            )
        if pass_unit not in PASS_UNITS:
            raise UserError(f"unknown pass unit {pass_unit!r}; choose one of: {', '.join(PASS_UNITS)}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise UserError(f"batches per epoch must be >= 1, got {batches_per_epoch}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.num_clusters = clustering.num_clusters
        self.classes_per_batch = classes_per_batch
        self.images_per_class = images_per_class
        self.epoch_length = epoch_length
        self.batches_per_epoch = batches_per_epoch
        self.pass_unit = pass_unit
        self.fill_small_clusters = fill_small_clusters
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.first_batch = 0  # batches of this rank's epoch to leave out (a resume in mid-epoch)
        # cluster id -> list of arrays, one per usable class, holding that class's usable image indices.
        self._class_images = self._group_usable_images(labels, clustering)
        empty = [cluster for cluster, classes in enumerate(self._class_images) if not classes]
        if empty:
            raise ValueError(f"clusters {empty} have no usable class; build clusterings with dcml.clustering")

    def _group_usable_images(self, labels: np.ndarray, clustering: Clustering) -> list[list[np.ndarray]]:
        indices = np.flatnonzero(clustering.usable)
        _, class_index = np.unique(labels, return_inverse=True)
        clusters = clustering.assignment[indices]
        classes = class_index.reshape(-1)[indices]
        order = np.lexsort((indices, classes, clusters))
        indices, clusters, classes = indices[order], clusters[order], classes[order]
        group_starts = np.flatnonzero(np.r_[True, (clusters[1:] != clusters[:-1]) | (classes[1:] != classes[:-1])])
        grouped: list[list[np.ndarray]] = [[] for _ in range(self.num_clusters)]
        for group in np.split(np.arange(len(indices)), group_starts[1:]):
            if len(group):
                grouped[int(clusters[group[0]])].append(indices[group])
        return grouped

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Choose the epoch whose batches the next iteration draws (same epoch, same batches).

        ``first_batch``: start at this rank's batch of that number (0-based), as a run resumed in
        mid-epoch does; the earlier batches are still drawn, so the later ones are the same.
        """
        if not 0 <= first_batch <= self.epoch_batches():
            raise ValueError(f"first batch {first_batch} is outside the epoch's {self.epoch_batches()} batches")
        self.epoch = epoch
        self.first_batch = first_batch

    def epoch_batches(self) -> int:
        """This rank's batches in a whole epoch (``len()`` is what is left of it after ``first_batch``)."""
        return self._total_batches() // self.num_replicas

    def batches_per_cluster(self) -> np.ndarray:
        """Batches in one pass over each cluster, shape (K,): ``ceil(classes / P)``, or with
        ``pass_unit="images"`` ``max(1, floor(images / (P x M)))``."""
        if self.pass_unit == PASS_IMAGES:
            images = np.array([sum(len(c) for c in classes) for classes in self._class_images], dtype=np.int64)
            return np.maximum(1, images // (self.classes_per_batch * self.images_per_class))
        num_classes = np.array([len(classes) for classes in self._class_images], dtype=np.int64)
        return -(-num_classes // self.classes_per_batch)

    def _rounds(self) -> int:
        passes = self.batches_per_cluster()
        return int(passes.max() if self.epoch_length == EPOCH_LARGEST else passes.min())

    def _total_batches(self) -> int:
        full = self.batches_per_epoch if self.batches_per_epoch is not None else self._rounds() * self.num_clusters
        return full - full % self.num_replicas

    def __len__(self) -> int:
        return self.epoch_batches() - self.first_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # One child generator per cluster: a cluster's draws do not depend on the other clusters.
        cluster_seeds = np.random.SeedSequence([self.seed, self.epoch]).spawn(self.num_clusters)
        rngs = [np.random.default_rng(child) for child in cluster_seeds]
        streams = [
            _ClassStream(len(classes), self.classes_per_batch, rng) for classes, rng in zip(self._class_images, rngs)
        ]
        total = self._total_batches()
        mine = 0
        for position in range(total):
            cluster = position % self.num_clusters
            # Every replica draws every batch so the streams stay aligned; it keeps only its own.
            batch = self._draw(cluster, streams[cluster], rngs[cluster])
            if position % self.num_replicas == self.rank:
                if mine >= self.first_batch:
                    yield batch
                mine += 1

    def _draw(self, cluster: int, stream: _ClassStream, rng: np.random.Generator) -> list[tuple[int, int]]:
        batch: list[tuple[int, int]] = []
        classes = stream.next_classes()
        wanted = np.full(len(classes), self.images_per_class)
        if self.fill_small_clusters and len(classes) < self.classes_per_batch:
            total = self.classes_per_batch * self.images_per_class
            wanted[:] = total // len(classes)
            wanted[: total % len(classes)] += 1  # the stream's order is random: so is who gets one more
        for class_position, count in zip(classes, wanted):
            images = self._class_images[cluster][class_position]
            if len(images) > count:
                images = images[rng.choice(len(images), count, replace=False)]
            batch.extend((int(index), cluster) for index in images)
        return batch

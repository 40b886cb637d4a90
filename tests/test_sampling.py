"""ClusterBatchSampler: one cluster per batch, P x M draws, epoch lengths, determinism, replicas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcml.clustering import Clustering
from dcml.errors import UserError
from dcml.sampling import ClusterBatchSampler

P, M = 3, 3  # M above some class sizes (2) and below others (4-6)


def make_clustering(class_sizes_per_cluster, singleton_classes=0):
    """Clustering with the given class sizes per cluster, plus unusable one-image classes in cluster 0."""
    labels, assignment = [], []
    next_label = 0
    for cluster, sizes in enumerate(class_sizes_per_cluster):
        for size in sizes:
            labels += [next_label] * size
            assignment += [cluster] * size
            next_label += 1
    for _ in range(singleton_classes):
        labels.append(next_label)
        assignment.append(0)
        next_label += 1
    labels, assignment = np.array(labels), np.array(assignment, dtype=np.int64)
    usable = np.bincount(labels)[labels] >= 2
    clustering = Clustering(assignment=assignment, usable=usable, num_clusters=len(class_sizes_per_cluster), labels=labels)
    return labels, clustering


# Cluster 0: 7 classes (some with fewer than M images, some with more); cluster 1: 4; cluster 2: 2 (< P).
SIZES = [[5, 2, 4, 3, 6, 2, 2], [4, 4, 3, 5], [3, 2]]


def sampler_for(sizes=SIZES, **options):
    labels, clustering = make_clustering(sizes, singleton_classes=2)
    settings = dict(classes_per_batch=P, images_per_class=M, seed=7)
    settings.update(options)
    return labels, clustering, ClusterBatchSampler(labels, clustering, **settings)


def test_every_batch_is_one_cluster_of_p_classes_by_m_images():
    labels, clustering, sampler = sampler_for()
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        indices = np.array([index for index, _ in batch])
        learners = {learner for _, learner in batch}
        assert len(learners) == 1
        cluster = learners.pop()
        assert (clustering.assignment[indices] == cluster).all()
        assert clustering.usable[indices].all()
        assert len(set(indices.tolist())) == len(indices)
        classes, counts = np.unique(labels[indices], return_counts=True)
        available = min(P, len(SIZES[cluster]))
        assert len(classes) == available
        for label, count in zip(classes, counts):
            assert count == min(M, (labels == label).sum())


def test_round_robin_and_epoch_lengths():
    _, _, largest = sampler_for(epoch_length="largest")
    _, _, smallest = sampler_for(epoch_length="smallest")
    np.testing.assert_array_equal(largest.batches_per_cluster(), [3, 2, 1])  # ceil(7/3), ceil(4/3), ceil(2/3)
    assert len(largest) == 3 * 3 and len(smallest) == 1 * 3
    clusters = [batch[0][1] for batch in largest]
    assert clusters == [0, 1, 2] * 3
    assert [batch[0][1] for batch in smallest] == [0, 1, 2]
    with pytest.raises(UserError, match="epoch length"):
        sampler_for(epoch_length="median")


def test_a_largest_epoch_visits_every_class_of_the_largest_cluster():
    labels, clustering, sampler = sampler_for()
    seen = {labels[index] for batch in sampler for index, learner in batch if learner == 0}
    assert seen == set(labels[(clustering.assignment == 0) & clustering.usable].tolist())


def test_batches_depend_only_on_seed_and_epoch():
    _, _, sampler = sampler_for()
    sampler.set_epoch(3)
    first = list(sampler)
    assert list(sampler) == first
    _, _, fresh = sampler_for()  # a resumed run: new sampler, same seed, same epoch
    fresh.set_epoch(3)
    assert list(fresh) == first
    fresh.set_epoch(4)
    assert list(fresh) != first
    _, _, other_seed = sampler_for(seed=8)
    other_seed.set_epoch(3)
    assert list(other_seed) != first


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_replicas_partition_the_full_sequence(num_replicas):
    _, _, single = sampler_for()
    full = list(single)
    parts = [list(sampler_for(num_replicas=num_replicas, rank=rank)[2]) for rank in range(num_replicas)]
    usable_length = len(full) - len(full) % num_replicas
    assert {len(part) for part in parts} == {usable_length // num_replicas}
    for rank, part in enumerate(parts):
        assert part == full[rank:usable_length:num_replicas]


def test_one_cluster_is_class_balanced_sampling():
    sizes = [[4, 3, 5, 2, 4, 6, 3, 4]]
    labels, _, sampler = sampler_for(sizes=sizes, classes_per_batch=3, images_per_class=2)
    batches = list(sampler)
    assert len(batches) == 3  # ceil(8 classes / 3)
    seen = set()
    for batch in batches:
        assert {learner for _, learner in batch} == {0}
        classes, counts = np.unique(labels[[index for index, _ in batch]], return_counts=True)
        assert len(classes) == 3 and (counts == 2).all()
        seen |= set(classes.tolist())
    assert seen == set(range(8))  # every class once per pass, the last batch topped up from the next pass


def test_dataloader_round_trip():
    class IndexWithLearner(torch.utils.data.Dataset):
        def __getitem__(self, key):
            index, learner = key
            return torch.tensor(float(index)), learner

    _, clustering, sampler = sampler_for()
    loader = torch.utils.data.DataLoader(IndexWithLearner(), batch_sampler=sampler, num_workers=0)
    batches = list(loader)
    assert len(batches) == len(sampler)
    for images, learners in batches:
        assert len(set(learners.tolist())) == 1
        assert (clustering.assignment[images.long().numpy()] == learners[0].item()).all()


def test_bad_settings():
    # The configuration's ranges: two classes (negatives) of two images (positives) at least.
    for out_of_range in ({"classes_per_batch": 1}, {"images_per_class": 1}, {"classes_per_batch": 1025}):
        with pytest.raises(UserError, match=r"must be in 2\.\.1024 and 2\.\.64"):
            sampler_for(**out_of_range)
    with pytest.raises(ValueError, match="rank"):
        sampler_for(num_replicas=2, rank=2)
    labels, clustering = make_clustering([[2, 2], [1]])
    with pytest.raises(ValueError, match="no usable class"):
        ClusterBatchSampler(labels, clustering, classes_per_batch=P, images_per_class=M)


def test_a_fixed_epoch_length_is_the_same_for_every_k():
    _, _, three = sampler_for(batches_per_epoch=10)
    _, _, one = sampler_for(sizes=[[5, 2, 4, 3, 6, 2, 2, 4, 4, 3, 5, 3, 2]], batches_per_epoch=10)
    assert len(three) == len(list(three)) == 10 and len(one) == len(list(one)) == 10
    assert [batch[0][1] for batch in three] == [0, 1, 2] * 3 + [0]
    _, _, half = sampler_for(batches_per_epoch=10, num_replicas=2, rank=1)
    assert len(half) == len(list(half)) == 5
    with pytest.raises(UserError, match="batches per epoch"):
        sampler_for(batches_per_epoch=0)


def test_a_pass_in_images_counts_batches_as_the_authors_code():
    # Cluster 0: 10 classes of 12 images (120 usable); cluster 1: 3 classes of 3 images (9 usable).
    sizes = [[12] * 10, [3] * 3]
    _, _, by_images = sampler_for(sizes, pass_unit="images", classes_per_batch=2, images_per_class=3)
    _, _, by_classes = sampler_for(sizes, pass_unit="classes", classes_per_batch=2, images_per_class=3)
    np.testing.assert_array_equal(by_images.batches_per_cluster(), [120 // 6, 1])  # at least one batch
    np.testing.assert_array_equal(by_classes.batches_per_cluster(), [5, 2])
    assert len(by_images) == 2 * 20  # clusters take turns until the largest pass ends
    with pytest.raises(UserError, match="pass unit"):
        sampler_for(pass_unit="pixels")


def test_small_clusters_can_keep_full_batches_with_more_images_per_class():
    # Cluster 1 holds 2 classes (fewer than P = 3) of 6 and 2 images; P x M = 9 images are wanted.
    sizes = [[5, 5, 5, 5], [6, 2]]
    labels, _, plain = sampler_for(sizes)
    _, _, filled = sampler_for(sizes, fill_small_clusters=True)
    plain_small = [batch for batch in plain if batch[0][1] == 1]
    filled_small = [batch for batch in filled if batch[0][1] == 1]
    assert plain_small and {len(batch) for batch in plain_small} == {3 + 2}  # M each, the small class all it has
    for batch in filled_small:
        counts = np.bincount(labels[[index for index, _ in batch]])
        big, small = sorted(counts[counts > 0], reverse=True)
        assert big in (4, 5) and small == 2  # 9 // 2 = 4 each, one class 5; the 2-image class gives both
    for batch in filled:
        indices = [index for index, _ in batch]
        assert len(set(indices)) == len(indices)  # never duplicates
        if batch[0][1] == 0:
            assert len(batch) == P * M  # clusters with P classes or more are unchanged

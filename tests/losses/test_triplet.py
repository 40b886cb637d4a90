"""Triplet loss and semi-hard mining: vectorised code vs slow loops, vs pytorch-metric-learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from .reference import semi_hard_triplets as reference_semi_hard_triplets
from .reference import triplet_loss as reference_triplet_loss

from dcml.losses import SemiHardMiner, TripletLoss

MARGIN = 0.2


def batch(seed: int, num_classes: int = 5, per_class: int = 4, dim: int = 6):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(num_classes * per_class, dim, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return embeddings, labels


def all_triplets(labels):
    return [
        (a, p, n)
        for a in range(len(labels))
        for p in range(len(labels))
        for n in range(len(labels))
        if a != p and labels[a] == labels[p] and labels[a] != labels[n]
    ]


def as_indices(triplets):
    return tuple(torch.tensor(column) for column in zip(*triplets))


def as_set(indices_tuple):
    return set(zip(*(index.tolist() for index in indices_tuple)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semi_hard_miner_matches_the_loop_reference(seed):
    embeddings, labels = batch(seed)
    mined = SemiHardMiner(MARGIN).mine(embeddings, labels)
    expected = reference_semi_hard_triplets(embeddings, labels, MARGIN)
    assert len(expected) > 5  # the batch must contain semi-hard triplets for this to test anything
    assert as_set(mined) == expected
    assert all(index.dtype == torch.long for index in mined)


def test_semi_hard_miner_picks_pmls_closest_semi_hard_negative():
    # PML keeps every semi-hard triplet (0 < d_an - d_ap <= margin); we keep, per (a, p), the one
    # with the closest negative. On continuous data the boundary cases (== vs <) never occur.
    embeddings, labels = batch(seed=3)
    ours = as_set(SemiHardMiner(MARGIN).mine(embeddings, labels))
    theirs = as_set(pml_miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard")(embeddings, labels))
    distances = torch.cdist(embeddings, embeddings)
    closest = {}
    for a, p, n in theirs:
        if (a, p) not in closest or distances[a, n] < distances[a, closest[(a, p)]]:
            closest[(a, p)] = n
    assert ours == {(a, p, n) for (a, p), n in closest.items()}
    assert ours <= theirs and len(ours) < len(theirs)


def test_triplet_loss_value_and_gradient_match_the_loop_reference():
    embeddings, labels = batch(seed=4, num_classes=3, per_class=3)
    triplets = all_triplets(labels)
    mine = embeddings.clone().requires_grad_()
    theirs = embeddings.clone().requires_grad_()
    loss = TripletLoss(MARGIN)
    value = loss(mine, labels, as_indices(triplets))
    expected = reference_triplet_loss(theirs, triplets, MARGIN)
    value.backward()
    expected.backward()
    assert 0.0 < loss.last_stats["active_fraction"] < 1.0  # mean over ALL triplets, zeros included
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(mine.grad, theirs.grad)


def test_triplet_loss_matches_pml_up_to_the_reducer():
    embeddings, labels = batch(seed=5)
    triplets = as_indices(all_triplets(labels))
    ours = TripletLoss(MARGIN)(embeddings, labels, triplets)
    # Same averaging: PML with a plain mean reducer.
    mean_reduced = pml_losses.TripletMarginLoss(margin=MARGIN, reducer=pml_reducers.MeanReducer())
    torch.testing.assert_close(ours, mean_reduced(embeddings, labels, triplets))
    # PML's default averages over the non-zero terms only: rescale ours by (all / non-zero).
    terms = torch.relu(
        (embeddings[triplets[0]] - embeddings[triplets[1]]).norm(dim=1)
        - (embeddings[triplets[0]] - embeddings[triplets[2]]).norm(dim=1)
        + MARGIN
    )
    num_nonzero = (terms > 0).sum()
    assert 0 < num_nonzero < len(terms)
    avg_non_zero = pml_losses.TripletMarginLoss(margin=MARGIN)(embeddings, labels, triplets)
    torch.testing.assert_close(ours * len(terms) / num_nonzero, avg_non_zero)


def test_mined_triplet_loss_equals_pml_on_the_same_triplets():
    # Every semi-hard triplet violates the margin, so the mean over all and over non-zero agree.
    embeddings, labels = batch(seed=6)
    loss = TripletLoss(MARGIN)
    torch.manual_seed(0)
    ours = loss(embeddings, labels)
    triplets = SemiHardMiner(MARGIN).mine(embeddings, labels)
    theirs = pml_losses.TripletMarginLoss(margin=MARGIN)(embeddings, labels, triplets)
    assert loss.last_stats["num_triplets"] == len(triplets[0]) > 0
    assert loss.last_stats["active_fraction"] == 1.0
    torch.testing.assert_close(ours, theirs)


def test_no_triplet_gives_zero_with_a_graph():
    embeddings, labels = batch(seed=7)
    embeddings.requires_grad_()
    value = TripletLoss(MARGIN)(embeddings, torch.arange(len(labels)))  # no positive pairs
    value.backward()
    assert value.item() == 0.0 and embeddings.grad is not None
    assert TripletLoss().learnable_parameters() == []

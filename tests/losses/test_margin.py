"""Margin loss and distance-weighted sampling: vectorised code vs slow loops, vs pytorch-metric-learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from .reference import margin_loss as reference_margin_loss
from .reference import negative_probabilities as reference_negative_probabilities

from dcml.errors import UserError
from dcml.losses import DistanceWeightedMiner, MarginLoss

ALPHA, BETA = 0.2, 1.2
NUM_LEARNERS, NUM_CLASSES = 3, 5


def unit_embeddings(num: int, dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num, dim, generator=generator, dtype=dtype), dim=1)


def batch(seed: int = 0, dim: int = 8, per_class: int = 4):
    embeddings = unit_embeddings(NUM_CLASSES * per_class, dim, seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    return embeddings, labels


def some_triplets(labels: torch.Tensor, count: int, seed: int):
    """A random subset of all valid (a, p, n) triplets, with repeats of the same anchor."""
    everything = [
        (a, p, n)
        for a in range(len(labels))
        for p in range(len(labels))
        for n in range(len(labels))
        if a != p and labels[a] == labels[p] and labels[a] != labels[n]
    ]
    chosen = torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed))[:count]
    return [everything[i] for i in chosen.tolist()]


def as_indices(triplets):
    return tuple(torch.tensor(column) for column in zip(*triplets))


def randomise_betas(loss: MarginLoss, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        loss.beta.copy_(0.9 + 0.6 * torch.rand(loss.beta.shape, generator=generator, dtype=loss.beta.dtype))


@pytest.mark.parametrize("beta_mode", ["learner", "class", "fixed"])
@pytest.mark.parametrize("nu", [0.0, 0.3])
def test_value_and_gradients_match_the_loop_reference(beta_mode, nu):
    embeddings, labels = batch(seed=1)
    triplets = some_triplets(labels, count=40, seed=2)
    loss = MarginLoss(ALPHA, BETA, nu, beta_mode, NUM_LEARNERS, NUM_CLASSES).double()
    if beta_mode != "fixed":
        randomise_betas(loss, seed=3)
    learner = 1

    mine = embeddings.clone().requires_grad_()
    value = loss(mine, labels, as_indices(triplets), learner=learner)
    value.backward()

    theirs = embeddings.clone().requires_grad_()
    beta_copy = loss.beta.detach().clone().requires_grad_(beta_mode != "fixed")
    if beta_mode == "learner":
        betas = [beta_copy[learner] for _ in triplets]
    elif beta_mode == "class":
        betas = [beta_copy[labels[a]] for a, _, _ in triplets]
    else:
        betas = [beta_copy for _ in triplets]
    expected = reference_margin_loss(theirs, triplets, betas, ALPHA, nu)
    expected.backward()

    # The batch must exercise the "divide by the non-zero terms" rule, not only all-active terms.
    assert 0.0 < loss.last_stats["active_fraction"] < 1.0
    assert loss.last_stats["num_triplets"] == len(triplets)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(mine.grad, theirs.grad)
    if beta_mode == "fixed":
        assert loss.learnable_parameters() == []
    else:
        torch.testing.assert_close(loss.beta.grad, beta_copy.grad)
        assert loss.beta.grad.count_nonzero() > 0


def test_fixed_beta_matches_pml_margin_loss_value_and_gradient():
    embeddings, labels = batch(seed=4)
    triplets = as_indices(some_triplets(labels, count=50, seed=5))
    raw_mine = (embeddings * 1.7).requires_grad_()
    raw_theirs = (embeddings * 1.7).requires_grad_()

    ours = MarginLoss(ALPHA, BETA, 0.0, "fixed", num_learners=1)(F.normalize(raw_mine, dim=1), labels, triplets)
    pml = pml_losses.MarginLoss(margin=ALPHA, beta=BETA, learn_beta=False, nu=0)
    # PML normalises its inputs again; doing the same normalisation first makes the gradients comparable.
    theirs = pml(F.normalize(raw_theirs, dim=1), labels, triplets)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(raw_mine.grad, raw_theirs.grad)


def test_per_class_beta_matches_pml_learnable_per_class_beta():
    embeddings, labels = batch(seed=6)
    triplets = as_indices(some_triplets(labels, count=50, seed=7))
    nu = 0.1  # PML normalises the per-class beta regulariser by the non-zero count too, so nu may be > 0
    ours = MarginLoss(ALPHA, BETA, nu, "class", NUM_LEARNERS, NUM_CLASSES).double()
    randomise_betas(ours, seed=8)
    pml = pml_losses.MarginLoss(margin=ALPHA, beta=BETA, learn_beta=True, nu=nu, num_classes=NUM_CLASSES)
    with torch.no_grad():
        pml.beta.copy_(ours.beta.float())
    pml = pml.double()

    ours_value = ours(embeddings, labels, triplets)
    theirs_value = pml(embeddings, labels, triplets)
    ours_value.backward()
    theirs_value.backward()
    torch.testing.assert_close(ours_value, theirs_value)
    torch.testing.assert_close(ours.beta.grad, pml.beta.grad)


def test_single_learnable_beta_matches_pml_when_nu_is_zero():
    # PML adds a single beta's regulariser un-normalised (nu * beta); Wu et al. divide it by the
    # number of non-zero terms like the pair terms. The definitions agree for nu = 0, DCML's setting.
    embeddings, labels = batch(seed=9)
    triplets = as_indices(some_triplets(labels, count=50, seed=10))
    ours = MarginLoss(ALPHA, BETA, 0.0, "learner", num_learners=1).double()
    pml = pml_losses.MarginLoss(margin=ALPHA, beta=BETA, learn_beta=True, nu=0).double()
    ours_value, theirs_value = ours(embeddings, labels, triplets), pml(embeddings, labels, triplets)
    ours_value.backward()
    theirs_value.backward()
    torch.testing.assert_close(ours_value, theirs_value)
    torch.testing.assert_close(ours.beta.grad, pml.beta.grad)


@pytest.mark.parametrize("nu", [0.0, 0.5])
def test_no_active_term_gives_zero_with_a_graph(nu):
    # Positive pair at distance 0 (< beta - alpha), negative at distance 2 (> beta + alpha).
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    loss = MarginLoss(ALPHA, BETA, nu, "learner")
    value = loss(embeddings, labels, as_indices([(0, 1, 2)]))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))
    assert loss.beta.grad is not None and loss.beta.grad.abs().sum() == 0
    assert loss.last_stats["active_fraction"] == 0.0


def test_no_triplet_gives_zero_with_a_graph():
    embeddings = unit_embeddings(4, 6, seed=0, dtype=torch.float32).requires_grad_()
    labels = torch.arange(4)  # every item its own class: no positive pair, nothing to mine
    loss = MarginLoss()
    value = loss(embeddings, labels)
    value.backward()
    assert value.item() == 0.0 and embeddings.grad is not None
    assert loss.last_stats["num_triplets"] == 0.0


def test_class_beta_rejects_labels_outside_the_class_range():
    embeddings, labels = batch(seed=0)
    loss = MarginLoss(beta_mode="class", num_classes=NUM_CLASSES - 1)
    with pytest.raises(ValueError, match="remap"):
        loss(embeddings.float(), labels)


def test_learner_beta_is_picked_by_learner():
    embeddings, labels = batch(seed=11)
    triplets = as_indices(some_triplets(labels, count=30, seed=12))
    loss = MarginLoss(beta_mode="learner", num_learners=NUM_LEARNERS).double()
    loss(embeddings, labels, triplets, learner=2).backward()
    assert loss.beta.grad[2] != 0 and loss.beta.grad[0] == 0 and loss.beta.grad[1] == 0
    with pytest.raises(ValueError, match="learner 3 out of range"):
        loss(embeddings, labels, triplets, learner=NUM_LEARNERS)


# --------------------------------------------------------------------------------------------------
# Distance-weighted sampling


@pytest.mark.parametrize("dim", [3, 5, 32, 128, 512])
def test_sampling_probabilities_match_the_loop_reference(dim):
    embeddings, labels = batch(seed=dim, dim=dim)
    miner = DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    probabilities = miner.sampling_probabilities(embeddings, labels)
    assert torch.isfinite(probabilities).all()
    for anchor in range(len(labels)):
        expected = reference_negative_probabilities(embeddings, labels, anchor, 0.5, 1.4)
        torch.testing.assert_close(probabilities[anchor], torch.tensor(expected, dtype=probabilities.dtype))


@pytest.mark.parametrize("dim", [512, 4096])
def test_large_dimension_float32_gives_finite_normalised_probabilities(dim):
    # At n = 4096 the log-weights exceed 2000: exp() overflows even in float64 without the row max.
    # Points around a common direction, so pairwise distances (~0.9) fall inside [cutoff, 1.4) even
    # though random points in high dimension are all ~sqrt(2) apart.
    noise, labels = batch(seed=0, dim=dim)
    embeddings = F.normalize(F.normalize(torch.ones(dim, dtype=noise.dtype), dim=0) + 0.8 * noise, dim=1)
    probabilities = DistanceWeightedMiner().sampling_probabilities(embeddings.float(), labels)
    assert (probabilities[labels[:, None] != labels[None, :]] > 0).all()  # not the uniform fallback
    assert torch.isfinite(probabilities).all()
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(labels), dtype=probabilities.dtype))
    assert (probabilities[labels[:, None] == labels[None, :]] == 0).all()


NUM_POSITIVES, NUM_NEGATIVES = 20, 24


def anchor_with_many_positives(dim: int = 5):
    """Anchor 0 with 20 positives, so one mine() call gives 20 draws for it, and 24 negatives (each its
    own class, adding no pairs), one antipodal (beyond any cutoff) and one closer than the 0.5 clamp."""
    positives = unit_embeddings(NUM_POSITIVES + 1, dim, seed=14)
    negatives = unit_embeddings(NUM_NEGATIVES, dim, seed=13)
    negatives[0] = -positives[0]
    negatives[1] = F.normalize(positives[0] + 0.1 * negatives[1], dim=0)
    embeddings = torch.cat([positives, negatives]).float()
    labels = torch.cat([torch.zeros(NUM_POSITIVES + 1, dtype=torch.long), torch.arange(1, NUM_NEGATIVES + 1)])
    return embeddings, labels


def test_empirical_negative_distribution_matches_the_probabilities():
    embeddings, labels = anchor_with_many_positives()
    miner = DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    expected = torch.tensor(reference_negative_probabilities(embeddings, labels, 0, 0.5, 1.4))
    beyond_cutoff = torch.cdist(embeddings[:1].double(), embeddings.double())[0] >= 1.4
    assert beyond_cutoff[labels != 0].any() and (expected[labels != 0] > 0).sum() >= 5

    torch.manual_seed(0)
    num_calls = 1000  # 20 draws each: 20k draws, so a probability's standard error is <= 0.0035
    counts = torch.zeros(len(labels))
    for _ in range(num_calls):
        anchors, positives, negatives = miner.mine(embeddings, labels)
        # Every anchor-positive pair gets exactly one triplet; negatives always have another label.
        assert len(anchors) == (NUM_POSITIVES + 1) * NUM_POSITIVES
        assert (labels[anchors] == labels[positives]).all() and (anchors != positives).all()
        assert (labels[negatives] != labels[anchors]).all()
        counts += torch.bincount(negatives[anchors == 0], minlength=len(labels))
    empirical = counts / counts.sum()
    assert counts.sum() == num_calls * NUM_POSITIVES
    assert (empirical - expected).abs().max() < 0.02
    assert counts[beyond_cutoff].sum() == 0  # negatives with zero loss are never drawn


def test_anchor_whose_negatives_are_all_beyond_the_cutoff_draws_uniformly():
    embeddings = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    embeddings = F.normalize(embeddings + torch.tensor([0.0, 0.0, 0.01]), dim=1)  # d(0, 3) ~ 1.42
    labels = torch.tensor([0, 0, 1, 2])
    probabilities = DistanceWeightedMiner(nonzero_loss_cutoff=1.4).sampling_probabilities(embeddings, labels)
    torch.testing.assert_close(probabilities[0], torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64))
    expected = reference_negative_probabilities(embeddings, labels, 0, 0.5, 1.4)
    torch.testing.assert_close(probabilities[0], torch.tensor(expected, dtype=torch.float64))


def test_anchors_without_positive_or_negative_give_no_triplet():
    embeddings = unit_embeddings(5, 4, seed=0, dtype=torch.float32)
    miner = DistanceWeightedMiner()
    anchors, _, _ = miner.mine(embeddings, torch.tensor([0, 0, 1, 2, 3]))
    assert set(anchors.tolist()) == {0, 1}
    anchors, positives, negatives = miner.mine(embeddings, torch.zeros(5, dtype=torch.long))
    assert anchors.numel() == positives.numel() == negatives.numel() == 0
    assert anchors.dtype == torch.long


def test_sampling_is_reproducible_under_the_global_seed_and_a_generator():
    embeddings, labels = anchor_with_many_positives()
    miner = DistanceWeightedMiner()
    torch.manual_seed(123)
    first = miner.mine(embeddings, labels)
    torch.manual_seed(123)
    second = miner.mine(embeddings, labels)
    third = miner.mine(embeddings, labels)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(second[2], third[2])

    def with_generator(seed):
        return DistanceWeightedMiner(generator=torch.Generator().manual_seed(seed)).mine(embeddings, labels)

    assert torch.equal(with_generator(7)[2], with_generator(7)[2])
    assert not torch.equal(with_generator(7)[2], with_generator(8)[2])


def test_default_miner_cutoff_is_beta_plus_alpha():
    loss = MarginLoss(alpha=0.3, beta=1.0)
    assert math.isclose(loss.miner.nonzero_loss_cutoff, 1.3)
    assert loss.miner.cutoff == 0.5


def test_one_dimensional_embeddings_are_a_user_error():
    with pytest.raises(UserError, match="dimension >= 2"):
        DistanceWeightedMiner().mine(torch.ones(4, 1), torch.tensor([0, 0, 1, 1]))

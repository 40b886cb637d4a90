"""PMLLoss: any pytorch-metric-learning loss (and miner) behind dcml's loss interface."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from dcml.errors import MissingDependencyError, UserError
from dcml.losses import PMLLoss, create_loss

NUM_CLASSES, EMBEDDING_SIZE = 4, 8


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(NUM_CLASSES * 4, EMBEDDING_SIZE, generator=generator), dim=1)
    return embeddings, torch.arange(NUM_CLASSES).repeat_interleave(4)


def test_same_value_as_calling_pml_directly():
    embeddings, labels = batch()
    ours = PMLLoss("ContrastiveLoss", pos_margin=0.1, neg_margin=0.9)
    theirs = pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9)
    torch.testing.assert_close(ours(embeddings, labels), theirs(embeddings, labels))
    assert ours.learnable_parameters() == []


def test_miner_output_is_passed_to_the_loss():
    embeddings, labels = batch(seed=1)
    ours = PMLLoss(
        "TripletMarginLoss",
        "TripletMarginMiner",
        miner_kwargs={"margin": 0.1, "type_of_triplets": "semihard"},
        margin=0.1,
    )
    miner = pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")
    triplets = miner(embeddings, labels)
    expected = pml_losses.TripletMarginLoss(margin=0.1)(embeddings, labels, triplets)
    torch.testing.assert_close(ours(embeddings, labels), expected)
    assert ours.last_stats["num_triplets"] == len(triplets[0]) > 0


def test_shared_instance_ignores_the_learner():
    embeddings, labels = batch(seed=2)
    loss = PMLLoss("MultiSimilarityLoss", num_learners=3)
    assert len(loss.pml_losses) == 1
    torch.testing.assert_close(loss(embeddings, labels, learner=0), loss(embeddings, labels, learner=2))


def test_per_learner_instances_have_their_own_parameters():
    embeddings, labels = batch(seed=3)
    # ProxyAnchorLoss requires num_classes: the adapter passes it on; embedding_size is the user's.
    loss = PMLLoss(
        "ProxyAnchorLoss", per_learner=True, num_learners=3, num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE
    )
    assert len(loss.pml_losses) == 3
    proxies = loss.learnable_parameters()
    assert len(proxies) == 3 and all(p.shape == (NUM_CLASSES, EMBEDDING_SIZE) for p in proxies)
    assert not torch.equal(proxies[0], proxies[1])  # independently initialised

    value = loss(embeddings, labels, learner=1)
    torch.testing.assert_close(value, loss.pml_losses[1](embeddings, labels))
    value.backward()
    assert proxies[0].grad is None and proxies[2].grad is None
    assert proxies[1].grad is not None and proxies[1].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="learner 3 out of range"):
        loss(embeddings, labels, learner=3)


def test_create_loss_builds_a_pml_loss_with_nested_kwargs():
    embeddings, labels = batch(seed=4)
    loss = create_loss(
        "pml", num_learners=2, num_classes=NUM_CLASSES, loss_name="ContrastiveLoss", loss_kwargs={"neg_margin": 0.8}
    )
    expected = pml_losses.ContrastiveLoss(neg_margin=0.8)(embeddings, labels)
    torch.testing.assert_close(loss(embeddings, labels, learner=1), expected)


def test_unknown_names_suggest_close_matches():
    with pytest.raises(UserError, match="unknown PML loss 'ContrastivLoss'; close matches: ContrastiveLoss"):
        PMLLoss("ContrastivLoss")
    with pytest.raises(UserError, match="unknown PML miner 'BatchHardMinr'.*BatchHardMiner"):
        PMLLoss("ContrastiveLoss", "BatchHardMinr")


def test_bad_constructor_arguments_are_user_errors():
    with pytest.raises(UserError, match="PML loss ContrastiveLoss: .*unexpected keyword argument 'gamma'"):
        PMLLoss("ContrastiveLoss", gamma=1.0)
    with pytest.raises(UserError, match="PML loss ProxyAnchorLoss: .*embedding_size"):
        PMLLoss("ProxyAnchorLoss", num_classes=NUM_CLASSES)


def test_missing_pytorch_metric_learning_is_reported_with_the_install_command(monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    for module in ("pytorch_metric_learning", "pytorch_metric_learning.losses", "pytorch_metric_learning.miners"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match="pip install pytorch-metric-learning"):
        PMLLoss("ContrastiveLoss")

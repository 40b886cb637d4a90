import pytest
import torch
import torch.nn.functional as F

from dcml.models.backbones import create_backbone
from dcml.models.embedding_model import EmbeddingHead, EmbeddingModel


def test_slices_are_normalised_contiguous_parts():
    head = EmbeddingHead(10, 12, 3, "slices", dropout=0.0)
    raw = torch.randn(5, 12)
    for c in range(3):
        expected = F.normalize(raw[:, 4 * c : 4 * (c + 1)], dim=1)
        assert torch.allclose(head.learner_embedding(raw, c), expected)
    full = head.full_embedding(raw)
    parts = [F.normalize(raw[:, 4 * c : 4 * (c + 1)], dim=1) for c in range(3)]
    assert torch.allclose(full, F.normalize(torch.cat(parts, 1), dim=1))
    assert torch.allclose(full.norm(dim=1), torch.ones(5))


def test_hierarchical_learners_split_their_parent_slice():
    head = EmbeddingHead(10, 16, 4, "slices", dropout=0.0)
    raw = torch.randn(3, 16)
    assert torch.allclose(head.learner_embedding(raw, 1, active_learners=2), F.normalize(raw[:, 8:], dim=1))
    assert torch.allclose(head.learner_embedding(raw, 0, active_learners=1), F.normalize(raw, dim=1))
    with pytest.raises(ValueError):
        head.learner_embedding(raw, 2, active_learners=2)


def test_masks_start_as_the_full_embedding_and_regulariser_measures_overlap():
    head = EmbeddingHead(10, 6, 3, "masks", dropout=0.0)
    raw = torch.randn(4, 6)
    assert torch.allclose(head.learner_embedding(raw, 2), F.normalize(raw, dim=1))
    assert head.mask_similarity().item() == pytest.approx(1.0)
    with torch.no_grad():
        head.masks.copy_(torch.eye(3).repeat_interleave(2, dim=1))  # disjoint masks
    assert head.mask_similarity().item() == pytest.approx(0.0)
    masked = raw * torch.tensor([0, 0, 1, 1, 0, 0.0])
    assert torch.allclose(head.learner_embedding(raw, 1), F.normalize(masked, dim=1))
    # A loop over pairs as the reference for the mean pairwise cosine similarity.
    with torch.no_grad():
        head.masks.copy_(torch.randn(3, 6))
    relu = F.relu(head.masks)
    pairs = [F.cosine_similarity(relu[i], relu[j], dim=0) for i in range(3) for j in range(i + 1, 3)]
    assert head.mask_similarity().item() == pytest.approx(torch.stack(pairs).mean().item(), abs=1e-6)


def _model(trainable_blocks, freeze_bn=True):
    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", pretrained=False)
    return EmbeddingModel(backbone, EmbeddingHead(backbone.feature_dim, 8, 2, dropout=0.0), trainable_blocks, freeze_bn)


def test_cached_frozen_units_equal_a_full_forward():
    model = _model(trainable_blocks=4).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        full = model.backbone(images)
        split = model.features(model.frozen_forward(images), cached=True)
    assert torch.allclose(full, split, atol=1e-5)
    trainable = {id(p) for p in model.backbone_parameters()}
    assert trainable and all(not p.requires_grad for p in model.backbone.parameters() if id(p) not in trainable)


def test_frozen_bn_statistics_do_not_move_in_training():
    model = _model(trainable_blocks=None, freeze_bn=True).train()
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(bn.running_mean, before)
    moving = _model(trainable_blocks=None, freeze_bn=False).train()
    bn = next(m for m in moving.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    moving(torch.randn(4, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before)

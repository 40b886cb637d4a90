"""What every registered backbone promises, checked for each one at random init (``pretrained=False``).

``forward`` gives ``feature_dim`` pooled features; the test and train transforms give tensors of the
backbone's ``input_size``; the backbone splits into ``units()`` whose composition, followed by
global average pooling, is ``forward``, so ``model.trainable_blocks`` freezes all but the last units
(a backbone without units refuses ``trainable_blocks`` in one line instead). A backbone whose
package is not installed (``MissingDependencyError``) is skipped.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import training.conftest  # noqa: F401 - registers the tiny test backbone, so it is checked too
from dcml.errors import MissingDependencyError, UserError
from dcml.models.backbones import Backbone, available_backbones, create_backbone
from dcml.models.embedding_model import EmbeddingHead, EmbeddingModel

BACKBONES = sorted(available_backbones())
#: Small enough that ResNet-50 runs in milliseconds on two cores, large enough for every stride.
IMAGE_SIZE = 32
BATCH = 2
EMBEDDING_DIM = 8


@functools.lru_cache(maxsize=None)
def _build(name: str) -> Backbone | MissingDependencyError:
    try:
        torch.manual_seed(0)
        return create_backbone(name, pretrained=False)
    except MissingDependencyError as missing:
        return missing


def backbone_named(name: str) -> Backbone:
    backbone = _build(name)
    if isinstance(backbone, MissingDependencyError):
        pytest.skip(str(backbone))
    return backbone


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny batches (tests/conftest.py)


def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def test_the_contract_covers_the_builtin_and_test_backbones():
    assert {"efficientnet_lite0", "resnet18", "resnet50", training.conftest.TINY} <= set(BACKBONES)


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_gives_feature_dim_pooled_features(name):
    backbone = backbone_named(name).eval()
    assert backbone.name == name and backbone.feature_dim > 0 and backbone.weights_source is None
    with torch.inference_mode():
        features = backbone(images())
    assert features.shape == (BATCH, backbone.feature_dim) and torch.isfinite(features).all()


@pytest.mark.parametrize("name", BACKBONES)
def test_transforms_give_input_size_tensors(name):
    backbone = backbone_named(name)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    size = backbone.input_size
    for transform in (backbone.test_transform(), backbone.train_transform(), backbone.train_transform(horizontal_flip=False)):
        tensor = transform(picture)
        assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32
    assert backbone.test_transform(IMAGE_SIZE)(picture).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("name", BACKBONES)
def test_units_compose_to_forward(name):
    backbone = backbone_named(name).eval()
    if backbone.num_units is None:
        with pytest.raises(UserError, match="model.trainable_blocks") as info:
            backbone.units()
        assert "\n" not in str(info.value)
        return
    units = backbone.units()
    assert len(units) >= 2 and backbone.num_units == len(units)
    with torch.inference_mode():
        x = images()
        for unit in units:
            x = unit(x)
        torch.testing.assert_close(x.mean(dim=(2, 3)), backbone(images()))


@pytest.mark.parametrize("name", BACKBONES)
def test_trainable_blocks_freeze_all_but_the_last_units(name):
    backbone = backbone_named(name)
    if backbone.num_units is None:
        pytest.skip(f"{name} has no units (checked above: trainable_blocks is refused)")
    head = EmbeddingHead(backbone.feature_dim, EMBEDDING_DIM, num_learners=1)
    model = EmbeddingModel(backbone, head, trainable_blocks=1).train()
    *frozen, last = backbone.units()
    trainable = {id(p) for p in last.parameters()}
    assert {id(p) for p in model.backbone_parameters()} == trainable and trainable
    model(images()).sum().backward()
    try:
        for unit in frozen:  # in eval mode (no BN statistics move) and without gradients
            assert not any(module.training for module in unit.modules() if not list(module.children()))
            assert all(not p.requires_grad and p.grad is None for p in unit.parameters())
        assert all(p.grad is not None for p in last.parameters())
    finally:  # the built backbone is shared by this module's tests: give it back whole
        backbone.requires_grad_(True)
        backbone.zero_grad(set_to_none=True)
        backbone.eval()

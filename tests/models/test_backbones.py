"""The backbone registry: names, errors, real EfficientNet-Lite0 weights, --weights loading, offline rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcml.errors import MissingDependencyError, UserError
from dcml.models.backbones import (
    INCEPTION_MEAN,
    Backbone,
    available_backbones,
    create_backbone,
    efficientnet_lite0_weights_path,
    register_backbone,
)
from dcml.models.efficientnet_lite import SamePadConv2d, efficientnet_lite0


def test_registry_lists_builtin_backbones():
    names = list(available_backbones())
    assert {"efficientnet_lite0", "resnet18", "resnet50"} <= set(names)
    assert names == sorted(names)
    assert all(spec.description for spec in available_backbones().values())


def test_unknown_backbone_is_a_user_error_listing_the_names():
    with pytest.raises(UserError, match="unknown backbone 'resnet9000'.*efficientnet_lite0.*resnet50") as info:
        create_backbone("resnet9000")
    assert "\n" not in str(info.value)


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="registered twice"):
        register_backbone("resnet18")(lambda pretrained: None)


def test_efficientnet_lite0_file_loads_strictly_with_classifier():
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = efficientnet_lite0(num_classes=1000)
    model.load_state_dict(state, strict=True)  # every key, every shape
    # The ImageNet weights are trained, not an initialisation: BN statistics moved away from 0 / 1.
    assert state["_bn0.running_var"].std() > 0.1
    assert state["_fc.weight"].shape == (1000, 1280)


def test_efficientnet_lite0_pretrained_features():
    backbone = create_backbone("efficientnet_lite0")
    assert isinstance(backbone, Backbone)
    assert backbone.feature_dim == 1280 and backbone.input_size == 224
    assert backbone.mean == pytest.approx(INCEPTION_MEAN) and backbone.weights_source is not None
    backbone.eval()
    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        features = backbone(images)
    assert features.shape == (3, 1280)
    assert torch.isfinite(features).all()
    assert (features >= 0).all()  # ReLU6 before the pooling
    assert not torch.allclose(features[0], features[1])


def test_efficientnet_lite0_imagenet_logits_are_confident_on_a_real_photo():
    # A photo that ships with matplotlib: Grace Hopper in uniform. Skipped if matplotlib lacks it.
    matplotlib = pytest.importorskip("matplotlib")
    from pathlib import Path

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample photo not installed")
    model = efficientnet_lite0(num_classes=1000)
    model.load_state_dict(torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True))
    model.eval()
    transform = create_backbone("efficientnet_lite0", pretrained=False).test_transform(224)
    with torch.inference_mode():
        probabilities = model(transform(Image.open(photo).convert("RGB")).unsqueeze(0)).softmax(-1)[0]
    top5 = set(probabilities.topk(5).indices.tolist())
    # ImageNet: 400 academic gown, 652 military uniform, 667 mortarboard, 457 bow tie.
    assert top5 & {400, 652, 667, 457}
    assert probabilities.max() > 0.15


def test_same_padding_matches_tensorflow_rule():
    conv = SamePadConv2d(1, 1, 3, stride=2)
    for size in (7, 8, 64, 100, 101):
        out = conv(torch.zeros(1, 1, size, size))
        assert out.shape[-1] == -(-size // 2)  # ceil(size / stride)
    assert SamePadConv2d._pad_amounts(8, 3, 2) == (0, 1)  # TF pads more at the end
    assert SamePadConv2d._pad_amounts(7, 3, 2) == (1, 1)


def test_resnet18_random_init_works():
    backbone = create_backbone("resnet18", pretrained=False)
    assert backbone.feature_dim == 512 and backbone.weights_source is None
    backbone.eval()
    with torch.inference_mode():
        features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 512)


def test_transforms_produce_normalised_tensors_of_the_requested_size():
    backbone = create_backbone("resnet18", pretrained=False)
    image = Image.fromarray(np.full((40, 60, 3), 255, dtype=np.uint8))
    test = backbone.test_transform(32)(image)
    assert test.shape == (3, 32, 32)
    expected = (1.0 - np.array(backbone.mean)) / np.array(backbone.std)
    assert np.allclose(test.mean(dim=(1, 2)).numpy(), expected, atol=1e-4)
    assert backbone.train_transform(48)(image).shape == (3, 48, 48)
    assert backbone.test_transform()(image).shape == (3, 224, 224)
    names = [type(step).__name__ for step in backbone.train_transform(48, horizontal_flip=False).transforms]
    assert "RandomHorizontalFlip" not in names and names[0] == "RandomResizedCrop"


@pytest.mark.parametrize("wrap", ["plain", "module_prefix", "state_dict", "model"])
def test_weights_path_round_trip(tmp_path, wrap):
    torch.manual_seed(1)
    source = create_backbone("resnet18", pretrained=False)
    state = {f"module.{k}" if wrap != "plain" else k: v for k, v in source.trunk.state_dict().items()}
    state["module.fc.weight" if wrap != "plain" else "fc.weight"] = torch.zeros(1000, 512)  # classifier: ignored
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "model":
        state = {"model": state}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    loaded = create_backbone("resnet18", weights=path)
    assert loaded.weights_source == str(path)
    images = torch.randn(2, 3, 32, 32)
    source.eval(), loaded.eval()
    with torch.inference_mode():
        assert torch.equal(source(images), loaded(images))


def test_saved_backbone_state_dict_loads_back(tmp_path):
    source = create_backbone("resnet18", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "b.pt")  # keys start with "trunk."
    loaded = create_backbone("resnet18", weights=tmp_path / "b.pt")
    assert torch.equal(loaded.trunk.conv1.weight, source.trunk.conv1.weight)


def test_missing_weights_file_is_a_one_line_user_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="nope.pth not found"):
        create_backbone("resnet18", weights=missing)


def test_unreadable_weights_file_is_a_user_error(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file .*garbage.pth") as info:
        create_backbone("resnet18", weights=garbage)
    assert "\n" not in str(info.value)


def test_weights_of_another_architecture_are_a_user_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(create_backbone("resnet18", pretrained=False).trunk.state_dict(), path)
    with pytest.raises(UserError, match=r"r18.pth does not fit backbone 'resnet50'") as info:
        create_backbone("resnet50", weights=path)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="does not fit backbone 'efficientnet_lite0'"):
        create_backbone("efficientnet_lite0", weights=path)


def test_resnet_pretrained_without_cached_weights_fails_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingDependencyError, match="not available offline.*--weights PATH") as info:
        create_backbone("resnet50", pretrained=True)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UserError)  # the CLI prints it on one line, exit 2


def test_resnet_pretrained_uses_the_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    cached = tmp_path / "checkpoints" / url.rsplit("/", 1)[-1]
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), cached)
    backbone = create_backbone("resnet18", pretrained=True)
    assert backbone.weights_source == str(cached)
    assert torch.equal(backbone.trunk.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)

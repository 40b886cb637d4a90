"""timm models as backbones: by name, random init, weights only from a local file (never the hub)."""

from __future__ import annotations

import pytest
import torch

from dcml.errors import MissingDependencyError, UserError
from dcml.models.backbones import create_backbone, default_weights_path

timm = pytest.importorskip("timm")


def test_any_timm_model_by_name_gives_pooled_features():
    backbone = create_backbone("timm/convnext_atto", pretrained=False)
    assert backbone(torch.zeros(2, 3, 64, 64)).shape == (2, backbone.feature_dim) == (2, 320)
    assert backbone.num_units is None  # trainable_blocks is refused in one line for timm models


def test_names_and_missing_weights_are_one_line():
    with pytest.raises(UserError, match="did you mean timm/convnext_atto"):
        create_backbone("timm/convnxt_atto", pretrained=False)
    with pytest.raises(MissingDependencyError, match="never downloads"):
        create_backbone("timm/convnext_atto", pretrained=True)
    with pytest.raises(MissingDependencyError, match="--weights"):
        default_weights_path("timm/efficientnet_b0")  # what --dry-run reports


def test_weights_from_a_safetensors_file_or_a_state_dict(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", pretrained=False)  # with its classifier, as hub files are
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save(source.state_dict(), tmp_path / "model.pth")
    for path in (tmp_path / "model.safetensors", tmp_path / "model.pth"):
        backbone = create_backbone("timm/resnet18", weights=path)
        assert torch.equal(backbone.trunk.conv1.weight, source.conv1.weight)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot read weights file"):
        create_backbone("timm/resnet18", weights=tmp_path / "bad.safetensors")

"""Models: the backbone registry (EfficientNet-Lite0, ResNet-18/50)."""

from dcml.models.backbones import Backbone, available_backbones, create_backbone, register_backbone

__all__ = ["Backbone", "available_backbones", "create_backbone", "register_backbone"]

"""Metric losses for DCML: margin loss (Wu et al. 2017), triplet loss, and any pytorch-metric-learning loss.

Each loss is registered with the dataclass of its settings (``loss.settings`` in the configuration):
``build_loss(name, settings, num_learners=..., num_classes=...)`` builds one from that dataclass,
``create_loss(name, num_learners=..., num_classes=..., **settings)`` from keywords. Every loss is
called as ``loss(embeddings, labels, indices_tuple=None, learner=0)`` and returns a scalar tensor.
"""

from dcml.losses.base import LossSettings, MetricLoss, TripletMiner
from dcml.losses.margin import DistanceWeightedMiner, MarginLoss, MarginSettings
from dcml.losses.pml import PMLLoss, PMLSettings
from dcml.losses.registry import available_losses, build_loss, create_loss, loss_spec, register_loss
from dcml.losses.triplet import SemiHardMiner, TripletLoss, TripletSettings

__all__ = [
    "DistanceWeightedMiner",
    "LossSettings",
    "MarginLoss",
    "MarginSettings",
    "MetricLoss",
    "PMLLoss",
    "PMLSettings",
    "SemiHardMiner",
    "TripletLoss",
    "TripletMiner",
    "TripletSettings",
    "available_losses",
    "build_loss",
    "create_loss",
    "loss_spec",
    "register_loss",
]

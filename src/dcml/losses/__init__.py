"""Metric losses for DCML: margin loss (Wu et al. 2017), triplet loss, and any pytorch-metric-learning loss.

``create_loss(name, num_learners=..., num_classes=..., **settings)`` builds one by name; every loss is
called as ``loss(embeddings, labels, indices_tuple=None, learner=0)`` and returns a scalar tensor.
"""

from dcml.losses.base import MetricLoss, TripletMiner
from dcml.losses.margin import DistanceWeightedMiner, MarginLoss
from dcml.losses.pml import PMLLoss
from dcml.losses.registry import available_losses, create_loss, register_loss
from dcml.losses.triplet import SemiHardMiner, TripletLoss

__all__ = [
    "DistanceWeightedMiner",
    "MarginLoss",
    "MetricLoss",
    "PMLLoss",
    "SemiHardMiner",
    "TripletLoss",
    "TripletMiner",
    "available_losses",
    "create_loss",
    "register_loss",
]

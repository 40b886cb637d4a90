"""The optimiser: Adam with one parameter group per kind of weight, each with its own learning rate."""

from __future__ import annotations

import torch

from dcml.config import TrainConfig
from dcml.training.schedule import EpochPlan


def build_optimizer(model, loss: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Groups: backbone, embedding (the linear head), masks (TPAMI; lr x mask_lr_multiplier) and the
    loss's learnable parameters (beta; no weight decay)."""
    o, m = config.optimizer, config.model
    head = model.head
    groups = [
        {"name": "backbone", "params": model.backbone_parameters(), "lr": o.lr_backbone, "weight_decay": o.weight_decay},
        {"name": "embedding", "params": list(head.linear.parameters()), "lr": o.lr_embedding, "weight_decay": o.weight_decay},
    ]
    if head.masks is not None:
        groups.append({"name": "masks", "params": [head.masks], "lr": o.lr_embedding * m.mask_lr_multiplier,
                       "weight_decay": o.weight_decay * o.mask_weight_decay_multiplier})
    betas = list(loss.learnable_parameters())
    if betas:
        groups.append({"name": "beta", "params": betas, "lr": o.lr_beta, "weight_decay": 0.0})
    return torch.optim.Adam([g for g in groups if g["params"]])


def set_learning_rates(optimizer: torch.optim.Optimizer, base_rates: list[float], plan: EpochPlan) -> None:
    """The planned step decay: every group at its base rate x the epoch's scale."""
    for group, base in zip(optimizer.param_groups, base_rates):
        group["lr"] = base * plan.lr_scale

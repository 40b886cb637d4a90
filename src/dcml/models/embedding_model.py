"""The divide-and-conquer model: a backbone, dropout, one linear embedding layer, K learners.

Learner c of K is either a fixed slice of the embedding (CVPR 2019: neurons [c*d/K, (c+1)*d/K),
L2-normalised on its own) or a learned mask over all d neurons (TPAMI 2021: normalise(e * ReLU(m_c)),
masks initialised to ones). The full embedding is the normalised concatenation of the normalised
slices (slices) or the normalised unmasked embedding (masks); it is what evaluation uses.

With hierarchical division the number of *active* learners grows 1 -> 2 -> 4 -> ... -> K. Active
learner c of A owns slice c of A equal slices, so its children 2c and 2c+1 (of 2A) split the
parent's slice in two; with masks it uses mask c * K / A, which its first child inherits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcml.models.backbones import Backbone

#: Keeps the norm of an all-zero slice (e.g. a fully masked learner) from dividing by zero.
NORM_EPS = 1e-12


class EmbeddingHead(nn.Module):
    def __init__(self, in_features: int, dim: int, num_learners: int, learner_head: str = "slices", dropout: float = 0.01):
        super().__init__()
        if learner_head not in ("slices", "masks"):
            raise ValueError(f"unknown learner head {learner_head!r}")
        if learner_head == "slices" and dim % num_learners:
            raise ValueError(f"{num_learners} learners do not divide embedding dimension {dim}")
        self.dim = dim
        self.num_learners = num_learners
        self.learner_head = learner_head
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, dim)
        self.masks = nn.Parameter(torch.ones(num_learners, dim)) if learner_head == "masks" else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) embedding, B x d."""
        return self.linear(self.dropout(features))

    def learner_embedding(self, raw: torch.Tensor, learner: int, active_learners: int | None = None) -> torch.Tensor:
        """The normalised output of learner ``learner`` of ``active_learners`` (default: all K)."""
        active = self.num_learners if active_learners is None else active_learners
        if not 0 <= learner < active or self.num_learners % active:
            raise ValueError(f"learner {learner} of {active} active (K = {self.num_learners})")
        if self.masks is not None:
            mask = F.relu(self.masks[learner * (self.num_learners // active)])
            return F.normalize(raw * mask, dim=1, eps=NORM_EPS)
        width = self.dim // active
        return F.normalize(raw[:, learner * width : (learner + 1) * width], dim=1, eps=NORM_EPS)

    def full_embedding(self, raw: torch.Tensor, active_learners: int | None = None) -> torch.Tensor:
        """The embedding evaluation uses (and the conquer phase trains)."""
        if self.masks is not None:
            return F.normalize(raw, dim=1, eps=NORM_EPS)
        active = self.num_learners if active_learners is None else active_learners
        # unflatten/flatten, not reshape(len(raw), ...): an exported graph keeps a free batch axis.
        slices = raw.unflatten(1, (active, self.dim // active))
        return F.normalize(F.normalize(slices, dim=2, eps=NORM_EPS).flatten(1), dim=1, eps=NORM_EPS)

    def mask_similarity(self) -> torch.Tensor:
        """Mean pairwise cosine similarity between the ReLU'd masks (TPAMI's regulariser; 0 for slices)."""
        if self.masks is None or self.num_learners < 2:
            return self.linear.weight.new_zeros(())
        masks = F.normalize(F.relu(self.masks), dim=1, eps=NORM_EPS)
        similarity = masks @ masks.T
        upper = torch.triu_indices(self.num_learners, self.num_learners, offset=1, device=masks.device)
        return similarity[upper[0], upper[1]].mean()


class EmbeddingModel(nn.Module):
    """Backbone (optionally only its last ``trainable_blocks`` units trained) + :class:`EmbeddingHead`.

    ``cached=True`` inputs are the output of the frozen lower units (see ``frozen_forward``), so a
    training loop can run the frozen part once per image and reuse it.
    """

    def __init__(self, backbone: Backbone, head: EmbeddingHead, trainable_blocks: int | None = None, freeze_bn_stats: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.trainable_blocks = trainable_blocks
        self.freeze_bn_stats = freeze_bn_stats
        if trainable_blocks is None:
            self._frozen_units: list[nn.Module] = []
            self._trainable_units: list[nn.Module] | None = None
        else:
            units = backbone.units()
            split = len(units) - trainable_blocks
            self._frozen_units, self._trainable_units = units[:split], units[split:]
            for unit in self._frozen_units:
                unit.requires_grad_(False)

    # ------------------------------------------------------------------ train/eval behaviour
    def train(self, mode: bool = True):
        super().train(mode)
        for unit in self._frozen_units:
            unit.eval()  # frozen units: never update BN statistics, no dropout
        if mode and self.freeze_bn_stats:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()  # running statistics stay ImageNet's; affine weights still train
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone parameters that train (all of them, or those of the last trainable_blocks units)."""
        if self._trainable_units is None:
            return list(self.backbone.parameters())
        return [p for unit in self._trainable_units for p in unit.parameters()]

    def set_backbone_trainable(self, trainable: bool) -> None:
        for parameter in self.backbone_parameters():
            parameter.requires_grad_(trainable)

    # ------------------------------------------------------------------ forward
    def frozen_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Output of the frozen lower units (the images themselves when everything trains)."""
        x = images
        for unit in self._frozen_units:
            x = unit(x)
        return x

    def features(self, inputs: torch.Tensor, cached: bool = False) -> torch.Tensor:
        """Pooled backbone features, B x feature_dim."""
        if self._trainable_units is None:
            return self.backbone(inputs)
        x = inputs if cached else self.frozen_forward(inputs)
        for unit in self._trainable_units:
            x = unit(x)
        return x.mean(dim=(2, 3))

    def forward(self, inputs: torch.Tensor, cached: bool = False) -> torch.Tensor:
        """The full (normalised) embedding of every input."""
        return self.head.full_embedding(self.head(self.features(inputs, cached)))


def build_model(config) -> EmbeddingModel:
    """The model a :class:`~dcml.config.TrainConfig` describes (weights loaded, head random)."""
    from dcml.models.backbones import create_backbone

    m = config.model
    backbone = create_backbone(m.backbone, pretrained=m.pretrained, weights=m.weights)
    head = EmbeddingHead(backbone.feature_dim, m.embedding_dim, config.clustering.learners, m.learner_head, m.dropout)
    return EmbeddingModel(backbone, head, trainable_blocks=m.trainable_blocks, freeze_bn_stats=m.freeze_bn_stats)

"""Margin loss with distance-weighted sampling (Wu, Manmatha, Smola, Krähenbühl 2017, "Sampling Matters
in Deep Embedding Learning"), the loss of Divide-and-Conquer metric learning.

The DCML authors' v1 code mined with a simpler "closest negatives beyond 0.5" rule and never handed
beta to the optimiser (so beta stayed 1.2); this module implements what the paper describes:
distance-weighted negative sampling and a learnable beta (per learner or per class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from dcml.errors import UserError, require
from dcml.losses.base import (
    SETTINGS_PATH,
    LossSettings,
    MetricLoss,
    Triplets,
    TripletMiner,
    check_triplets,
    pair_distances,
    pairwise_distances,
    positive_pairs,
    require_count,
    require_number,
    zero_loss,
)

BETA_MODES = ("learner", "class", "fixed")


@dataclass(frozen=True)
class MarginSettings(LossSettings):
    """``loss.settings`` of the margin loss. Defaults: Wu et al. 2017 (section 5 and their released
    code), which the DCML paper also uses."""

    alpha: float = 0.2  # margin between the pair distances and beta
    beta: float = 1.2  # initial boundary between positive and negative distances
    nu: float = 0.0  # weight of the beta regulariser; DCML trains with nu = 0
    # One learnable beta per learner (DCML), per class, or one fixed beta (DCML v1's code).
    beta_mode: Literal[BETA_MODES] = "learner"
    cutoff: float = 0.5  # distances are clamped below here before weighting (Wu et al., section 4)
    # Negatives this far or farther are never drawn (they give no loss); null: beta + alpha.
    nonzero_loss_cutoff: Optional[float] = None

    def validate(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            require(value > 0, f"{SETTINGS_PATH}{name} must be > 0; got {value}")
        require(self.nu >= 0, f"{SETTINGS_PATH}nu must be >= 0; got {self.nu}")
        require(self.cutoff >= 0, f"{SETTINGS_PATH}cutoff must be >= 0; got {self.cutoff}")
        default = " (null: beta + alpha)" if self.nonzero_loss_cutoff is None else ""
        require(self.miner_cutoff() > self.cutoff,
                f"{SETTINGS_PATH}nonzero_loss_cutoff must be > {SETTINGS_PATH}cutoff={self.cutoff}; "
                f"got {self.miner_cutoff():g}{default}")

    def miner_cutoff(self) -> float:
        """The distance from which negatives are not drawn: the setting, or beta + alpha."""
        return self.beta + self.alpha if self.nonzero_loss_cutoff is None else self.nonzero_loss_cutoff


# Keeps log(1 - d^2/4) finite for antipodal points (d = 2), where the sphere density vanishes.
_MIN_SPHERE_FACTOR = 1e-12
# The smallest embedding dimension for which the density of distances on the sphere is defined.
_MIN_SPHERE_DIMENSION = 2


class DistanceWeightedMiner(TripletMiner):
    """Distance-weighted negative sampling of Wu et al. 2017.

    For every ordered anchor-positive pair (a, p), a != p with the same label, one negative n is drawn
    with probability proportional to 1 / q(d_an), where q(d) ∝ d^(n-2) (1 - d^2/4)^((n-3)/2) is the
    density of distances between uniform points on the unit sphere in n = embedding dimension. The
    distance is clamped below at ``cutoff`` (so very close negatives are not over-weighted) and
    negatives at ``nonzero_loss_cutoff`` or farther get weight 0 (they would contribute no loss).
    If every negative of an anchor is that far, the negative is drawn uniformly among all its
    negatives instead. Anchors without a positive or without any negative yield no triplet.

    Embeddings are expected to be L2-normalised. Draws use ``generator`` if given, else torch's
    global RNG, so ``torch.manual_seed`` makes them reproducible.
    """

    def __init__(
        self,
        cutoff: float = MarginSettings.cutoff,
        nonzero_loss_cutoff: float = MarginSettings().miner_cutoff(),
        generator: torch.Generator | None = None,
    ):
        owner = "distance-weighted miner"
        self.cutoff = require_number(owner, "cutoff", cutoff, minimum=0.0)
        self.nonzero_loss_cutoff = require_number(
            owner, "nonzero_loss_cutoff", nonzero_loss_cutoff, minimum=self.cutoff, strictly_above=True
        )
        self.generator = generator

    def sampling_probabilities(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, B) matrix whose row a is the distribution of the negative drawn for anchor a.

        Rows of anchors without any negative are all zero.
        """
        dimension = embeddings.shape[1]
        if dimension < _MIN_SPHERE_DIMENSION:
            raise UserError(
                f"distance-weighted sampling needs embeddings of dimension >= {_MIN_SPHERE_DIMENSION}, got {dimension}"
            )
        # float64: the log-weights reach several hundred for n = 512, and B x B is small.
        distances = pairwise_distances(embeddings.detach().double()).clamp(min=self.cutoff)
        sphere_factor = (1.0 - distances.square() / 4.0).clamp(min=_MIN_SPHERE_FACTOR)
        log_weights = -(dimension - 2.0) * distances.log() - (dimension - 3.0) / 2.0 * sphere_factor.log()

        is_negative = labels[:, None] != labels[None, :]
        weighted = is_negative & (distances < self.nonzero_loss_cutoff)
        log_weights = log_weights.masked_fill(~weighted, float("-inf"))
        # Subtract each row's maximum so exp() neither overflows nor underflows to an all-zero row.
        row_max = log_weights.max(dim=1, keepdim=True).values
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = (log_weights - row_max).exp()

        # Fallback: an anchor whose negatives are all beyond the cutoff draws one uniformly.
        no_weighted_negative = ~weighted.any(dim=1, keepdim=True)
        weights = torch.where(no_weighted_negative, is_negative.double(), weights)
        totals = weights.sum(dim=1, keepdim=True)
        return weights / torch.where(totals > 0, totals, torch.ones_like(totals))

    def select_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        probabilities = self.sampling_probabilities(embeddings, labels)
        anchors, positives = positive_pairs(labels)
        has_negative = probabilities.sum(dim=1) > 0
        keep = has_negative[anchors]
        anchors, positives = anchors[keep], positives[keep]
        if anchors.numel() == 0:
            empty = anchors.new_empty(0)
            return empty, empty, empty
        negatives = torch.multinomial(probabilities[anchors], 1, generator=self.generator).squeeze(1)
        return anchors, positives, negatives


class MarginLoss(MetricLoss):
    """Margin loss of Wu et al. 2017 on the pairs of mined triplets.

    Each triplet (a, p, n) contributes the positive pair (a, p) and the negative pair (a, n); a pair
    term is ``max(0, alpha + y * (D - beta))`` with y = +1 for positive and -1 for negative pairs and D
    the Euclidean distance. The loss is ``(sum of pair terms + nu * sum over triplets of beta) /
    (number of non-zero pair terms)`` (Wu et al.; PML's MarginLoss in per-class mode) and exactly 0,
    with the autograd graph intact, when no term is non-zero.

    ``beta_mode``: "learner" learns one beta per learner (picked by ``learner``), "class" one beta per
    class (picked by the anchor's label, which must lie in [0, num_classes): the trainer remaps
    dataset labels to 0..C-1), "fixed" keeps beta constant. The default miner is
    :class:`DistanceWeightedMiner` with ``nonzero_loss_cutoff = beta + alpha`` (the initial beta).
    """

    def __init__(
        self,
        alpha: float = MarginSettings.alpha,
        beta: float = MarginSettings.beta,
        nu: float = MarginSettings.nu,
        beta_mode: str = MarginSettings.beta_mode,
        num_learners: int = 1,
        num_classes: int | None = None,
        miner: TripletMiner | None = None,
    ):
        owner = "margin loss"
        self.alpha = require_number(owner, "alpha", alpha, minimum=0.0, strictly_above=True)
        initial_beta = require_number(owner, "beta", beta, minimum=0.0, strictly_above=True)
        self.nu = require_number(owner, "nu", nu, minimum=0.0)
        if beta_mode not in BETA_MODES:
            raise UserError(f"{owner}: unknown beta_mode {beta_mode!r}; choose one of: {', '.join(BETA_MODES)}")
        self.beta_mode = beta_mode
        self.num_learners = require_count(owner, "num_learners", num_learners)
        if beta_mode == "class":
            if num_classes is None:
                raise UserError(f"{owner}: beta_mode 'class' needs num_classes")
            num_classes = require_count(owner, "num_classes", num_classes)
        self.num_classes = num_classes
        if miner is None:
            miner = DistanceWeightedMiner(nonzero_loss_cutoff=initial_beta + self.alpha)
        super().__init__(miner)

        if beta_mode == "learner":
            self.beta = nn.Parameter(torch.full((self.num_learners,), initial_beta))
        elif beta_mode == "class":
            self.beta = nn.Parameter(torch.full((num_classes,), initial_beta))
        else:
            # A setting, not training state: kept out of the state dict so a config change wins.
            self.register_buffer("beta", torch.tensor(initial_beta), persistent=False)

    def betas_for(self, anchor_labels: torch.Tensor, learner: int) -> torch.Tensor:
        """The beta used by each triplet, given the labels of its anchors."""
        if self.beta_mode == "learner":
            if not 0 <= learner < self.num_learners:
                raise ValueError(f"learner {learner} out of range for {self.num_learners} learners")
            return self.beta[learner].expand(anchor_labels.shape[0])
        if self.beta_mode == "class":
            if anchor_labels.numel() and (int(anchor_labels.min()) < 0 or int(anchor_labels.max()) >= self.num_classes):
                raise ValueError(f"per-class beta needs labels in [0, {self.num_classes}); remap them first")
            return self.beta[anchor_labels]
        return self.beta.expand(anchor_labels.shape[0])

    def compute_loss(self, embeddings, labels, indices_tuple, learner: int) -> torch.Tensor:
        anchors, positives, negatives = check_triplets(indices_tuple, embeddings.shape[0])
        device = embeddings.device
        anchors, positives, negatives = anchors.to(device), positives.to(device), negatives.to(device)
        betas = self.betas_for(labels[anchors], learner).to(embeddings.dtype)
        if anchors.numel() == 0:
            self.last_stats = {"num_triplets": 0.0, "active_fraction": 0.0, "beta_mean": self.beta.detach().mean()}
            return zero_loss(embeddings, self.beta)

        positive_distances = pair_distances(embeddings, anchors, positives)
        negative_distances = pair_distances(embeddings, anchors, negatives)
        positive_terms = torch.relu(self.alpha + (positive_distances - betas))
        negative_terms = torch.relu(self.alpha - (negative_distances - betas))
        num_active = (positive_terms > 0).sum() + (negative_terms > 0).sum()
        total = positive_terms.sum() + negative_terms.sum() + self.nu * betas.sum()
        # torch.where instead of an `if` keeps this free of a host sync; total * 0 keeps the graph.
        loss = torch.where(num_active > 0, total / num_active.clamp(min=1), total * 0.0)

        stats = torch.stack(
            [
                num_active.to(positive_distances.dtype) / (2 * anchors.numel()),
                betas.detach().mean(),
                positive_distances.detach().mean(),
                negative_distances.detach().mean(),
            ]
        )  # a tensor: read (and synchronised) only if someone looks at last_stats
        self.last_stats = {
            "num_triplets": float(anchors.numel()),
            "active_fraction": stats[0],
            "beta_mean": stats[1],
            "positive_distance_mean": stats[2],
            "negative_distance_mean": stats[3],
        }
        return loss

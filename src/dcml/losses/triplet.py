"""Triplet loss with FaceNet-style semi-hard mining (Schroff, Kalenichenko, Philbin 2015), the baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcml.errors import require
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
    require_number,
    zero_loss,
)


@dataclass(frozen=True)
class TripletSettings(LossSettings):
    """``loss.settings`` of the triplet loss."""

    margin: float = 0.2  # FaceNet's alpha = 0.2, on L2-normalised embeddings

    def validate(self) -> None:
        require(self.margin > 0, f"{SETTINGS_PATH}margin must be > 0; got {self.margin}")


class SemiHardMiner(TripletMiner):
    """For each ordered anchor-positive pair, the closest semi-hard negative (FaceNet).

    A negative n is semi-hard for (a, p) when d(a, p) < d(a, n) < d(a, p) + margin (both strict). Of
    those, the one closest to the anchor is taken, giving at most one triplet per pair; pairs without
    a semi-hard negative are dropped. (PML's ``TripletMarginMiner(type_of_triplets="semihard")``
    instead keeps *every* triplet with 0 < d(a, n) - d(a, p) <= margin; our triplets are a subset.)
    """

    def __init__(self, margin: float = TripletSettings.margin):
        self.margin = require_number("semi-hard miner", "margin", margin, minimum=0.0, strictly_above=True)

    def select_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        distances = pairwise_distances(embeddings)
        anchors, positives = positive_pairs(labels)
        positive_distances = distances[anchors, positives][:, None]
        anchor_rows = distances[anchors]  # (pairs, B): distances from each pair's anchor
        is_negative = labels[anchors][:, None] != labels[None, :]
        semi_hard = (
            is_negative & (anchor_rows > positive_distances) & (anchor_rows < positive_distances + self.margin)
        )
        closest_distances, negatives = anchor_rows.masked_fill(~semi_hard, float("inf")).min(dim=1)
        keep = torch.isfinite(closest_distances)
        return anchors[keep], positives[keep], negatives[keep]


class TripletLoss(MetricLoss):
    """``max(0, d(a, p) - d(a, n) + margin)`` averaged over ALL given triplets (FaceNet's mean).

    PML's ``TripletMarginLoss`` averages over the non-zero terms only (AvgNonZeroReducer). With the
    default :class:`SemiHardMiner` every mined triplet has a non-zero term, so both agree there; they
    differ for explicit tuples containing already-satisfied triplets. No triplet -> 0 (graph intact).
    """

    def __init__(self, margin: float = TripletSettings.margin, miner: TripletMiner | None = None):
        self.margin = require_number("triplet loss", "margin", margin, minimum=0.0, strictly_above=True)
        super().__init__(miner if miner is not None else SemiHardMiner(self.margin))

    def compute_loss(self, embeddings, labels, indices_tuple, learner: int) -> torch.Tensor:
        anchors, positives, negatives = (
            index.to(embeddings.device) for index in check_triplets(indices_tuple, embeddings.shape[0])
        )
        if anchors.numel() == 0:
            self.last_stats = {"num_triplets": 0.0, "active_fraction": 0.0}
            return zero_loss(embeddings)
        terms = torch.relu(
            pair_distances(embeddings, anchors, positives) - pair_distances(embeddings, anchors, negatives) + self.margin
        )
        self.last_stats = {
            "num_triplets": float(anchors.numel()),
            "active_fraction": (terms > 0).to(terms.dtype).mean().detach(),
        }
        return terms.mean()

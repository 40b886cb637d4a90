"""Backbone features kept from training passes for the next re-clustering (``clustering.reuse_training_features``).

With no augmentation and frozen BN statistics, the forward pass that trains on an image computes
that image's test-time backbone features (with the weights of that step, at most one epoch old).
The epoch before a re-clustering keeps them here, so k-means needs a fresh pass only over the
images that epoch did not visit. Under torchrun each rank holds the rows of its own batches;
:meth:`FeatureBank.pooled` gives every rank the whole bank.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dcml.training.distributed import Distributed


@dataclasses.dataclass
class FeatureBank:
    features: np.ndarray  # N x D float32; rows of images not visited are NaN
    visits: np.ndarray  # N int64: the global batch position that last wrote each row, -1: none
    epoch: int  # the epoch whose training passes filled it

    @classmethod
    def empty(cls, num_images: int, width: int, epoch: int) -> "FeatureBank":
        return cls(np.full((num_images, width), np.nan, dtype=np.float32), np.full(num_images, -1, dtype=np.int64), epoch)

    def record(self, rows: np.ndarray, features: np.ndarray, position: int) -> None:
        """Keep the features of images ``rows``, computed by the batch at global ``position`` (a later visit wins)."""
        self.features[rows] = features
        self.visits[rows] = position

    def missing(self) -> np.ndarray:
        return np.flatnonzero(self.visits < 0)

    def pooled(self, dist: Distributed) -> "FeatureBank":
        """Every rank's rows in one bank, on every rank: each row from the rank whose batch visited the
        image last (the lowest such rank when several hold the same visit, e.g. after a resume)."""
        if not dist.enabled:
            return self
        latest = dist.all_reduce(self.visits, "max")
        holds = (self.visits == latest) & (latest >= 0)
        owner = dist.all_reduce(np.where(holds, dist.rank, dist.world_size).astype(np.int64), "min")
        mine = holds & (owner == dist.rank)
        contribution = np.where(mine[:, None], np.nan_to_num(self.features, nan=0.0), 0.0).astype(np.float32)
        features = dist.all_reduce(contribution, "sum")
        features[latest < 0] = np.nan
        return FeatureBank(features, latest, self.epoch)

    def completed(self, dist: Distributed, embed_rows) -> np.ndarray:
        """Every image's backbone features: the rows the batches kept (pooled over the ranks), and
        ``embed_rows(indices)`` for the images no batch visited."""
        bank = self.pooled(dist)  # under torchrun each rank holds the rows its own batches visited
        missing = bank.missing()
        features = bank.features
        if len(missing):
            features[missing] = embed_rows(missing)
        return features

    def state(self) -> dict:
        return {"features": torch.from_numpy(self.features), "visits": torch.from_numpy(self.visits), "epoch": int(self.epoch)}

    @classmethod
    def from_state(cls, state: dict | None) -> "FeatureBank | None":
        if state is None:
            return None
        return cls(state["features"].numpy().astype(np.float32, copy=True), state["visits"].numpy().astype(np.int64, copy=True),
                   int(state["epoch"]))


def keeps_features_for(plans: list, epoch: int, reuse: bool) -> bool:
    """Whether epoch ``epoch``'s training passes should fill a bank: reuse is on and the next epoch of
    ``plans`` (:class:`~dcml.training.schedule.EpochPlan`) re-clusters into more than one cluster."""
    if not reuse or epoch + 1 >= len(plans):
        return False
    upcoming = plans[epoch + 1]
    return upcoming.recluster and upcoming.active_learners > 1


def clustering_features(bank: FeatureBank | None, epoch: int, space: str, embed, head_embedding, dist: Distributed) -> np.ndarray:
    """Features of every training image for epoch ``epoch``'s k-means in ``space``: the previous epoch's
    ``bank`` completed, or a fresh pass ``embed(space, rows)`` (``rows=None``: every image) when there is none.
    ``head_embedding(features)`` turns pooled backbone features into the full embedding."""
    if bank is None or bank.epoch != epoch - 1:
        return embed(space, None)
    features = bank.completed(dist, lambda rows: embed("backbone", rows))
    return features if space == "backbone" else head_embedding(features)

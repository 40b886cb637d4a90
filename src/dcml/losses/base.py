"""Base classes shared by the metric losses: a loss with one hook and a triplet miner with one hook.

Conventions (as in pytorch-metric-learning): a batch is ``embeddings`` (B, D) and integer ``labels``
(B,); tuples of batch indices are ``(anchors, positives, negatives)`` long tensors of equal length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import nn

from dcml.errors import UserError

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: Where a loss's settings live in the training configuration; their messages name them by it.
SETTINGS_PATH = "loss.settings."


@dataclass(frozen=True)
class LossSettings:
    """The options of one loss, as ``loss.settings`` holds them: each field with its default.

    A loss declares a frozen dataclass deriving from this next to its code and registers it with
    the loss (:func:`dcml.losses.register_loss`); the configuration reads and type-checks the
    fields from YAML, and :meth:`validate` checks their ranges.
    """

    def validate(self) -> None:
        """Raise a one-line UserError naming the setting (``loss.settings.alpha must be > 0; got -1.0``)."""


class TripletMiner:
    """Chooses (anchor, positive, negative) index triplets from a batch.

    Subclasses implement :meth:`select_triplets`; :meth:`mine` runs it without autograd, because
    mining only picks indices and must not build a graph through the embeddings.
    """

    def mine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        check_batch(embeddings, labels)
        with torch.no_grad():
            anchors, positives, negatives = self.select_triplets(embeddings.detach(), labels)
        return anchors.long(), positives.long(), negatives.long()

    def select_triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        raise NotImplementedError


class MetricLoss(nn.Module):
    """A metric loss: mines tuples when none are given, then calls the :meth:`compute_loss` hook.

    ``forward(embeddings, labels, indices_tuple=None, learner=0)`` returns a scalar tensor;
    ``learner`` says which learner (embedding slice) the batch belongs to, for losses that keep
    per-learner state. After each call ``last_stats`` holds a few cheap float diagnostics (kept as
    tensors until read, so training never waits for the GPU to report them).
    """

    def __init__(self, miner=None):
        super().__init__()
        self.miner = miner
        self._last_stats: dict = {}

    @property
    def last_stats(self) -> dict[str, float]:
        """The last call's diagnostics as floats (reading them waits for the device, once)."""
        return {key: float(value) for key, value in self._last_stats.items()}

    @last_stats.setter
    def last_stats(self, values: dict) -> None:
        self._last_stats = dict(values)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
        learner: int = 0,
    ) -> torch.Tensor:
        check_batch(embeddings, labels)
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner.mine(embeddings, labels)
        return self.compute_loss(embeddings, labels, indices_tuple, learner)

    def compute_loss(self, embeddings, labels, indices_tuple, learner: int) -> torch.Tensor:
        raise NotImplementedError

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the loss itself (betas, proxies) that the optimiser trains in their own group."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]


def check_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (batch, dim), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be ({embeddings.shape[0]},) to match the embeddings, got {tuple(labels.shape)}"
        )


def check_triplets(indices_tuple, batch_size: int) -> Triplets:
    """Validate an explicit ``(anchors, positives, negatives)`` tuple and return it as long tensors."""
    if indices_tuple is None:
        raise ValueError("this loss needs a miner or an explicit (anchors, positives, negatives) tuple")
    if len(indices_tuple) != 3:
        raise ValueError(f"expected an (anchors, positives, negatives) triplet tuple, got {len(indices_tuple)} tensors")
    anchors, positives, negatives = (torch.as_tensor(index).long().reshape(-1) for index in indices_tuple)
    if not anchors.shape == positives.shape == negatives.shape:
        raise ValueError("anchors, positives and negatives must have the same length")
    if anchors.numel():
        smallest, largest = torch.cat([anchors, positives, negatives]).aminmax()  # one host sync, not six
        if int(smallest) < 0 or int(largest) >= batch_size:
            raise ValueError(f"triplet indices must lie in [0, {batch_size})")
    return anchors, positives, negatives


def positive_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered (anchor, positive) index pairs with the same label and anchor != positive."""
    same_label = labels[:, None] == labels[None, :]
    same_label.fill_diagonal_(False)
    anchors, positives = torch.nonzero(same_label, as_tuple=True)
    return anchors, positives


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, B) Euclidean distances from the Gram matrix (for mining only: no gradient is needed)."""
    squared_norms = (embeddings * embeddings).sum(dim=1)
    squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * embeddings @ embeddings.T
    # Rounding can make the squared distance of (near-)identical points slightly negative.
    return squared.clamp(min=0.0).sqrt()


def pair_distances(embeddings: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of the listed pairs, differentiable (the norm's gradient at 0 is taken as 0)."""
    return torch.linalg.vector_norm(embeddings[first] - embeddings[second], dim=1)


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero scalar still connected to ``tensors`` so ``backward()`` works and yields zero gradients."""
    total = tensors[0].sum() * 0.0
    for tensor in tensors[1:]:
        total = total + tensor.sum() * 0.0
    return total


def require_number(
    owner: str,
    name: str,
    value,
    *,
    minimum: float | None = None,
    strictly_above: bool = False,
    maximum: float | None = None,
) -> float:
    """Return ``value`` as a float, or raise a one-line UserError saying which setting is wrong."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise UserError(f"{owner}: setting {name!r} must be a finite number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if strictly_above else value < minimum):
        relation = ">" if strictly_above else ">="
        raise UserError(f"{owner}: setting {name!r} must be {relation} {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise UserError(f"{owner}: setting {name!r} must be <= {maximum:g}, got {value:g}")
    return value


def require_count(owner: str, name: str, value, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum``, or raise a one-line UserError."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise UserError(f"{owner}: setting {name!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)

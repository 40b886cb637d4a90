"""Slow, obvious reference implementations (plain loops) that the vectorised losses are checked against.

Imported by the tests in this package as ``from .reference import ...``.
"""

from __future__ import annotations

import math

import torch


def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distance written out coordinate by coordinate (differentiable)."""
    total = x.new_zeros(())
    for k in range(x.shape[0]):
        total = total + (x[k] - y[k]) ** 2
    return torch.sqrt(total)


def float_distance(x: list[float], y: list[float]) -> float:
    return math.sqrt(sum((xk - yk) ** 2 for xk, yk in zip(x, y)))


def margin_loss(embeddings, triplets, betas, alpha: float, nu: float) -> torch.Tensor:
    """Wu et al.'s margin loss: for every triplet the pairs (a, p) and (a, n), beta of that triplet;
    (sum of the pair terms + nu * sum of the betas) / number of non-zero pair terms; 0 if none."""
    total = embeddings.new_zeros(())
    num_nonzero = 0
    for (a, p, n), beta in zip(triplets, betas):
        positive_term = torch.clamp(alpha + (distance(embeddings[a], embeddings[p]) - beta), min=0)
        negative_term = torch.clamp(alpha - (distance(embeddings[a], embeddings[n]) - beta), min=0)
        for term in (positive_term, negative_term):
            total = total + term
            if term.item() > 0:
                num_nonzero += 1
        total = total + nu * beta
    if num_nonzero == 0:
        return total * 0
    return total / num_nonzero


def negative_probabilities(embeddings, labels, anchor: int, cutoff: float, nonzero_loss_cutoff: float) -> list[float]:
    """Probability that each batch item is drawn as the negative for ``anchor`` (distance-weighted)."""
    embeddings = embeddings.double().tolist()
    labels = [int(label) for label in labels]
    dimension = len(embeddings[0])
    weights = []
    for j in range(len(embeddings)):
        if labels[j] == labels[anchor]:
            weights.append(0.0)
            continue
        d = float_distance(embeddings[anchor], embeddings[j])
        if d >= nonzero_loss_cutoff:
            weights.append(0.0)
            continue
        d = max(d, cutoff)
        density = d ** (dimension - 2) * (1 - d * d / 4) ** ((dimension - 3) / 2)
        weights.append(1.0 / density)
    if sum(weights) == 0:  # every negative is beyond the cutoff: uniform over the negatives
        weights = [1.0 if labels[j] != labels[anchor] else 0.0 for j in range(len(labels))]
    total = sum(weights)
    return [w / total if total > 0 else 0.0 for w in weights]


def semi_hard_triplets(embeddings, labels, margin: float) -> set[tuple[int, int, int]]:
    """For each ordered (a, p), the closest n with d(a,p) < d(a,n) < d(a,p) + margin; none -> dropped."""
    embeddings = embeddings.double().tolist()
    labels = [int(label) for label in labels]
    batch_size = len(labels)
    triplets = set()
    for a in range(batch_size):
        for p in range(batch_size):
            if a == p or labels[a] != labels[p]:
                continue
            d_ap = float_distance(embeddings[a], embeddings[p])
            best, best_distance = None, math.inf
            for n in range(batch_size):
                if labels[n] == labels[a]:
                    continue
                d_an = float_distance(embeddings[a], embeddings[n])
                if d_ap < d_an < d_ap + margin and d_an < best_distance:
                    best, best_distance = n, d_an
            if best is not None:
                triplets.add((a, p, best))
    return triplets


def triplet_loss(embeddings, triplets, margin: float) -> torch.Tensor:
    """Mean over all triplets of max(0, d(a,p) - d(a,n) + margin)."""
    total = embeddings.new_zeros(())
    for a, p, n in triplets:
        total = total + torch.clamp(
            distance(embeddings[a], embeddings[p]) - distance(embeddings[a], embeddings[n]) + margin, min=0
        )
    return total / len(triplets)

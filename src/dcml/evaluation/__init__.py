"""Evaluation: exact retrieval and clustering metrics as pure functions on arrays."""

from dcml.evaluation.metrics import evaluate_embeddings, nmi, normalized_mutual_information, retrieval_metrics
from dcml.evaluation.protocols import leave_one_out_and_cross_group, vehicleid_leave_one_out, vehicleid_standard
from dcml.evaluation.ranks import PositiveRanks, positive_ranks

__all__ = [
    "PositiveRanks",
    "evaluate_embeddings",
    "leave_one_out_and_cross_group",
    "nmi",
    "normalized_mutual_information",
    "positive_ranks",
    "retrieval_metrics",
    "vehicleid_leave_one_out",
    "vehicleid_standard",
]

"""Datasets: records, readers for the paper's benchmarks, the emoji benchmark, image loading."""

from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split
from dcml.data.registry import available_datasets, load_dataset, register_dataset

__all__ = [
    "Dataset",
    "EvaluationSpec",
    "Protocol",
    "Split",
    "available_datasets",
    "load_dataset",
    "register_dataset",
]

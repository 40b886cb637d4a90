"""The data a run trains and selects on: the dataset with a validation split, and its identity for resumes."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from dcml.config import TrainConfig
from dcml.data.records import Dataset, Split
from dcml.errors import UserError


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out ``fraction`` of the training classes (seeded) as a validation split."""
    classes = np.unique(train.labels)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(classes, size=max(2, round(fraction * len(classes))), replace=False).tolist())
    mask = np.array([label in held for label in train.labels])

    def take(name: str, keep: np.ndarray) -> Split:
        groups = None if train.groups is None else train.groups[keep]
        return Split(name, tuple(p for p, k in zip(train.paths, keep) if k), train.labels[keep], groups)

    return take("train", ~mask), take("val", mask)


def prepare_dataset(config: TrainConfig) -> Dataset:
    """The dataset with a ``train`` and a ``val`` split (carved from train when it has none), and the
    configuration's Recall@K list (``evaluation.recall_ks``) in its evaluation spec."""
    from dcml.data import load_dataset

    import inspect

    from dcml.data import available_datasets

    options = {}
    reader = available_datasets().get(config.data.dataset)
    if reader is not None and "val_fraction" in inspect.signature(reader.load).parameters:
        # A reader that carves its own validation classes (a flat folder) carves the configured share.
        options["val_fraction"] = config.data.validation_fraction
    dataset = load_dataset(config.data.dataset, Path(config.data.root).expanduser() if config.data.root else None, **options)
    if config.data.held_out_group is not None:
        dataset = dataset.holding_out(config.data.held_out_group)
    if config.evaluation.recall_ks is not None:
        spec = dataclasses.replace(dataset.evaluation, recall_ks=tuple(config.evaluation.recall_ks))
        dataset = dataclasses.replace(dataset, evaluation=spec)
    if "val" in dataset.splits:
        return dataset
    train, val = carve_validation(dataset.split("train"), config.data.validation_fraction, config.seed)
    return dataclasses.replace(dataset, splits={**dataset.splits, "train": train, "val": val})


def dataset_identity(dataset: Dataset) -> dict:
    """What a resume checks against the data on disk: image counts, classes and a digest of each training
    and validation image's class folder + file name and label (stable when the dataset folder moves)."""
    identity = {"name": dataset.name}
    for name in ("train", "val"):
        split = dataset.split(name)
        digest = hashlib.sha256()
        for path, label in zip(split.paths, split.labels.tolist()):
            digest.update(f"{'/'.join(Path(path).parts[-2:])}\t{label}\n".encode("utf-8", "surrogateescape"))
        identity[name] = {"images": split.num_images, "classes": int(len(np.unique(split.labels))), "sha256": digest.hexdigest()}
    return identity


def check_same_dataset(saved: dict, current: dict, root: str | None) -> None:
    """Refuse to resume on other data than the run trained on (a moved folder is fine: names are compared)."""
    for name in ("train", "val"):
        then, now = saved.get(name, {}), current[name]
        if not isinstance(then, dict) or then.get("sha256") != now["sha256"]:
            then = then if isinstance(then, dict) else {}
            where = f"at {root}" if root else "in the default location"
            raise UserError(f"the dataset {where} is not the one this run trained on ({name} split: "
                            f"{then.get('images')} images of {then.get('classes')} classes then, {now['images']} of "
                            f"{now['classes']} now); point --data-root at the original data")

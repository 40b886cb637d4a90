"""Dataset records: what every reader returns and everything downstream consumes.

A dataset is a set of named splits; a split is three parallel arrays (image paths, class labels,
optional group ids). Groups mark images that must not retrieve each other under a protocol: the
emoji vendor (cross-vendor protocol) or a re-identification camera.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dcml.errors import UserError


class Protocol(str, enum.Enum):
    """How a dataset's test data is evaluated (see method.md, "Evaluation protocols")."""

    LEAVE_ONE_OUT = "leave_one_out"  # every test image queries all other test images
    QUERY_GALLERY = "query_gallery"  # a query split searched against a gallery split (In-shop)
    VEHICLEID = "vehicleid"  # one random gallery image per vehicle, the rest are queries
    CROSS_GROUP = "cross_group"  # leave-one-out, but never retrieving the query's own group


@dataclass(frozen=True)
class Split:
    """One split: image ``paths[i]`` has class ``labels[i]`` and (optionally) group ``groups[i]``."""

    name: str
    paths: tuple[Path, ...]
    labels: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "paths", tuple(Path(p) for p in self.paths))
        if labels.ndim != 1 or len(labels) != len(self.paths):
            raise ValueError(f"split {self.name!r}: {len(self.paths)} paths but labels of shape {labels.shape}")
        if self.groups is not None:
            groups = np.asarray(self.groups, dtype=np.int64)
            if groups.shape != labels.shape:
                raise ValueError(f"split {self.name!r}: groups shape {groups.shape} != labels shape {labels.shape}")
            object.__setattr__(self, "groups", groups)

    @property
    def num_images(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return int(np.unique(self.labels).size)

    def counts(self) -> dict[str, int]:
        return {"classes": self.num_classes, "images": self.num_images}


@dataclass(frozen=True)
class EvaluationSpec:
    """Which splits the test protocol uses, and the Recall@K list the literature reports."""

    protocol: Protocol
    recall_ks: tuple[int, ...]
    splits: tuple[str, ...]  # (test,) for leave-one-out; (query, gallery) for QUERY_GALLERY
    # A group whose images training and validation never saw (see Dataset.holding_out): the test
    # split's images of that group then also query the other groups' test images (the unseen row).
    unseen_group: int | None = None


@dataclass(frozen=True)
class Dataset:
    """A dataset: named splits plus how to evaluate it."""

    name: str
    root: Path
    splits: dict[str, Split]
    evaluation: EvaluationSpec
    group_names: tuple[str, ...] | None = None  # names of group ids, e.g. emoji vendors
    group_kind: str = "groups"  # what a group is, as named in `dcml data info` ("vendors", "cameras")
    extra_info: dict = field(default_factory=dict)  # reader-specific facts for `dcml data info`

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise UserError(f"dataset {self.name!r} has no split {name!r}; choose one of: {', '.join(self.splits)}")
        return self.splits[name]

    def holding_out(self, group_name: str) -> Dataset:
        """This dataset with one group (emoji: one vendor) removed from every split it trains or
        selects on: only the evaluation splits keep that group's images, and the evaluation spec
        names it as unseen. How a model generalises to a style it never saw is then measured on
        the test classes, with model selection blind to that group as well."""
        if self.group_names is None:
            raise UserError(f"data.held_out_group needs a dataset with groups; {self.name!r} has none")
        if group_name not in self.group_names:
            raise UserError(f"data.held_out_group must be one of {self.name}'s {self.group_kind}: "
                            f"{', '.join(self.group_names)}; got {group_name!r}")
        if self.evaluation.unseen_group is not None:
            raise UserError(f"{self.name} already holds out {self.group_names[self.evaluation.unseen_group]!r}")
        group = self.group_names.index(group_name)
        splits = {}
        for name, split in self.splits.items():
            if name in self.evaluation.splits or split.groups is None:
                splits[name] = split
                continue
            keep = split.groups != group
            splits[name] = Split(name, tuple(p for p, k in zip(split.paths, keep) if k), split.labels[keep], split.groups[keep])
        return dataclasses.replace(self, splits=splits, evaluation=dataclasses.replace(self.evaluation, unseen_group=group))

    def info(self) -> dict:
        """Counts for `dcml data info`: totals and per split."""
        all_labels = np.concatenate([s.labels for s in self.splits.values()]) if self.splits else np.array([])
        unique_paths = {p for s in self.splits.values() for p in s.paths}
        info = {
            "name": self.name,
            "root": str(self.root),
            "classes": int(np.unique(all_labels).size),
            "images": len(unique_paths),
            "splits": {name: split.counts() for name, split in self.splits.items()},
        }
        if self.group_names is not None:
            info[self.group_kind] = list(self.group_names)
        info.update(self.extra_info)
        return info


def warn_if_counts_differ(dataset_name: str, split: Split, expected_classes: int | None, expected_images: int | None) -> None:
    """Warn (not fail) when a split's counts differ from the official ones: a user may hold a partial copy."""
    if expected_classes is not None and split.num_classes != expected_classes:
        warnings.warn(
            f"{dataset_name} {split.name}: found {split.num_classes} classes, the official split has {expected_classes}",
            stacklevel=2,
        )
    if expected_images is not None and split.num_images != expected_images:
        warnings.warn(
            f"{dataset_name} {split.name}: found {split.num_images} images, the official split has {expected_images}",
            stacklevel=2,
        )

"""A generic folder-per-class dataset: bring your own images.

Two layouts are read:

* ``ROOT/<class>/*.jpg`` (flat): the classes are split class-disjointly into train / test halves
  by a named, deterministic rule (see :data:`SPLIT_RULES`), and ``val`` classes (20 % of the train
  classes by default) are carved out of train for model selection;
* ``ROOT/train/<class>/...`` + ``ROOT/test/<class>/...`` (+ optional ``ROOT/val/<class>/...``):
  the splits are used as given.

A label is the index of the class name in the sorted list of all class names (stable whatever the
split). Images are ``.jpg .jpeg .png .bmp .webp`` files directly inside a class folder (any case;
hidden files are skipped). The test split is evaluated leave-one-out, Recall@1/2/4/8.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split
from dcml.data.registry import register_dataset
from dcml.errors import DatasetError

__all__ = ["IMAGE_SUFFIXES", "SPLIT_RULES", "load_folder", "split_classes"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")  # the pre-split layout; train and test are required
SPLIT_RULES = {
    "shuffled_halves": "sorted class names permuted by a seeded generator; first half train, second half test",
    "sorted_halves": "sorted class names; first half train, second half test (the CUB / CARS convention)",
}
EVALUATION = EvaluationSpec(Protocol.LEAVE_ONE_OUT, (1, 2, 4, 8), ("test",))
MAX_LISTED_CLASSES = 50  # class names go into `dcml data info` up to this many


def _default_val_fraction() -> float:
    """The configuration's ``data.validation_fraction`` default: one home for the share of classes held out."""
    from dcml.config import DataConfig

    return DataConfig.validation_fraction


def split_classes(
    class_names: list[str], *, rule: str = "shuffled_halves", seed: int = 0, val_fraction: float | None = None
) -> dict[str, list[str]]:
    """Split class names class-disjointly into train / val / test (each list sorted).

    The order the rule produces is cut in two: the first ``ceil(n / 2)`` classes train, the rest
    test. Then the last ``max(2, round(val_fraction * n_train))`` train classes become ``val``
    (retrieval needs 2 classes), unless that would leave train with fewer than 2 classes or
    ``val_fraction`` is 0 (then there is no val split).
    """
    val_fraction = _default_val_fraction() if val_fraction is None else val_fraction
    if rule not in SPLIT_RULES:
        raise DatasetError(f"folder: unknown split rule {rule!r}; choose one of: {', '.join(SPLIT_RULES)}")
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"folder: val_fraction must be in [0, 1), got {val_fraction}")
    order = sorted(class_names)
    if rule == "shuffled_halves":
        order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    n_train = (len(order) + 1) // 2
    train, test = order[:n_train], order[n_train:]
    n_val = max(2, int(round(val_fraction * len(train)))) if val_fraction > 0 else 0
    if len(train) - n_val < 2:
        n_val = 0
    splits = {"train": train[: len(train) - n_val], "val": train[len(train) - n_val :], "test": test}
    return {name: sorted(names) for name, names in splits.items() if names or name != "val"}


def _subfolders(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir())


def _images_in(class_folder: Path) -> list[Path]:
    with os.scandir(class_folder) as entries:
        images = sorted(
            e.name
            for e in entries
            if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()
        )
    if not images:
        raise DatasetError(f"folder: class folder {class_folder} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    return [class_folder / name for name in images]


def _read_classes(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image paths for every class folder inside ``folder``."""
    return {sub.name: _images_in(sub) for sub in _subfolders(folder)}


@register_dataset(
    "folder",
    "any images: ROOT/<class>/*.jpg (split by class: train/val/test) or ROOT/{train,test[,val]}/<class>/*.jpg",
)
def load_folder(root: Path, *, rule: str = "shuffled_halves", seed: int = 0, val_fraction: float | None = None) -> Dataset:
    """Read a folder-per-class dataset (see the module docstring); the split options apply to the flat layout."""
    root = Path(os.path.abspath(root))
    top = _subfolders(root)
    if not top:
        raise DatasetError(
            f"folder: {root} holds no class folders "
            "(expected ROOT/<class>/*.jpg or ROOT/train/<class>/ + ROOT/test/<class>/)"
        )
    top_names = {folder.name for folder in top}
    present = [name for name in SPLIT_FOLDERS if name in top_names]

    if "train" in top_names and "test" in top_names:
        others = sorted(top_names - set(SPLIT_FOLDERS))
        if others:
            raise DatasetError(
                f"folder: {root} holds train/ and test/ but also {', '.join(o + '/' for o in others)}; "
                "use either ROOT/{train,test[,val]}/<class>/ or one folder per class"
            )
        per_split = {name: _read_classes(root / name) for name in present}
        extra_info: dict = {"layout": "split folders"}
        shared = sorted(set(per_split["train"]) & set(per_split["test"]))
        if shared:
            warnings.warn(
                f"folder: {len(shared)} class(es) appear in both train/ and test/ (e.g. {shared[0]!r}); "
                "metric-learning splits are usually class-disjoint",
                stacklevel=2,
            )
    elif present and len(present) == len(top_names):
        raise DatasetError(
            f"folder: {root} holds {', '.join(p + '/' for p in present)} but not both train/ and test/"
        )
    else:
        classes = _read_classes(root)
        val_fraction = _default_val_fraction() if val_fraction is None else val_fraction
        assignment = split_classes(list(classes), rule=rule, seed=seed, val_fraction=val_fraction)
        per_split = {name: {c: classes[c] for c in names} for name, names in assignment.items()}
        extra_info = {
            "layout": "one folder per class",
            "split_rule": rule,
            "split_seed": seed,
            "val_fraction": val_fraction,
        }

    all_names = sorted(set().union(*(set(classes) for classes in per_split.values())))
    label_of = {name: index for index, name in enumerate(all_names)}
    splits: dict[str, Split] = {}
    for split_name in SPLIT_FOLDERS:
        if split_name not in per_split:
            continue
        classes = per_split[split_name]
        if len(classes) < 2:
            raise DatasetError(
                f"folder: split {split_name!r} has {len(classes)} class(es) in {root}; retrieval needs at least 2"
            )
        paths = [path for name in sorted(classes) for path in classes[name]]
        labels = [label_of[name] for name in sorted(classes) for _ in classes[name]]
        splits[split_name] = Split(name=split_name, paths=tuple(paths), labels=np.asarray(labels, dtype=np.int64))
    if len(all_names) <= MAX_LISTED_CLASSES:
        extra_info["class_names"] = all_names
    return Dataset(name="folder", root=root, splits=splits, evaluation=EVALUATION, extra_info=extra_info)

"""Miniature replicas of the benchmarks' on-disk layouts, for the dataset-reader tests.

Each ``make_*`` writes a tiny copy (a few 8x8 images) under a folder and returns what it wrote,
so tests can compare the reader's output against it. Not a conftest: import it
(``from replicas import ...``) so other fixture modules in this folder stay independent.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


@lru_cache(maxsize=None)
def _image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}


def write_image(path: Path) -> Path:
    """Write a tiny valid image in the format its suffix names (JPEG for unknown suffixes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(_FORMATS.get(path.suffix.lower(), "JPEG")))
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


# CUB-200-2011: images/NNN.Name/*.jpg. Class id -> number of images.
CUB_CLASSES = {1: 2, 2: 3, 3: 2, 101: 2, 102: 2}


def make_cub(root: Path, classes: dict[int, int] = CUB_CLASSES) -> Path:
    for class_id, count in classes.items():
        for index in range(count):
            write_image(root / "images" / f"{class_id:03d}.Bird_{class_id}" / f"Bird_{class_id}_{index:04d}.jpg")
    return root


# CARS196: cars_annos.mat written with the same struct layout as the real file (a 1 x N struct
# array; every field a 1x1 uint8/uint16 matrix, the path a char array), plus car_ims/*.jpg.
CARS_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
# (class id, official "test" flag) per image, in annotation order; the flag must be ignored.
CARS_IMAGES = [(1, 0), (1, 1), (2, 0), (2, 0), (98, 1), (99, 0), (99, 1), (196, 0), (196, 0)]


def make_cars(root: Path, images: list[tuple[int, int]] = CARS_IMAGES, *, write_images: bool = True) -> Path:
    import scipy.io

    annotations = np.zeros((1, len(images)), dtype=[(name, "O") for name in CARS_FIELDS])
    for index, (class_id, test) in enumerate(images):
        relative = f"car_ims/{index + 1:06d}.jpg"
        annotations[0, index] = (
            relative,
            np.array([[5]], dtype=np.uint16),
            np.array([[6]], dtype=np.uint16),
            np.array([[300]], dtype=np.uint16),
            np.array([[200]], dtype=np.uint16),
            np.array([[class_id]], dtype=np.uint8),
            np.array([[test]], dtype=np.uint8),
        )
        if write_images:
            write_image(root / relative)
    class_names = np.empty((1, 196), dtype=object)
    for index in range(196):
        class_names[0, index] = f"Make Model {index + 1}"
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": annotations, "class_names": class_names})
    return root


# Stanford Online Products: Ebay_{train,test}.txt, "image_id class_id super_class_id path".
SOP_ROWS = {
    "train": [(1, 1, "bicycle"), (1, 1, "bicycle"), (2, 1, "bicycle"), (3, 2, "cabinet"), (3, 2, "cabinet")],
    "test": [(11319, 1, "bicycle"), (11319, 1, "bicycle"), (11320, 3, "chair"), (11320, 3, "chair")],
}


def make_sop(root: Path, rows: dict[str, list[tuple[int, int, str]]] = SOP_ROWS) -> Path:
    image_id = 0
    for split, entries in rows.items():
        lines = ["image_id class_id super_class_id path"]
        for class_id, super_id, super_name in entries:
            image_id += 1
            relative = f"{super_name}_final/{class_id}_{image_id}.JPG"
            write_image(root / relative)
            lines.append(f"{image_id} {class_id} {super_id} {relative}")
        write_lines(root / f"Ebay_{split}.txt", lines)
    return root


# In-shop: Eval/list_eval_partition.txt (count, header, "img/... id_XXXXXXXX status").
INSHOP_ROWS = [
    ("WOMEN/Dresses", 1, "train"),
    ("WOMEN/Dresses", 1, "train"),
    ("MEN/Denim", 2, "train"),
    ("MEN/Denim", 2, "train"),
    ("WOMEN/Skirts", 7, "query"),
    ("WOMEN/Skirts", 7, "gallery"),
    ("MEN/Shirts", 8, "query"),
    ("MEN/Shirts", 8, "query"),
    ("MEN/Shirts", 8, "gallery"),
]


def make_inshop(root: Path, rows=INSHOP_ROWS, *, declared: int | None = None, image_base: str = "") -> Path:
    lines = [str(len(rows) if declared is None else declared), "image_name item_id evaluation_status"]
    for index, (category, item, status) in enumerate(rows):
        relative = f"img/{category}/id_{item:08d}/{index:02d}_1_front.jpg"
        write_image(root / image_base / relative)
        lines.append(f"{relative}    id_{item:08d}    {status}")
    write_lines(root / "Eval" / "list_eval_partition.txt", lines)
    return root


# PKU VehicleID: train_test_split/*.txt ("<image> <vehicle_id>"), images at image/<image>.jpg.
VEHICLEID_LISTS = {
    "train_list.txt": [(10, 2), (11, 2), (30, 3)],
    "test_list_800.txt": [(40, 5), (41, 5), (50, 6)],
    "test_list_1600.txt": [(40, 5), (41, 5), (50, 6), (60, 7), (61, 7)],
    "test_list_2400.txt": [(40, 5), (41, 5), (50, 6), (60, 7), (61, 7), (70, 8)],
}


def make_vehicleid(root: Path, lists=VEHICLEID_LISTS) -> Path:
    for file_name, entries in lists.items():
        lines = []
        for image, vehicle in entries:
            name = f"{image:07d}"
            write_image(root / "image" / f"{name}.jpg")
            lines.append(f"{name} {vehicle}")
        write_lines(root / "train_test_split" / file_name, lines)
    return root


# Generic folder-per-class: class name -> file names.
def make_folder(root: Path, classes: dict[str, list[str]]) -> Path:
    """``classes`` maps a relative class folder (``"cat"`` or ``"train/cat"``) to image file names."""
    for folder, names in classes.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_image(root / folder / name)
    return root


# ------------------------------------------------------------------------------------------------
# Larger replicas for the paper presets: enough training classes that K learners x 2 classes and
# P classes per batch still fit after the 15% validation carve (90 training classes keep 76).
# Each builder returns the argument the matching ``make_*`` takes; ``make_replica`` ties them up.


def cub_classes(train: int, test: int, images: int = 2) -> dict[int, int]:
    """Classes 1..train (CUB's training range) and 101.. (its test range), ``images`` each."""
    if not (1 <= train <= 100 and 1 <= test <= 100):
        raise ValueError("CUB holds 100 training and 100 test classes")
    return {class_id: images for class_id in [*range(1, train + 1), *range(101, 101 + test)]}


def cars_images(train: int, test: int, images: int = 2) -> list[tuple[int, int]]:
    """Classes 1..train (CARS196's training range) and 99.. (its test range), ``images`` each."""
    if not (1 <= train <= 98 and 1 <= test <= 98):
        raise ValueError("CARS196 holds 98 training and 98 test classes")
    return [(class_id, 0) for class_id in [*range(1, train + 1), *range(99, 99 + test)] for _ in range(images)]


SOP_SUPER_CLASSES = ("bicycle", "cabinet", "chair", "coffee_maker")


def sop_rows(train: int, test: int, images: int = 2) -> dict[str, list[tuple[int, int, str]]]:
    """Training classes 1..train, test classes 11319.. (as in Ebay_*.txt), super classes in turn."""

    def rows(first: int, count: int) -> list[tuple[int, int, str]]:
        return [
            (class_id, (class_id % len(SOP_SUPER_CLASSES)) + 1, SOP_SUPER_CLASSES[class_id % len(SOP_SUPER_CLASSES)])
            for class_id in range(first, first + count)
            for _ in range(images)
        ]

    return {"train": rows(1, train), "test": rows(11_319, test)}


INSHOP_CATEGORIES = ("WOMEN/Dresses", "MEN/Denim", "WOMEN/Skirts", "MEN/Shirts")


def inshop_rows(train: int, test: int, images: int = 2) -> list[tuple[str, int, str]]:
    """Training items 1..train; test items after them, each one gallery image and the rest queries."""
    if images < 2:
        raise ValueError("an In-shop test item needs a query and a gallery image")
    rows = [(INSHOP_CATEGORIES[item % 4], item, "train") for item in range(1, train + 1) for _ in range(images)]
    for item in range(train + 1, train + test + 1):
        rows.append((INSHOP_CATEGORIES[item % 4], item, "gallery"))
        rows += [(INSHOP_CATEGORIES[item % 4], item, "query")] * (images - 1)
    return rows


def vehicleid_lists(train: int, test: int, images: int = 2) -> dict[str, list[tuple[int, int]]]:
    """``train`` vehicles in train_list.txt; ``test`` vehicles in test_list_2400.txt, the first third
    of them in test_list_800.txt and two thirds in test_list_1600.txt (nested, as distributed)."""
    image = 0

    def vehicles(first: int, count: int) -> list[tuple[int, int]]:
        nonlocal image
        entries = []
        for vehicle in range(first, first + count):
            for _ in range(images):
                image += 1
                entries.append((image, vehicle))
        return entries

    train_entries = vehicles(1, train)
    test_entries = vehicles(100_001, test)
    per_vehicle = images

    def first(count: int) -> list[tuple[int, int]]:
        return test_entries[: max(1, count) * per_vehicle]

    return {
        "train_list.txt": train_entries,
        "test_list_800.txt": first(-(-test // 3)),
        "test_list_1600.txt": first(-(-2 * test // 3)),
        "test_list_2400.txt": test_entries,
    }


REPLICA_LAYOUTS = {
    "cub200": (make_cub, cub_classes),
    "cars196": (make_cars, cars_images),
    "sop": (make_sop, sop_rows),
    "inshop": (make_inshop, inshop_rows),
    "vehicleid": (make_vehicleid, vehicleid_lists),
}


def make_replica(name: str, root: Path, *, train_classes: int = 90, test_classes: int = 10, images_per_class: int = 2) -> Path:
    """A miniature of benchmark ``name`` with the given class counts (``images_per_class`` each)."""
    make, layout = REPLICA_LAYOUTS[name]
    return make(root, layout(train_classes, test_classes, images_per_class))

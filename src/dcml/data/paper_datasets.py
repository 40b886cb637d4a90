"""Readers for the paper's five benchmarks, from their layouts as distributed.

See method.md, "Datasets: splits and on-disk layouts as distributed". Every reader returns a
:class:`~dcml.data.records.Dataset` whose labels are the dataset's own class ids and whose paths
are absolute. Nothing is decoded here: images are only checked to exist (one directory listing per
folder), a corrupt file is reported when :func:`dcml.data.images.load_rgb` opens it.

Everything a user can get wrong (wrong ``--root``, missing or malformed list file, an image named by
a list but absent) raises a one-line :class:`~dcml.errors.DatasetError` naming the file; counts that
differ from the official ones only warn (a user may hold a partial copy).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split, warn_if_counts_differ
from dcml.data.registry import register_dataset
from dcml.errors import DatasetError

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "load_cars196",
    "load_cub200",
    "load_inshop",
    "load_sop",
    "load_vehicleid",
]


# --------------------------------------------------------------------------------------------------
# The table: official counts, evaluation protocol, class-range splits.


@dataclass(frozen=True)
class Benchmark:
    """What is fixed about one benchmark.

    ``official`` maps a split name to its official (classes, images); a key joining split names
    with ``+`` (``"query+gallery"``) is checked on the union of those splits. ``class_ranges`` maps
    a split name to the inclusive range of class ids it holds (datasets split by class id).
    """

    name: str
    official: dict[str, tuple[int | None, int | None]]
    evaluation: EvaluationSpec
    class_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)


def _loo(*ks: int) -> EvaluationSpec:
    return EvaluationSpec(Protocol.LEAVE_ONE_OUT, ks, ("test",))


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "cub200",
            {"train": (100, 5_864), "test": (100, 5_924)},
            _loo(1, 2, 4, 8),
            {"train": (1, 100), "test": (101, 200)},
        ),
        Benchmark(
            "cars196",
            {"train": (98, 8_054), "test": (98, 8_131)},
            _loo(1, 2, 4, 8),
            {"train": (1, 98), "test": (99, 196)},
        ),
        Benchmark(
            "sop",
            {"train": (11_318, 59_551), "test": (11_316, 60_502)},
            _loo(1, 10, 100, 1000),
        ),
        Benchmark(
            "inshop",
            {
                "train": (3_997, 25_882),
                "query": (None, 14_218),
                "gallery": (None, 12_612),
                "query+gallery": (3_985, None),  # the test items
            },
            EvaluationSpec(Protocol.QUERY_GALLERY, (1, 10, 20, 30, 40, 50), ("query", "gallery")),
        ),
        Benchmark(
            "vehicleid",
            {
                "train": (13_164, 113_346),
                "test_800": (800, 6_493),
                "test_1600": (1_600, 13_377),
                "test_2400": (2_400, 19_777),
            },
            EvaluationSpec(Protocol.VEHICLEID, (1, 5), ("test_800", "test_1600", "test_2400")),
        ),
    )
}


# --------------------------------------------------------------------------------------------------
# Shared helpers: one-line errors, list files, existence checks, assembling the Dataset.


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _require(dataset: str, path: Path, hint: str, *, folder: bool = False) -> Path:
    """Fail unless ``path`` exists (a folder if ``folder``), naming what was expected and where."""
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        slash = "/" if folder else ""
        raise DatasetError(f"{dataset}: expected the {kind} {path.name}{slash} in {path.parent} ({hint})")
    return path


@dataclass(frozen=True)
class ListFile:
    """A whitespace-separated list file; errors name the file and the 1-based line number."""

    dataset: str
    path: Path

    def error(self, line: int, message: str) -> DatasetError:
        return DatasetError(f"{self.dataset}: {self.path} line {line}: {_one_line(message)}")

    def rows(self, columns: Sequence[str] | None = None, *, skip: int = 0) -> Iterator[tuple[int, list[str]]]:
        """Yield (line number, fields) for every non-blank line after the first ``skip`` lines.

        With ``columns``, a line with another number of fields is an error naming the columns.
        """
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise DatasetError(f"{self.dataset}: list file {self.path} not found") from None
        except OSError as error:
            raise DatasetError(f"{self.dataset}: cannot read {self.path}: {_one_line(error.strerror)}") from None
        with handle:
            for number, raw in enumerate(handle, start=1):
                if number <= skip:
                    continue
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise self.error(number, "not UTF-8 text") from None
                fields = text.split()
                if not fields:
                    continue
                if columns is not None and len(fields) != len(columns):
                    expected = f"expected {len(columns)} columns ({' '.join(columns)})"
                    raise self.error(number, f"{expected}, found {len(fields)}: {text.strip()[:80]!r}")
                yield number, fields

    def integer(self, line: int, column: str, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise self.error(line, f"{column} {text[:40]!r} is not an integer") from None


# An image's source for error messages: (file, unit, number), e.g. (Ebay_train.txt, "line", 7).
Source = tuple[Path, str, int]


@dataclass
class _Collected:
    """One split's images while reading: parallel lists, plus where each image was named."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sources: list[Source] | None = field(default_factory=list)

    def add(self, path: Path, label: int, source: Source | None = None) -> None:
        self.paths.append(path)
        self.labels.append(label)
        if self.sources is not None:
            self.sources.append(source)


def _check_images_exist(dataset: str, collected: _Collected) -> None:
    """Fail on the first image that does not exist: one directory listing per folder, no decoding."""
    listings: dict[Path, set[str] | None] = {}
    for index, path in enumerate(collected.paths):
        folder = path.parent
        if folder not in listings:
            try:
                with os.scandir(folder) as entries:
                    listings[folder] = {entry.name for entry in entries}
            except OSError:
                listings[folder] = None
        names = listings[folder]
        if names is not None and path.name in names:
            continue
        if os.path.isfile(path):  # e.g. a case-insensitive file system
            continue
        where = ""
        if collected.sources:
            file, unit, number = collected.sources[index]
            where = f" (named in {file} {unit} {number})"
        raise DatasetError(f"{dataset}: image {path} not found{where}")


def _assemble(
    benchmark: Benchmark, root: Path, collected: dict[str, _Collected], extra_info: dict | None = None
) -> Dataset:
    """Check images exist, build the splits, warn on counts that differ from the official ones."""
    for split_collected in collected.values():
        if split_collected.sources is not None:
            _check_images_exist(benchmark.name, split_collected)
    splits = {
        name: Split(name=name, paths=tuple(c.paths), labels=np.asarray(c.labels, dtype=np.int64))
        for name, c in collected.items()
    }
    for key, (classes, images) in benchmark.official.items():
        parts = [splits[part] for part in key.split("+")]
        if len(parts) == 1:
            checked = parts[0]
        else:
            checked = Split(
                name=key,
                paths=tuple(p for part in parts for p in part.paths),
                labels=np.concatenate([part.labels for part in parts]),
            )
        warn_if_counts_differ(benchmark.name, checked, classes, images)
    return Dataset(
        name=benchmark.name,
        root=root,
        splits=splits,
        evaluation=benchmark.evaluation,
        extra_info=dict(extra_info or {}),
    )


def _split_of_class(benchmark: Benchmark, class_id: int) -> str | None:
    for name, (low, high) in benchmark.class_ranges.items():
        if low <= class_id <= high:
            return name
    return None


def _class_range_text(benchmark: Benchmark) -> str:
    lows, highs = zip(*benchmark.class_ranges.values())
    return f"{min(lows)}-{max(highs)}"


def _absolute(root: Path) -> Path:
    return Path(os.path.abspath(root))


# --------------------------------------------------------------------------------------------------
# CUB-200-2011: images/NNN.Name/*.jpg; train = classes 1-100, test = 101-200.

_CUB_FOLDER = re.compile(r"^(\d+)\.(.+)$")
_CUB_SUFFIXES = (".jpg", ".jpeg")


@register_dataset("cub200", "CUB-200-2011 birds: ROOT/images/NNN.Name/*.jpg (train classes 1-100, test 101-200)")
def load_cub200(root: Path) -> Dataset:
    benchmark = BENCHMARKS["cub200"]
    root = _absolute(root)
    if not (root / "images").is_dir() and (root / "CUB_200_2011" / "images").is_dir():
        root = root / "CUB_200_2011"
    images = _require("cub200", root / "images", "ROOT must be the CUB_200_2011 folder or its parent", folder=True)

    class_folders: dict[int, Path] = {}
    with os.scandir(images) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            match = _CUB_FOLDER.match(entry.name)
            folder = Path(entry.path)
            if match is None:
                example = "001.Black_footed_Albatross"
                raise DatasetError(f"cub200: folder {folder} is not named NNN.ClassName (e.g. {example})")
            class_id = int(match.group(1))
            if class_id in class_folders:
                raise DatasetError(f"cub200: folders {class_folders[class_id]} and {folder} have the same class number")
            if _split_of_class(benchmark, class_id) is None:
                valid = _class_range_text(benchmark)
                raise DatasetError(f"cub200: folder {folder} has class number {class_id}, outside {valid}")
            class_folders[class_id] = folder
    if not class_folders:
        raise DatasetError(f"cub200: no NNN.ClassName folders in {images}")

    collected = {name: _Collected(sources=None) for name in benchmark.class_ranges}
    for class_id in sorted(class_folders):
        folder = class_folders[class_id]
        with os.scandir(folder) as entries:
            names = sorted(
                e.name
                for e in entries
                if not e.name.startswith(".") and e.name.lower().endswith(_CUB_SUFFIXES) and e.is_file()
            )
        split = collected[_split_of_class(benchmark, class_id)]
        for name in names:
            split.add(folder / name, class_id)
    return _assemble(benchmark, root, collected)


# --------------------------------------------------------------------------------------------------
# CARS196: cars_annos.mat (struct array `annotations`); train = classes 1-98, test = 99-196.

_CARS_FIELDS = ("relative_im_path", "class")


def _mat_scalar(value: object) -> object:
    """A MATLAB struct field as loadmat returns it (a 1x1 array, or a 1-element string array) -> scalar."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"expected one value, found an array of shape {array.shape}")
    return array.reshape(-1)[0]


@register_dataset("cars196", "Stanford Cars: ROOT/cars_annos.mat + ROOT/car_ims/ (train classes 1-98, test 99-196)")
def load_cars196(root: Path) -> Dataset:
    import scipy.io

    benchmark = BENCHMARKS["cars196"]
    root = _absolute(root)
    hint = "ROOT must be the folder holding cars_annos.mat and car_ims/"
    mat_path = _require("cars196", root / "cars_annos.mat", hint)
    try:
        mat = scipy.io.loadmat(str(mat_path))
    except (ValueError, TypeError, NotImplementedError, OSError, EOFError) as error:
        raise DatasetError(f"cars196: cannot read {mat_path} as a MATLAB file: {_one_line(error)}") from None
    annotations = mat.get("annotations")
    if not isinstance(annotations, np.ndarray) or annotations.dtype.names is None:
        raise DatasetError(f"cars196: {mat_path} has no struct array 'annotations'")
    missing = [name for name in _CARS_FIELDS if name not in annotations.dtype.names]
    if missing:
        lacking, found = ", ".join(missing), ", ".join(annotations.dtype.names)
        raise DatasetError(f"cars196: {mat_path}: 'annotations' lacks the field(s) {lacking} (found: {found})")

    collected = {name: _Collected() for name in benchmark.class_ranges}
    for number, record in enumerate(annotations.reshape(-1), start=1):
        try:
            relative = str(_mat_scalar(record["relative_im_path"]))
            class_id = int(_mat_scalar(record["class"]))
        except (ValueError, TypeError) as error:
            raise DatasetError(f"cars196: {mat_path} annotation {number}: {_one_line(error)}") from None
        split = _split_of_class(benchmark, class_id)
        if split is None:
            valid = _class_range_text(benchmark)
            raise DatasetError(f"cars196: {mat_path} annotation {number}: class {class_id} outside {valid}")
        collected[split].add(root / relative, class_id, (mat_path, "annotation", number))
    return _assemble(benchmark, root, collected)


# --------------------------------------------------------------------------------------------------
# Stanford Online Products: Ebay_train.txt / Ebay_test.txt.

_SOP_COLUMNS = ("image_id", "class_id", "super_class_id", "path")


@register_dataset("sop", "Stanford Online Products: ROOT/Ebay_train.txt, ROOT/Ebay_test.txt and the image folders")
def load_sop(root: Path) -> Dataset:
    benchmark = BENCHMARKS["sop"]
    root = _absolute(root)
    collected: dict[str, _Collected] = {}
    super_classes: set[int] = set()
    for split in ("train", "test"):
        path = _require("sop", root / f"Ebay_{split}.txt", "ROOT must be the Stanford_Online_Products folder")
        listing = ListFile("sop", path)
        split_collected = collected[split] = _Collected()
        for line, (_image_id, class_id, super_class_id, relative) in listing.rows(_SOP_COLUMNS, skip=1):
            label = listing.integer(line, "class_id", class_id)
            super_classes.add(listing.integer(line, "super_class_id", super_class_id))
            split_collected.add(root / relative, label, (path, "line", line))
    return _assemble(benchmark, root, collected, {"super_classes": len(super_classes)})


# --------------------------------------------------------------------------------------------------
# In-shop Clothes Retrieval: Eval/list_eval_partition.txt; splits train / query / gallery.

_INSHOP_COLUMNS = ("image_name", "item_id", "evaluation_status")
_INSHOP_ITEM = re.compile(r"^id_(\d+)$")
_INSHOP_SPLITS = ("train", "query", "gallery")


@register_dataset(
    "inshop", "DeepFashion In-shop: ROOT/Eval/list_eval_partition.txt + ROOT/img/ (train, query, gallery)"
)
def load_inshop(root: Path) -> Dataset:
    benchmark = BENCHMARKS["inshop"]
    root = _absolute(root)
    hint = "ROOT must be the In-shop folder holding Eval/ and img/"
    path = _require("inshop", root / "Eval" / "list_eval_partition.txt", hint)
    listing = ListFile("inshop", path)
    # Images are named relative to ROOT (img/...); also accept the archive's Img/img/ nesting.
    image_base = root / "Img" if not (root / "img").is_dir() and (root / "Img" / "img").is_dir() else root

    collected = {name: _Collected() for name in _INSHOP_SPLITS}
    rows = listing.rows()
    first = next(rows, None)  # line 1: the number of entries
    if first is None:
        raise DatasetError(f"inshop: {path} is empty")
    line, fields = first
    if len(fields) != 1:
        raise listing.error(line, f"expected the number of images, found {' '.join(fields)[:80]!r}")
    declared = listing.integer(line, "image count", fields[0])
    header = next(rows, None)  # line 2: the column names
    if header is not None and (len(header[1]) != len(_INSHOP_COLUMNS) or header[1][2] in collected):
        found = " ".join(header[1])[:80]
        raise listing.error(header[0], f"expected the header {' '.join(_INSHOP_COLUMNS)!r}, found {found!r}")
    entries = 0
    for line, fields in rows:
        if len(fields) != len(_INSHOP_COLUMNS):
            raise listing.error(
                line, f"expected {len(_INSHOP_COLUMNS)} columns ({' '.join(_INSHOP_COLUMNS)}), found {len(fields)}"
            )
        relative, item, status = fields
        match = _INSHOP_ITEM.match(item)
        if match is None:
            raise listing.error(line, f"item_id {item[:40]!r} is not of the form id_NNNNNNNN")
        if status not in collected:
            raise listing.error(line, f"evaluation_status {status[:40]!r} is not one of {', '.join(_INSHOP_SPLITS)}")
        collected[status].add(image_base / relative, int(match.group(1)), (path, "line", line))
        entries += 1
    if declared != entries:
        raise DatasetError(f"inshop: {path} line 1 declares {declared} images but the file lists {entries}")
    return _assemble(benchmark, root, collected)


# --------------------------------------------------------------------------------------------------
# PKU VehicleID: train_test_split/{train_list,test_list_800,test_list_1600,test_list_2400}.txt.

_VEHICLEID_COLUMNS = ("image", "vehicle_id")
_VEHICLEID_LISTS = {
    "train": "train_list.txt",
    "test_800": "test_list_800.txt",
    "test_1600": "test_list_1600.txt",
    "test_2400": "test_list_2400.txt",
}


@register_dataset(
    "vehicleid", "PKU VehicleID: ROOT/train_test_split/*.txt + ROOT/image/*.jpg (train, test_800/1600/2400)"
)
def load_vehicleid(root: Path) -> Dataset:
    benchmark = BENCHMARKS["vehicleid"]
    root = _absolute(root)
    hint = "ROOT must be the VehicleID folder holding train_test_split/ and image/"
    lists = _require("vehicleid", root / "train_test_split", hint, folder=True)
    collected: dict[str, _Collected] = {}
    for split, file_name in _VEHICLEID_LISTS.items():
        path = _require("vehicleid", lists / file_name, "the official train/test lists")
        listing = ListFile("vehicleid", path)
        split_collected = collected[split] = _Collected()
        for line, (image, vehicle) in listing.rows(_VEHICLEID_COLUMNS):
            label = listing.integer(line, "vehicle_id", vehicle)
            split_collected.add(root / "image" / f"{image}.jpg", label, (path, "line", line))
    return _assemble(benchmark, root, collected)

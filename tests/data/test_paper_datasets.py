"""The five benchmark readers, on miniature replicas of their distributed layouts."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np
import pytest
import scipy.io
from replicas import (
    CARS_FIELDS,
    CARS_IMAGES,
    CUB_CLASSES,
    INSHOP_ROWS,
    SOP_ROWS,
    VEHICLEID_LISTS,
    make_cars,
    make_cub,
    make_inshop,
    make_sop,
    make_vehicleid,
    write_image,
    write_lines,
)

from dcml.cli import main
from dcml.data import Protocol, available_datasets, load_dataset
from dcml.data.paper_datasets import BENCHMARKS
from dcml.data.images import load_rgb
from dcml.errors import DatasetError

MAKERS = {"cub200": make_cub, "cars196": make_cars, "sop": make_sop, "inshop": make_inshop, "vehicleid": make_vehicleid}


def load_quietly(name, root):
    """Load a replica, returning (dataset, warning messages): replicas never match official counts."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_dataset(name, root)
    return dataset, [str(w.message) for w in caught]


def dataset_error(name, root) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError) as info:
            load_dataset(name, root)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{name}: "), message
    return message


def classes_of(split) -> set[int]:
    return set(split.labels.tolist())


# --- common to all five ------------------------------------------------------------------------


def test_all_benchmarks_are_registered():
    readers = available_datasets()
    for name in (*MAKERS, "folder"):
        assert name in readers and readers[name].needs_root


@pytest.mark.parametrize("name", list(MAKERS))
def test_paths_absolute_existing_and_loadable(name, tmp_path):
    dataset, _ = load_quietly(name, MAKERS[name](tmp_path / "ds"))
    for split in dataset.splits.values():
        assert split.num_images > 0 and split.groups is None
        assert all(p.is_absolute() and p.is_file() for p in split.paths)
        assert split.labels.dtype == np.int64
    first = next(iter(dataset.splits.values())).paths[0]
    assert load_rgb(first).size == (8, 8)


@pytest.mark.parametrize("name", list(MAKERS))
def test_relative_root_gives_absolute_paths(name, tmp_path, monkeypatch):
    MAKERS[name](tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    dataset, _ = load_quietly(name, "ds")
    assert dataset.root.is_absolute()
    assert all(p.is_absolute() for s in dataset.splits.values() for p in s.paths)


@pytest.mark.parametrize("name", list(MAKERS))
def test_differing_counts_warn_with_both_numbers(name, tmp_path):
    dataset, messages = load_quietly(name, MAKERS[name](tmp_path / "ds"))
    # One warning per split and per differing count, each naming found and official numbers.
    for key, (classes, images) in BENCHMARKS[name].official.items():
        parts = [dataset.splits[p] for p in key.split("+")]
        if images is not None:
            found = sum(p.num_images for p in parts)
            assert f"{name} {key}: found {found} images, the official split has {images}" in messages
        if classes is not None:
            found = len(set().union(*(classes_of(p) for p in parts)))
            assert f"{name} {key}: found {found} classes, the official split has {classes}" in messages


@pytest.mark.parametrize("name", list(MAKERS))
def test_matching_counts_do_not_warn(name, tmp_path, monkeypatch):
    root = MAKERS[name](tmp_path / "ds")
    dataset, _ = load_quietly(name, root)
    official = {}
    for key in BENCHMARKS[name].official:
        parts = [dataset.splits[p] for p in key.split("+")]
        official[key] = (len(set().union(*(classes_of(p) for p in parts))), sum(p.num_images for p in parts))
    monkeypatch.setitem(BENCHMARKS, name, dataclasses.replace(BENCHMARKS[name], official=official))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(name, root)


def test_count_warning_is_a_pytest_warning(tmp_path):
    with pytest.warns(UserWarning) as record:
        load_dataset("cub200", make_cub(tmp_path))
    messages = [str(w.message) for w in record]
    assert "cub200 train: found 3 classes, the official split has 100" in messages
    assert "cub200 test: found 4 images, the official split has 5924" in messages


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cub200", "cub200: expected the folder images/ in {root}"),
        ("cars196", "cars196: expected the file cars_annos.mat in {root}"),
        ("sop", "sop: expected the file Ebay_train.txt in {root}"),
        ("inshop", "inshop: expected the file list_eval_partition.txt in {root}/Eval"),
        ("vehicleid", "vehicleid: expected the folder train_test_split/ in {root}"),
    ],
)
def test_wrong_root(name, expected, tmp_path):
    (tmp_path / "unrelated.txt").write_text("x")
    assert dataset_error(name, tmp_path).startswith(expected.format(root=tmp_path))


# --- CUB-200-2011 ------------------------------------------------------------------------------


def test_cub_splits_by_class_number(tmp_path):
    dataset, _ = load_quietly("cub200", make_cub(tmp_path))
    train, test = dataset.split("train"), dataset.split("test")
    assert list(dataset.splits) == ["train", "test"]
    assert classes_of(train) == {1, 2, 3} and classes_of(test) == {101, 102}
    assert train.num_images == sum(n for c, n in CUB_CLASSES.items() if c <= 100)
    assert test.num_images == sum(n for c, n in CUB_CLASSES.items() if c > 100)
    for path, label in zip(train.paths, train.labels):
        assert path.parent.name.startswith(f"{label:03d}.")
    assert dataset.evaluation.protocol is Protocol.LEAVE_ONE_OUT
    assert dataset.evaluation.recall_ks == (1, 2, 4, 8) and dataset.evaluation.splits == ("test",)


def test_cub_ignores_non_images_and_hidden_files(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "images" / "001.Bird_1" / "notes.txt").write_text("x")
    write_image(tmp_path / "images" / "001.Bird_1" / "._Bird_1_0000.jpg")
    (tmp_path / "images" / ".DS_Store").write_text("x")
    dataset, _ = load_quietly("cub200", tmp_path)
    assert dataset.split("train").num_images == 7


def test_cub_accepts_the_parent_folder(tmp_path):
    make_cub(tmp_path / "CUB_200_2011")
    dataset, _ = load_quietly("cub200", tmp_path)
    assert dataset.root == tmp_path / "CUB_200_2011"
    assert dataset.split("test").num_images == 4


def test_cub_badly_named_folder(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "images" / "Albatross").mkdir()
    message = dataset_error("cub200", tmp_path)
    assert str(tmp_path / "images" / "Albatross") in message and "NNN.ClassName" in message


def test_cub_class_number_out_of_range(tmp_path):
    make_cub(tmp_path, {1: 1, 201: 1})
    assert "class number 201, outside 1-200" in dataset_error("cub200", tmp_path)


# --- CARS196 -----------------------------------------------------------------------------------


def test_cars_replica_round_trips_like_the_real_file(tmp_path):
    make_cars(tmp_path)
    annotations = scipy.io.loadmat(str(tmp_path / "cars_annos.mat"))["annotations"]
    # As loadmat returns the real cars_annos.mat: a 1 x N struct array of object fields, each a
    # 1x1 matrix (the path a 1-element string array).
    assert annotations.shape == (1, len(CARS_IMAGES))
    assert annotations.dtype.names == CARS_FIELDS
    first = annotations[0, 0]
    assert first["relative_im_path"].shape == (1,) and first["relative_im_path"][0] == "car_ims/000001.jpg"
    assert first["class"].shape == (1, 1) and first["class"].dtype == np.uint8


def test_cars_splits_by_class_ignoring_the_test_flag(tmp_path):
    dataset, _ = load_quietly("cars196", make_cars(tmp_path))
    train, test = dataset.split("train"), dataset.split("test")
    assert classes_of(train) == {1, 2, 98} and classes_of(test) == {99, 196}
    assert train.num_images == 5 and test.num_images == 4
    # Annotation order is kept; image 2 has the official test flag but class 1: it is in train.
    assert [p.name for p in train.paths] == ["000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg", "000005.jpg"]
    assert train.labels.tolist() == [1, 1, 2, 2, 98]
    assert dataset.evaluation.recall_ks == (1, 2, 4, 8)


def test_cars_missing_image_names_file_and_annotation(tmp_path):
    make_cars(tmp_path)
    os.remove(tmp_path / "car_ims" / "000007.jpg")
    message = dataset_error("cars196", tmp_path)
    assert str(tmp_path / "car_ims" / "000007.jpg") in message and "annotation 7" in message


def test_cars_unreadable_mat(tmp_path):
    (tmp_path / "cars_annos.mat").write_bytes(b"not a MATLAB file at all" * 10)
    assert f"cannot read {tmp_path / 'cars_annos.mat'}" in dataset_error("cars196", tmp_path)


def test_cars_mat_without_annotations(tmp_path):
    scipy.io.savemat(str(tmp_path / "cars_annos.mat"), {"something_else": np.zeros(3)})
    assert "no struct array 'annotations'" in dataset_error("cars196", tmp_path)


def test_cars_annotations_without_class_field(tmp_path):
    annotations = np.zeros((1, 1), dtype=[("relative_im_path", "O"), ("test", "O")])
    annotations[0, 0] = ("car_ims/000001.jpg", np.array([[0]], dtype=np.uint8))
    scipy.io.savemat(str(tmp_path / "cars_annos.mat"), {"annotations": annotations})
    assert "'annotations' lacks the field(s) class (found: relative_im_path, test)" in dataset_error("cars196", tmp_path)


def test_cars_class_out_of_range(tmp_path):
    make_cars(tmp_path, [(1, 0), (197, 0)])
    assert "annotation 2: class 197 outside 1-196" in dataset_error("cars196", tmp_path)


# --- Stanford Online Products -----------------------------------------------------------------


def test_sop_splits_and_no_super_class_groups(tmp_path):
    dataset, _ = load_quietly("sop", make_sop(tmp_path))
    train, test = dataset.split("train"), dataset.split("test")
    assert classes_of(train) == {1, 2, 3} and classes_of(test) == {11319, 11320}
    assert train.num_images == len(SOP_ROWS["train"]) and test.num_images == len(SOP_ROWS["test"])
    assert train.labels.tolist() == [row[0] for row in SOP_ROWS["train"]]
    assert train.groups is None and test.groups is None  # super classes are not groups
    assert dataset.info()["super_classes"] == 3
    assert dataset.evaluation.recall_ks == (1, 10, 100, 1000) and dataset.evaluation.splits == ("test",)


def test_sop_missing_list_file(tmp_path):
    make_sop(tmp_path)
    os.remove(tmp_path / "Ebay_test.txt")
    assert dataset_error("sop", tmp_path).startswith(f"sop: expected the file Ebay_test.txt in {tmp_path}")


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("6 1 1", "line 4: expected 4 columns (image_id class_id super_class_id path), found 3"),
        ("6 one 1 bicycle_final/x.JPG", "line 4: class_id 'one' is not an integer"),
        ("6 1 two bicycle_final/x.JPG", "line 4: super_class_id 'two' is not an integer"),
    ],
)
def test_sop_malformed_line(bad_line, expected, tmp_path):
    make_sop(tmp_path)
    lines = (tmp_path / "Ebay_train.txt").read_text().splitlines()
    lines.insert(3, bad_line)
    write_lines(tmp_path / "Ebay_train.txt", lines)
    message = dataset_error("sop", tmp_path)
    assert message.startswith(f"sop: {tmp_path / 'Ebay_train.txt'} {expected}")


def test_sop_blank_lines_are_skipped(tmp_path):
    make_sop(tmp_path)
    with open(tmp_path / "Ebay_test.txt", "a") as handle:
        handle.write("\n   \n")
    dataset, _ = load_quietly("sop", tmp_path)
    assert dataset.split("test").num_images == len(SOP_ROWS["test"])


def test_sop_missing_image(tmp_path):
    make_sop(tmp_path)
    missing = tmp_path / "chair_final" / "11320_8.JPG"
    os.remove(missing)
    message = dataset_error("sop", tmp_path)
    assert message == f"sop: image {missing} not found (named in {tmp_path / 'Ebay_test.txt'} line 4)"


def test_sop_missing_image_folder(tmp_path):
    make_sop(tmp_path)
    for path in (tmp_path / "cabinet_final").iterdir():
        path.unlink()
    (tmp_path / "cabinet_final").rmdir()
    assert "cabinet_final" in dataset_error("sop", tmp_path)


def test_sop_non_utf8_line(tmp_path):
    make_sop(tmp_path)
    with open(tmp_path / "Ebay_train.txt", "ab") as handle:
        handle.write(b"\xff\xfe 1 1 x\n")
    assert "Ebay_train.txt line 7: not UTF-8 text" in dataset_error("sop", tmp_path)


# --- In-shop -----------------------------------------------------------------------------------


def test_inshop_train_query_gallery(tmp_path):
    dataset, _ = load_quietly("inshop", make_inshop(tmp_path))
    assert list(dataset.splits) == ["train", "query", "gallery"]
    assert classes_of(dataset.split("train")) == {1, 2}
    assert dataset.split("query").labels.tolist() == [7, 8, 8]
    assert dataset.split("gallery").labels.tolist() == [7, 8]
    assert not classes_of(dataset.split("train")) & classes_of(dataset.split("query"))
    assert dataset.split("train").paths[0] == tmp_path / "img/WOMEN/Dresses/id_00000001/00_1_front.jpg"
    spec = dataset.evaluation
    assert spec.protocol is Protocol.QUERY_GALLERY
    assert spec.splits == ("query", "gallery") and spec.recall_ks == (1, 10, 20, 30, 40, 50)


def test_inshop_accepts_the_img_folder_nested_in_Img(tmp_path):  # noqa: N802
    make_inshop(tmp_path, image_base="Img")
    dataset, _ = load_quietly("inshop", tmp_path)
    assert dataset.split("query").paths[0].is_file()


def test_inshop_count_line_must_match(tmp_path):
    make_inshop(tmp_path, declared=52712)
    path = tmp_path / "Eval" / "list_eval_partition.txt"
    assert dataset_error("inshop", tmp_path) == (
        f"inshop: {path} line 1 declares 52712 images but the file lists {len(INSHOP_ROWS)}"
    )


@pytest.mark.parametrize(
    ("line_number", "bad_line", "expected"),
    [
        (1, "many", "line 1: image count 'many' is not an integer"),
        (2, "img/x.jpg id_00000001 train", "line 2: expected the header"),
        (5, "img/x.jpg id_1 validation", "line 5: evaluation_status 'validation' is not one of train, query, gallery"),
        (5, "img/x.jpg 00000001 train", "line 5: item_id '00000001' is not of the form id_NNNNNNNN"),
        (5, "img/x.jpg id_00000001", "line 5: expected 3 columns (image_name item_id evaluation_status), found 2"),
    ],
)
def test_inshop_malformed_line(line_number, bad_line, expected, tmp_path):
    make_inshop(tmp_path)
    path = tmp_path / "Eval" / "list_eval_partition.txt"
    lines = path.read_text().splitlines()
    lines[line_number - 1] = bad_line
    write_lines(path, lines)
    assert dataset_error("inshop", tmp_path).startswith(f"inshop: {path} {expected}")


def test_inshop_missing_image(tmp_path):
    make_inshop(tmp_path)
    missing = tmp_path / "img/MEN/Shirts/id_00000008/08_1_front.jpg"
    os.remove(missing)
    path = tmp_path / "Eval" / "list_eval_partition.txt"
    assert dataset_error("inshop", tmp_path) == f"inshop: image {missing} not found (named in {path} line 11)"


# --- PKU VehicleID -----------------------------------------------------------------------------


def test_vehicleid_splits(tmp_path):
    dataset, _ = load_quietly("vehicleid", make_vehicleid(tmp_path))
    assert list(dataset.splits) == ["train", "test_800", "test_1600", "test_2400"]
    for split, file_name in zip(dataset.splits.values(), VEHICLEID_LISTS):
        assert split.labels.tolist() == [v for _, v in VEHICLEID_LISTS[file_name]]
        assert [p.name for p in split.paths] == [f"{i:07d}.jpg" for i, _ in VEHICLEID_LISTS[file_name]]
        assert all(p.parent == tmp_path / "image" for p in split.paths)
    for name in ("test_800", "test_1600", "test_2400"):
        assert not classes_of(dataset.split("train")) & classes_of(dataset.split(name))
    spec = dataset.evaluation
    assert spec.protocol is Protocol.VEHICLEID
    assert spec.recall_ks == (1, 5) and spec.splits == ("test_800", "test_1600", "test_2400")


def test_vehicleid_missing_list_file(tmp_path):
    make_vehicleid(tmp_path)
    os.remove(tmp_path / "train_test_split" / "test_list_1600.txt")
    assert dataset_error("vehicleid", tmp_path).startswith(
        f"vehicleid: expected the file test_list_1600.txt in {tmp_path / 'train_test_split'}"
    )


def test_vehicleid_malformed_line(tmp_path):
    make_vehicleid(tmp_path)
    path = tmp_path / "train_test_split" / "test_list_2400.txt"
    lines = path.read_text().splitlines()
    lines[2] = "0000050 6 extra"
    write_lines(path, lines)
    assert dataset_error("vehicleid", tmp_path) == (
        f"vehicleid: {path} line 3: expected 2 columns (image vehicle_id), found 3: '0000050 6 extra'"
    )


def test_vehicleid_missing_image(tmp_path):
    make_vehicleid(tmp_path)
    os.remove(tmp_path / "image" / "0000030.jpg")
    message = dataset_error("vehicleid", tmp_path)
    assert str(tmp_path / "image" / "0000030.jpg") in message and "train_list.txt line 3" in message


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_data_info_json(tmp_path, capsys):
    make_cub(tmp_path)
    assert main(["data", "info", "cub200", "--root", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert info["name"] == "cub200" and info["root"] == str(tmp_path)
    assert info["classes"] == 5 and info["images"] == 11
    assert info["splits"] == {"train": {"classes": 3, "images": 7}, "test": {"classes": 2, "images": 4}}
    assert "warning: cub200 train: found 7 images, the official split has 5864" in captured.err


def test_cli_bad_root_is_one_line_exit_2(tmp_path, capsys):
    assert main(["data", "info", "cub200", "--root", str(tmp_path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"dcml: error: cub200: expected the folder images/ in {tmp_path}")

"""The generic folder-per-class reader."""

from __future__ import annotations

import json
import warnings

import pytest
from replicas import make_folder

from dcml.cli import main
from dcml.data import Protocol, load_dataset
from dcml.data import folder as folder_module
from dcml.data.folder import load_folder, split_classes
from dcml.errors import DatasetError

TEN = [f"class_{i:02d}" for i in range(10)]


def flat(tmp_path, names=TEN, files=("a.jpg", "b.png")):
    return make_folder(tmp_path, {name: list(files) for name in names})


def error_of(root, **options) -> str:
    with pytest.raises(DatasetError) as info:
        load_folder(root, **options)
    message = str(info.value)
    assert "\n" not in message and message.startswith("folder: "), message
    return message


def class_names(dataset, split):
    names = dataset.extra_info["class_names"]
    return {names[label] for label in dataset.split(split).labels.tolist()}


def test_flat_layout_is_split_class_disjointly(tmp_path):
    dataset = load_dataset("folder", flat(tmp_path))
    assert list(dataset.splits) == ["train", "val", "test"]
    counts = {name: split.num_classes for name, split in dataset.splits.items()}
    assert counts == {"train": 3, "val": 2, "test": 5}
    seen = [class_names(dataset, s) for s in dataset.splits]
    assert set().union(*seen) == set(TEN) and sum(map(len, seen)) == len(TEN)
    assert all(split.num_images == 2 * split.num_classes for split in dataset.splits.values())
    # Labels: index in the sorted list of all class names, whatever the split.
    for split in dataset.splits.values():
        for path, label in zip(split.paths, split.labels):
            assert path.parent.name == TEN[label] and path.is_absolute()
    assert dataset.evaluation.protocol is Protocol.LEAVE_ONE_OUT
    assert dataset.evaluation.splits == ("test",) and dataset.evaluation.recall_ks == (1, 2, 4, 8)
    assert dataset.extra_info["split_rule"] == "shuffled_halves" and dataset.extra_info["split_seed"] == 0


def test_flat_split_is_deterministic_and_seeded(tmp_path):
    root = flat(tmp_path)
    first, again = load_folder(root), load_folder(root)
    assert all(class_names(first, s) == class_names(again, s) for s in first.splits)
    assert split_classes(TEN, seed=0) == {
        name: sorted(class_names(first, name)) for name in first.splits
    }
    assert split_classes(TEN, seed=0) != split_classes(TEN, seed=1)
    assert split_classes(list(reversed(TEN)), seed=3) == split_classes(TEN, seed=3)  # order-independent


def test_sorted_halves_rule(tmp_path):
    dataset = load_folder(flat(tmp_path), rule="sorted_halves")
    assert class_names(dataset, "train") == set(TEN[:3])
    assert class_names(dataset, "val") == set(TEN[3:5])
    assert class_names(dataset, "test") == set(TEN[5:])


def test_val_split_sizes():
    sizes = {n: {k: len(v) for k, v in split_classes([f"c{i:03d}" for i in range(n)]).items()} for n in (4, 7, 200)}
    assert sizes[4] == {"train": 2, "test": 2}  # too few classes for a val split
    assert sizes[7] == {"train": 2, "val": 2, "test": 3}
    assert sizes[200] == {"train": 85, "val": 15, "test": 100}  # data.validation_fraction's default, 0.15
    assert "val" not in split_classes(TEN, val_fraction=0)


def test_image_extensions_and_ignored_files(tmp_path):
    make_folder(
        tmp_path,
        {
            "cat": ["1.jpg", "2.JPEG", "3.png", "4.bmp", "5.webp", ".hidden.jpg"],
            "dog": ["1.jpg"],
            "eel": ["1.jpg"],
            "fox": ["1.jpg"],
        },
    )
    (tmp_path / "cat" / "notes.txt").write_text("x")
    (tmp_path / "README.md").write_text("x")
    dataset = load_folder(tmp_path, val_fraction=0)
    cat = [p.name for s in dataset.splits.values() for p in s.paths if p.parent.name == "cat"]
    assert cat == ["1.jpg", "2.JPEG", "3.png", "4.bmp", "5.webp"]


def test_pre_split_layout_is_used_as_given(tmp_path):
    make_folder(
        tmp_path,
        {
            "train/bee": ["1.jpg", "2.jpg"],
            "train/ant": ["1.jpg"],
            "val/cow": ["1.jpg"],
            "val/dog": ["1.png"],
            "test/eel": ["1.jpg", "2.jpg"],
            "test/fox": ["1.jpg"],
        },
    )
    dataset = load_dataset("folder", tmp_path)
    assert dataset.extra_info["layout"] == "split folders"
    assert dataset.extra_info["class_names"] == ["ant", "bee", "cow", "dog", "eel", "fox"]
    assert dataset.split("train").labels.tolist() == [0, 1, 1]
    assert dataset.split("val").labels.tolist() == [2, 3]
    assert dataset.split("test").labels.tolist() == [4, 4, 5]
    assert dataset.split("test").paths[0] == tmp_path / "test" / "eel" / "1.jpg"


def test_pre_split_layout_without_val(tmp_path):
    make_folder(tmp_path, {"train/a": ["1.jpg"], "train/b": ["1.jpg"], "test/c": ["1.jpg"], "test/d": ["1.jpg"]})
    assert list(load_folder(tmp_path).splits) == ["train", "test"]


def test_pre_split_shared_classes_warn(tmp_path):
    make_folder(tmp_path, {"train/a": ["1.jpg"], "train/b": ["1.jpg"], "test/b": ["2.jpg"], "test/c": ["1.jpg"]})
    with pytest.warns(UserWarning, match="appear in both train/ and test/"):
        dataset = load_folder(tmp_path)
    assert dataset.split("train").labels.tolist() == [0, 1] and dataset.split("test").labels.tolist() == [1, 2]


def test_class_names_omitted_when_many(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_module, "MAX_LISTED_CLASSES", 5)
    assert "class_names" not in load_folder(flat(tmp_path)).extra_info


def test_empty_root(tmp_path):
    (tmp_path / "stray.jpg").write_bytes(b"x")
    assert error_of(tmp_path).startswith(f"folder: {tmp_path} holds no class folders")


def test_class_folder_without_images(tmp_path):
    flat(tmp_path)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "notes.txt").write_text("x")
    assert error_of(tmp_path).startswith(f"folder: class folder {tmp_path / 'empty_class'} holds no images")


def test_flat_split_with_too_few_classes(tmp_path):
    flat(tmp_path, names=["a", "b", "c"])
    assert error_of(tmp_path) == f"folder: split 'test' has 1 class(es) in {tmp_path}; retrieval needs at least 2"


def test_pre_split_with_too_few_classes(tmp_path):
    make_folder(tmp_path, {"train/a": ["1.jpg"], "train/b": ["1.jpg"], "test/c": ["1.jpg"]})
    assert "split 'test' has 1 class(es)" in error_of(tmp_path)


def test_only_some_split_folders(tmp_path):
    make_folder(tmp_path, {"train/a": ["1.jpg"], "train/b": ["1.jpg"]})
    assert "holds train/ but not both train/ and test/" in error_of(tmp_path)


def test_split_folders_mixed_with_class_folders(tmp_path):
    make_folder(tmp_path, {"train/a": ["1.jpg"], "test/b": ["1.jpg"], "zebra": ["1.jpg"]})
    assert "but also zebra/" in error_of(tmp_path)


def test_unknown_rule(tmp_path):
    assert "unknown split rule 'alphabetical'" in error_of(flat(tmp_path), rule="alphabetical")


def test_cli_data_info_folder(tmp_path, capsys):
    flat(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["data", "info", "folder", "--root", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == 10 and info["images"] == 20
    assert info["splits"]["test"] == {"classes": 5, "images": 10}


def test_a_run_on_a_flat_folder_holds_out_the_configured_share(tmp_path):
    from dcml.config import load_config
    from dcml.training.datasets import prepare_dataset

    for c in range(40):
        folder = tmp_path / "flat" / f"class{c:02d}"
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"{i}.png").write_bytes(b"")  # the reader lists files; nothing is decoded here
    shares = {}
    for fraction in (0.15, 0.5):
        config = load_config("emoji", ["data.dataset=folder", f"data.root={tmp_path / 'flat'}", f"data.validation_fraction={fraction}"])
        dataset = prepare_dataset(config)
        shares[fraction] = len(set(dataset.split("val").labels.tolist()))
    assert shares == {0.15: 3, 0.5: 10}  # of the 20 non-test classes

"""The emoji benchmark builder and reader, on fake npm tarballs (no network, no npm)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcml.data import Protocol, emoji
from dcml.errors import DatasetError, MissingDependencyError, UserError


def _manifest(dataset_dir: Path) -> list[dict]:
    with open(dataset_dir / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _build(cache: Path, **kwargs) -> Path:
    return emoji.build_emoji_benchmark(cache_dir=cache, progress=False, **kwargs)


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name != emoji.BENCHMARK_VERSION]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DCML_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert emoji.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("DCML_CACHE_DIR")
    assert emoji.default_cache_dir() == tmp_path / "xdg" / "dcml"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert emoji.default_cache_dir() == tmp_path / "home" / ".cache" / "dcml"


def test_normalise_sequence_drops_variation_selectors():
    assert emoji.normalise_sequence("2764-fe0f") == "2764"
    assert emoji.normalise_sequence("1F636-200D-1F32B-FE0F") == emoji.normalise_sequence("1f636-200d-1f32b")
    assert emoji.normalise_sequence("1F3F3-FE0F-200D-1F308") == "1F3F3-200D-1F308"


def test_build_writes_manifest_meta_and_images(fake_npm, tmp_path):
    dataset_dir = _build(tmp_path)
    assert dataset_dir == tmp_path / emoji.BENCHMARK_VERSION
    rows = _manifest(dataset_dir)
    assert list(rows[0]) == list(emoji.MANIFEST_COLUMNS)
    for row in rows:
        assert row["path"] == f"images/{row['vendor']}/{row['unified']}.png"
        assert (dataset_dir / row["path"]).is_file()
        assert row["split"] in emoji.SPLITS
    meta = json.loads((dataset_dir / "meta.json").read_text())
    assert meta["content"]["files"] == len(rows)
    assert meta["packages"]["openmoji"]["version"] == "17.0.0"
    assert {v: meta["licenses"][v]["artwork"] for v in emoji.VENDORS} == {
        "google": "Apache-2.0",
        "twitter": "CC-BY-4.0",
        "openmoji": "CC-BY-SA-4.0",
    }
    assert all(meta["licenses"][v]["verified"] for v in emoji.VENDORS)
    assert not _leftovers(tmp_path)  # the temp build folder is gone
    # Only the 64-px datasource PNGs and the colour SVGs become images.
    assert sum(1 for _ in (dataset_dir / "images").rglob("*.png")) == len(rows)


def test_skin_tones_join_their_base_class(fake_npm, tmp_path):
    rows = _manifest(_build(tmp_path))
    waving = [r for r in rows if r["unified"].startswith("1F44B")]
    assert len({r["label"] for r in waving}) == 1
    assert {r["short_name"] for r in waving} == {"wave"}
    by_vendor = {v: sorted(r["unified"] for r in waving if r["vendor"] == v) for v in emoji.VENDORS}
    assert by_vendor["google"] == ["1F44B", "1F44B-1F3FB", "1F44B-1F3FF"]
    assert by_vendor["twitter"] == ["1F44B", "1F44B-1F3FB"]  # twitter has no image of the dark variant
    # OpenMoji's extra variant joins the class through its skintone_base_hexcode.
    assert by_vendor["openmoji"] == ["1F44B", "1F44B-1F3FB", "1F44B-1F3FD"]


def test_fe0f_differences_still_match(fake_npm, tmp_path):
    rows = _manifest(_build(tmp_path))
    for unified in ("2764-FE0F", "1F636-200D-1F32B"):
        matched = [r for r in rows if r["unified"] == unified]
        assert sorted(r["vendor"] for r in matched) == ["google", "openmoji", "twitter"]
        assert len({r["label"] for r in matched}) == 1


def test_single_vendor_classes_are_dropped(fake_npm, emoji_fakes, tmp_path):
    dataset_dir = _build(tmp_path)
    rows = _manifest(dataset_dir)
    assert not [r for r in rows if r["unified"] in ("1F99C", "E000")]
    expected_classes = 4 + len(emoji_fakes.fillers)
    assert len({r["label"] for r in rows}) == expected_classes
    meta = json.loads((dataset_dir / "meta.json").read_text())
    assert meta["counts"]["dropped_classes_too_few_vendors"] == 2
    labels = sorted({int(r["label"]) for r in rows})
    assert labels == list(range(expected_classes))  # labels are dense


def test_transparency_is_composited_on_white(fake_npm, tmp_path):
    dataset_dir = _build(tmp_path)
    for name in ("google/1F600.png", "twitter/1F600.png", "google/1F44B.png", "openmoji/1F600.png"):
        with Image.open(dataset_dir / "images" / name) as image:
            assert image.mode == "RGB" and image.size == (emoji.IMAGE_SIZE, emoji.IMAGE_SIZE)
            assert image.getpixel((0, 0)) == (255, 255, 255), name
            centre = image.getpixel((32, 32))
    with Image.open(dataset_dir / "images" / "twitter/1F600.png") as image:
        red, green, blue = image.getpixel((32, 32))
        assert red == 255 and 120 <= green <= 135 and 120 <= blue <= 135  # half-red over white, not black
    assert centre[2] > 200 and centre[0] < 50  # the SVG's blue square


def test_assign_splits_is_deterministic_and_disjoint():
    keys = [f"{code:X}" for code in range(0x1F300, 0x1F300 + 1000)]
    first = emoji.assign_splits(keys)
    assert first == emoji.assign_splits(list(reversed(keys)))
    sizes = {name: sum(1 for s in first.values() if s == name) for name in emoji.SPLITS}
    assert sizes["test"] == 500 and sizes["val"] == 100 and sizes["train"] == 400
    # Adding classes moves no existing class from test to train or back.
    grown = emoji.assign_splits(keys + ["FFFFF"])
    assert sum((first[k] == "test") != (grown[k] == "test") for k in keys) <= 1


def test_splits_are_class_disjoint_and_stable_across_rebuilds(fake_npm, tmp_path):
    dataset_dir = _build(tmp_path)
    rows = _manifest(dataset_dir)
    classes = {name: {r["label"] for r in rows if r["split"] == name} for name in emoji.SPLITS}
    assert all(classes[name] for name in emoji.SPLITS)
    assert not classes["train"] & classes["val"]
    assert not classes["train"] & classes["test"]
    assert not classes["val"] & classes["test"]
    before = (dataset_dir / "manifest.csv").read_bytes()
    _build(tmp_path, force=True)
    assert (dataset_dir / "manifest.csv").read_bytes() == before


def test_second_call_reuses_the_cache(fake_npm, tmp_path):
    _build(tmp_path)
    assert len(fake_npm.calls) == 3
    _build(tmp_path)
    assert len(fake_npm.calls) == 3
    _build(tmp_path, force=True)
    assert len(fake_npm.calls) == 6


@pytest.mark.parametrize("damage", ["delete_image", "edit_manifest", "delete_meta", "extra_file", "truncate_manifest"])
def test_damaged_cache_is_rebuilt(fake_npm, tmp_path, capsys, damage):
    dataset_dir = _build(tmp_path)
    rows = _manifest(dataset_dir)
    manifest = dataset_dir / "manifest.csv"
    if damage == "delete_image":
        (dataset_dir / rows[3]["path"]).unlink()
    elif damage == "edit_manifest":
        manifest.write_text(manifest.read_text().replace(",train,", ",test,", 1))
    elif damage == "delete_meta":
        (dataset_dir / "meta.json").unlink()
    elif damage == "extra_file":
        (dataset_dir / "images" / "google" / "stray.png").write_bytes(b"")
    else:
        manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-2]))
    assert emoji.cache_problem(dataset_dir) is not None
    capsys.readouterr()
    _build(tmp_path)
    assert "rebuilding" in capsys.readouterr().err
    assert len(fake_npm.calls) == 6
    assert emoji.cache_problem(dataset_dir) is None
    assert _manifest(dataset_dir) == rows


def test_failure_mid_build_leaves_nothing_behind(monkeypatch, emoji_fakes, tmp_path):
    broken = emoji_fakes.make_tarballs(tmp_path / "npm", broken_svg=True)
    monkeypatch.setattr(emoji, "fetch_package", emoji_fakes.FakeNpm(broken))
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="2764.svg"):
        _build(cache)
    assert not (cache / emoji.BENCHMARK_VERSION).exists()
    assert not _leftovers(cache)


def test_failed_rebuild_keeps_no_partial_copy(fake_npm, monkeypatch, tmp_path):
    dataset_dir = _build(tmp_path)

    def offline(name, version, dest):
        raise UserError(f"npm pack {name}@{version} failed: network down")

    monkeypatch.setattr(emoji, "fetch_package", offline)
    with pytest.raises(UserError, match="network down"):
        _build(tmp_path, force=True)
    assert not _leftovers(tmp_path)
    assert emoji.cache_problem(dataset_dir) is None  # the previous good copy is untouched


def test_missing_npm_is_a_one_line_dependency_error(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError) as caught:
        _build(tmp_path)
    message = str(caught.value)
    assert "npm" in message and "install" in message and "\n" not in message
    assert not _leftovers(tmp_path)


def test_npm_pack_failure_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: "/usr/bin/npm")
    stderr = (
        "npm error code ENOTFOUND\n"
        "npm error network request failed\n"
        "npm error A complete log of this run can be found in: /x.log\n"
    )
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr=stderr)
    monkeypatch.setattr(emoji.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(UserError) as caught:
        emoji.fetch_package("openmoji", "17.0.0", tmp_path)
    assert str(caught.value) == "npm pack openmoji@17.0.0 failed: network request failed"


def test_unsafe_tarball_paths_are_refused(tmp_path):
    tarball = tmp_path / "evil.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        info = tarfile.TarInfo("package/../../escaped.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(DatasetError, match="unsafe path"):
        emoji.safe_extract(tarball, dest, lambda path: True)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "escaped.txt").exists()


def test_load_emoji_returns_cross_vendor_dataset(fake_npm, tmp_path, capsys):
    dataset = emoji.load_emoji(tmp_path)
    assert "building" in capsys.readouterr().err  # says it builds on first use
    assert set(dataset.splits) == {"train", "val", "test"}
    assert dataset.group_names == ("google", "twitter", "openmoji")
    assert dataset.evaluation.protocol is Protocol.CROSS_GROUP
    assert dataset.evaluation.recall_ks == (1, 2, 4, 8) and dataset.evaluation.splits == ("test",)
    rows = _manifest(dataset.root)
    test = dataset.split("test")
    assert test.num_images == sum(r["split"] == "test" for r in rows)
    assert all(p.is_absolute() and p.is_file() for p in test.paths)
    vendors = [dataset.group_names[g] for g in test.groups]
    assert vendors == [r["vendor"] for r in rows if r["split"] == "test"]
    info = json.loads(json.dumps(dataset.info()))
    assert info["vendors"] == ["google", "twitter", "openmoji"]
    assert info["classes"] == len({r["label"] for r in rows})
    assert info["licenses"]["openmoji"] == "CC-BY-SA-4.0"
    assert info["package_versions"]["emoji-datasource-google"] == "16.0.0"
    # The benchmark folder itself is accepted as root too; no rebuild happens.
    again = emoji.load_emoji(dataset.root)
    assert again.root == dataset.root and len(fake_npm.calls) == 3
    assert np.array_equal(again.split("train").labels, dataset.split("train").labels)

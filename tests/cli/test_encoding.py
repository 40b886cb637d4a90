"""Names that are not valid UTF-8 (Linux keeps them as bytes) print and serialise without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import dcml
from dcml.cli import main

UNDECODABLE = os.fsdecode(b"caf\xff\xfe")  # "caf" + two bytes that are not UTF-8: surrogate escapes in Python


def write_images(folder: Path, count: int = 2) -> None:
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(folder / f"{index}.png")


@pytest.fixture()
def root(tmp_path) -> Path:
    """A flat folder dataset of four classes (train 2, test 2), one of them named UNDECODABLE."""
    dataset = tmp_path / "dataset"
    for name in ("apple", "banana", "cherry", UNDECODABLE):
        write_images(dataset / name)
    return dataset


def dcml_cli(*args: str, encoding: str = "utf-8") -> subprocess.CompletedProcess:
    """`python -m dcml ...` with a strict UTF-8 stdout (as under LANG=en_US.UTF-8), or another encoding."""
    source = str(Path(dcml.__file__).resolve().parents[1])
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONUTF8", "LANG", "LC_CTYPE")}
    env.update(PYTHONIOENCODING=encoding, LC_ALL="C.UTF-8",
               PYTHONPATH=os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "dcml", *args], capture_output=True, env=env, timeout=120)


def test_data_info_prints_an_undecodable_class_name(root):
    result = dcml_cli("data", "info", "folder", "--root", str(root))
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr, stderr
    out = result.stdout.decode("utf-8")  # valid UTF-8
    assert "4 classes, 8 images" in out
    assert "caf\\xff\\xfe" in out  # the raw bytes shown as escapes, as `ls` does


def test_data_info_json_is_strict_json(root):
    result = dcml_cli("data", "info", "folder", "--root", str(root), "--json")
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode()
    result.stdout.decode("ascii")  # ensure_ascii: pure ASCII whatever the terminal
    info = json.loads(result.stdout)
    assert info["classes"] == 4 and info["images"] == 8
    assert "caf\\xff\\xfe" in info["class_names"]
    # No lone surrogates (which strict JSON parsers reject): every string encodes as UTF-8.
    for name in info["class_names"]:
        name.encode("utf-8")


def test_an_ascii_terminal_gets_escapes_for_non_ascii_names(root):
    write_images(root / "naïve")
    result = dcml_cli("data", "info", "folder", "--root", str(root), encoding="ascii")
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode()
    out = result.stdout.decode("ascii")
    assert "5 classes, 10 images" in out and "na\\xefve" in out and "caf\\xff\\xfe" in out


def test_an_error_naming_an_undecodable_folder_is_one_line(root):
    (root / os.fsdecode(b"empty\xff")).mkdir()
    result = dcml_cli("data", "info", "folder", "--root", str(root))
    lines = result.stderr.decode("utf-8").splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("dcml: error: folder: class folder ") and "holds no images" in lines[0]


def test_main_leaves_the_callers_streams_as_they_were(capsys):
    before = (sys.stdout.errors, sys.stderr.errors)
    assert main(["data", "list"]) == 0
    assert (sys.stdout.errors, sys.stderr.errors) == before
    assert "folder" in capsys.readouterr().out

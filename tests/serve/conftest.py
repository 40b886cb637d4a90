"""A tiny trained run, an index of its test split (labels, calibration) and a live server over it."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from training.conftest import tiny_overrides, write_folder_dataset

TOKEN = "serve-test-token-0123456789"


@pytest.fixture(scope="session")
def serve_folder(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("serve_folder"), {"train": 12, "val": 4, "test": 6}, seed=5)


@pytest.fixture(scope="session")
def serve_run(serve_folder, tmp_path_factory) -> Path:
    from dcml.config import load_config
    from dcml.training.trainer import Trainer

    out = tmp_path_factory.mktemp("serve_run") / "run"
    config = load_config("emoji", tiny_overrides(serve_folder) + ["schedule.epochs=2", "schedule.conquer_epoch=2"])
    Trainer(config, out, progress=False, echo=lambda _: None).fit()
    return out


@pytest.fixture(scope="session")
def built_index(serve_run, tmp_path_factory) -> Path:
    """The test split (24 images, labelled) with thresholds calibrated on the validation split."""
    from dcml.cli import main

    out = tmp_path_factory.mktemp("serve_index") / "index"
    assert main(["index", "build", "--model", str(serve_run), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    assert main(["calibrate", "--model", str(serve_run), "--split", "val", "--index", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture()
def index_copy(built_index, tmp_path) -> Path:
    """A private copy for tests that write."""
    copy = tmp_path / "index"
    shutil.copytree(built_index, copy)
    return copy


@pytest.fixture(scope="session")
def model(serve_run):
    from dcml.inference import load_model

    return load_model(serve_run)


@contextlib.contextmanager
def live_server(index_folder: Path, model, **options):
    """The real app on a free 127.0.0.1 port, in a thread; yields (base url, app), always stopped."""
    from dcml.search.index import Index
    from dcml.serve import ServeLimits, create_app
    from dcml.serve.server import serving_in_thread
    from dcml.serve.state import ServedIndex

    limits = options.pop("limits", ServeLimits())
    app = create_app(ServedIndex(Index.load(index_folder), model), limits=limits, **options)
    with serving_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def server(built_index, model):
    with live_server(built_index, model) as running:
        yield running


def test_images(folder: Path, split: str = "test") -> list[Path]:
    return sorted((folder / split).rglob("*.png"))


test_images.__test__ = False  # a helper, not a test

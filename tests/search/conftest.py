"""One tiny trained run shared by the search tests (trains in a few seconds on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.conftest import tiny_overrides, write_folder_dataset


@pytest.fixture(scope="session")
def search_folder(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("search_folder"), {"train": 12, "val": 4, "test": 6}, seed=3)


@pytest.fixture(scope="session")
def tiny_run(search_folder, tmp_path_factory) -> Path:
    from dcml.config import load_config
    from dcml.training.trainer import Trainer

    out = tmp_path_factory.mktemp("search_run") / "run"
    config = load_config("emoji", tiny_overrides(search_folder))
    Trainer(config, out, progress=False, echo=lambda _: None).fit()
    return out

"""UserError is a ValueError, and the handlers that turn ValueErrors into UserErrors keep a UserError's own message."""

from __future__ import annotations

import pytest
from PIL import Image

from dcml.errors import DatasetError, MissingDependencyError, UserError


def test_a_library_caller_catching_value_error_catches_user_errors():
    from dcml.config import load_config

    for error in (UserError, DatasetError, MissingDependencyError):
        assert issubclass(error, ValueError) and error.exit_code == 2
    with pytest.raises(ValueError, match="sampler.images_per_class must be in 2..64"):
        load_config("emoji", ["sampler.images_per_class=1"])


def test_an_image_over_the_pixel_limit_keeps_its_own_message(tmp_path):
    from dcml.data.images import load_rgb

    path = tmp_path / "big.png"
    Image.new("RGB", (5, 4)).save(path)
    with pytest.raises(DatasetError) as info:
        load_rgb(path, max_pixels=10)
    assert str(info.value).startswith(f"image {path} is 5x4 = 20 pixels, over the limit of 10 pixels")


def test_an_items_table_of_unequal_columns_keeps_its_own_message(tmp_path):
    from dcml.search.index import Items

    with pytest.raises(UserError, match="^items table: 2 paths, 1 labels, 2 groups$"):
        Items.from_json({"paths": ["a.png", "b.png"], "labels": [1]}, tmp_path / "items.json")
    with pytest.raises(UserError, match="is damaged: labels and groups must be integers"):
        Items.from_json({"paths": ["a.png"], "labels": ["x"]}, tmp_path / "items.json")

"""The drawing augmentation: seeded, never mirrored, white where the drawing moved away, a real change."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dcml.config import load_config
from dcml.data.augment import DrawingAugmentationSettings, LineWeight, drawing_augmentation
from dcml.errors import UserError


def arrow(size: int = 64) -> Image.Image:
    """A black arrow pointing right on white: its mirror image is another emoji class."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(12, 32), (50, 32)], fill="black", width=4)
    draw.polygon([(50, 22), (60, 32), (50, 42)], fill="black")
    return image


def as_array(tensor_or_image):
    return np.asarray(tensor_or_image, dtype=np.float64)


def augment(seed: int, settings=DrawingAugmentationSettings()):
    transform = drawing_augmentation(lambda image: image, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(arrow())


def test_the_same_seed_gives_the_same_drawing_and_other_seeds_differ():
    assert np.array_equal(as_array(augment(3)), as_array(augment(3)))
    outputs = [as_array(augment(seed)) for seed in range(6)]
    assert any(not np.array_equal(outputs[0], other) for other in outputs[1:])
    assert all(not np.array_equal(as_array(arrow()), out) for out in outputs)


def test_no_flip_the_arrow_keeps_pointing_right():
    # Without colour changes the head (right of centre, the wider part) stays right of the tail.
    settings = DrawingAugmentationSettings(brightness=0, contrast=0, saturation=0, hue=0)
    for seed in range(20):
        dark = as_array(augment(seed, settings)).mean(axis=2) < 128
        columns = np.flatnonzero(dark.any(axis=0))
        heights = dark.sum(axis=0)
        middle = (columns.min() + columns.max()) / 2
        assert heights[columns[columns > middle]].max() > heights[columns[columns < middle]].max(), seed


def test_what_a_shift_uncovers_is_white_paper():
    settings = DrawingAugmentationSettings(max_rotation_degrees=0, max_translation=0.3, scale_range=(0.5, 0.5),
                                           brightness=0, contrast=0, saturation=0, hue=0,
                                           line_weight_probability=0, blur_probability=0)
    out = as_array(augment(0, settings))
    corners = [out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]]
    assert all(np.array_equal(c, [255, 255, 255]) for c in corners)


def test_line_weight_thickens_or_thins_dark_strokes():
    image = arrow()
    dark = (as_array(image).mean(axis=2) < 128).sum()
    weights = set()
    for seed in range(12):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            changed = LineWeight(probability=1.0)(image)
        weights.add(int(np.sign((as_array(changed).mean(axis=2) < 128).sum() - dark)))
    assert weights == {-1, 1}


def test_the_config_accepts_drawing_and_refuses_it_with_cached_features():
    config = load_config("emoji", ["data.train_augmentation=drawing", "data.cache_frozen_features=false",
                                   "clustering.reuse_training_features=false"])
    assert config.data.train_augmentation == "drawing"
    with pytest.raises(UserError, match="cache_frozen_features needs data.train_augmentation=none"):
        load_config("emoji", ["data.train_augmentation=drawing"])

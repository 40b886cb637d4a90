"""The drawing augmentation: seeded, never mirrored, white where the drawing moved away, a real change;
its style steps: flat colours keep paper and ink, outlines trace edges only, greyscale drops the palette."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dcml.config import load_config
from dcml.data.augment import (DrawingAugmentationSettings, DrawingStyleSettings, FlatColours, Greyscale, LineWeight,
                               Outlines, drawing_augmentation)
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


def augment(seed: int, settings=DrawingAugmentationSettings(), style=None):
    transform = drawing_augmentation(lambda image: image, settings, style)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(arrow())


@pytest.mark.parametrize("style", [None, DrawingStyleSettings()], ids=["drawing", "drawing_style"])
def test_the_same_seed_gives_the_same_drawing_and_other_seeds_differ(style):
    assert np.array_equal(as_array(augment(3, style=style)), as_array(augment(3, style=style)))
    outputs = [as_array(augment(seed, style=style)) for seed in range(6)]
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


def shaded_disc(size: int = 64) -> Image.Image:
    """A disc shaded from dark to light red (a gradient, as shading vendors draw) on white paper."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for step in range(20):
        shade = 60 + 8 * step
        inset = 8 + step
        draw.ellipse([inset, inset, size - 9, size - 9], fill=(shade, 20, 20))
    return image


def always(seed: int, step, image):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return step(image)


@pytest.mark.parametrize("bits", [2, 3])
def test_flat_colours_keep_white_paper_and_few_levels(bits):
    image = shaded_disc()
    assert len(np.unique(as_array(image)[..., 0])) > 2 ** bits  # the gradient has many levels
    out = as_array(always(0, FlatColours(probability=1.0, bits=(bits, bits)), image))
    assert np.array_equal(out[0, 0], [255, 255, 255])  # the paper stays white (PIL's posterize would grey it)
    assert len(np.unique(out[..., 0])) <= 2 ** bits
    assert set(np.unique(out).tolist()) <= {round(k * 255 / (2 ** bits - 1)) for k in range(2 ** bits)}


def test_outlines_ink_edges_not_flat_areas_nor_the_frame():
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle([16, 16, 47, 47], fill=(230, 40, 40))
    out = as_array(always(0, Outlines(probability=1.0, edge_threshold=80, ink=32, wide_probability=0.0), image))
    ink = out.mean(axis=2) < 64
    assert ink[16, 30] or ink[15, 30]  # the silhouette's top edge is traced
    assert not ink[30, 30] and not ink[2, 2]  # the fill and the paper are not
    assert ink.sum() < 0.2 * 64 * 64
    # A drawing filling its frame gets no frame of ink.
    full = as_array(always(0, Outlines(1.0, 80, 32, 0.0), Image.new("RGB", (32, 32), (230, 40, 40))))
    assert (full.mean(axis=2) >= 64).all()


def test_greyscale_takes_the_palette_away_and_probability_zero_changes_nothing():
    image = shaded_disc()
    grey = as_array(always(0, Greyscale(probability=1.0), image))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    for step in (Greyscale(0.0), FlatColours(0.0, (2, 3)), Outlines(0.0, 80, 32, 0.5)):
        assert np.array_equal(as_array(always(0, step, image)), as_array(image))


def test_the_config_accepts_drawing_style_with_cached_augmented_views():
    config = load_config("emoji", ["data.train_augmentation=drawing_style", "data.augmented_views=2",
                                   "clustering.reuse_training_features=false"])
    assert (config.data.train_augmentation, config.data.augmented_views) == ("drawing_style", 2)
    with pytest.raises(UserError, match="train_augmentation"):
        load_config("emoji", ["data.train_augmentation=drawing_styles"])

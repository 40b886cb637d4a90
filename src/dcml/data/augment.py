"""Training augmentation for drawings (``data.train_augmentation: drawing`` and ``drawing_style``).

The emoji benchmark asks an embedding to recognise a drawing in a style it never saw. Different
artists draw the same emoji at another size and position, a little turned, with other colours,
thicker or thinner outlines and softer or harder edges; they never mirror it (emoji has left- and
right-facing classes and arrows), so there is no flip. Each step below imitates one of those
differences, with strengths small enough that the drawing stays the same emoji.

``drawing_style`` adds what separates one vendor's *style* from another's rather than one drawing
from another: a palette (greyscale now and then), shading (flat colours: gradients posterised into
a few fills, as flat vendors draw) and ink (dark outlines traced around every shape, as line-art
vendors such as OpenMoji draw). A model trained on two styles then meets a third one's traits in
training instead of first at test time.

Every random draw goes through torch's generator, which the training loader seeds per image
(:mod:`dcml.training.inputs`): the augmentation of an image depends only on the run's seed, the
epoch and its position, so a resumed run repeats it exactly and the number of loader workers does
not change a result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter, ImageOps

#: Drawings sit on white (the emoji benchmark composites transparency on white): what a shift or
#: a turn uncovers is white too, not black.
PAPER_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class DrawingAugmentationSettings:
    """The strengths of each step (defaults: an emoji at 64 px stays recognisably itself)."""

    max_rotation_degrees: float = 10.0  # artists tilt a face or an object a little, not upside down
    max_translation: float = 0.08  # of the image side: the drawing's placement in its square
    scale_range: tuple[float, float] = (0.8, 1.1)  # how much of the square the drawing fills
    brightness: float = 0.3  # colour jitter strengths (torchvision ColorJitter): vendors' palettes differ
    contrast: float = 0.3
    saturation: float = 0.4
    hue: float = 0.05  # small: a hue turn of a red heart must not make it another class
    line_weight_probability: float = 0.5  # thicken or thin the outlines (half each) this often
    blur_probability: float = 0.3  # soften the edges this often
    blur_sigma: tuple[float, float] = (0.2, 1.0)  # pixels at the source's resolution


def _chance(probability: float) -> bool:
    return bool(torch.rand(()) < probability)


class LineWeight:
    """Thicker or thinner strokes: a 3 x 3 minimum filter grows dark lines on a light ground, a
    maximum filter shrinks them (which one: a fair coin, from torch's generator)."""

    def __init__(self, probability: float):
        self.probability = probability

    def __call__(self, image: Image.Image) -> Image.Image:
        if not _chance(self.probability):
            return image
        thicker = _chance(0.5)
        return image.filter(ImageFilter.MinFilter(3) if thicker else ImageFilter.MaxFilter(3))


class SoftEdges:
    """A Gaussian blur of random strength, this often."""

    def __init__(self, probability: float, sigma: tuple[float, float]):
        self.probability, self.sigma = probability, sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if not _chance(self.probability):
            return image
        low, high = self.sigma
        radius = low + (high - low) * float(torch.rand(()))
        return image.filter(ImageFilter.GaussianBlur(radius))


@dataclass(frozen=True)
class DrawingStyleSettings:
    """The style steps of ``drawing_style`` (each this often, independently)."""

    flat_colour_probability: float = 0.3  # shading and gradients become a few flat fills
    flat_colour_bits: tuple[int, int] = (2, 3)  # bits kept per channel (2: 4 levels, 3: 8 levels)
    outline_probability: float = 0.3  # dark outlines traced around every shape
    outline_edge_threshold: int = 80  # edge strength (0-255, PIL's FIND_EDGES on grey) that becomes ink:
    # strong colour boundaries and the silhouette, not soft shading
    outline_wide_probability: float = 0.3  # a two-pixel outline instead of one, this often
    outline_ink: int = 32  # the outline's grey level: near black
    greyscale_probability: float = 0.15  # the palette taken away


def _uniform_int(low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, ()))


class FlatColours:
    """Each channel rounded to 2**bits evenly spaced levels (bits drawn from ``bits``), so smooth
    shading turns into flat fills. Unlike PIL's posterize, which drops low bits, the levels include
    0 and 255: the paper stays white and the ink black."""

    def __init__(self, probability: float, bits: tuple[int, int]):
        self.probability, self.bits = probability, bits

    def __call__(self, image: Image.Image) -> Image.Image:
        if not _chance(self.probability):
            return image
        steps = 2 ** _uniform_int(*self.bits) - 1
        table = [round(round(v * steps / 255) * 255 / steps) for v in range(256)]
        return image.convert("RGB").point(table * 3)


class Outlines:
    """Ink along every edge of the drawing (colour boundaries and the silhouette against the paper),
    one or two pixels wide at the source's resolution."""

    def __init__(self, probability: float, edge_threshold: int, ink: int, wide_probability: float):
        self.probability, self.edge_threshold, self.ink = probability, edge_threshold, ink
        self.wide_probability = wide_probability

    def __call__(self, image: Image.Image) -> Image.Image:
        if not _chance(self.probability):
            return image
        image = image.convert("RGB")
        # Edges of the grey image, on a white border so that a drawing touching the frame gets no
        # frame of ink.
        grey = ImageOps.expand(image.convert("L"), border=1, fill=255)
        edges = grey.filter(ImageFilter.FIND_EDGES).crop((1, 1, grey.width - 1, grey.height - 1))
        mask = edges.point(lambda v: 255 if v > self.edge_threshold else 0)
        if _chance(self.wide_probability):
            mask = mask.filter(ImageFilter.MaxFilter(3))
        return Image.composite(Image.new("RGB", image.size, (self.ink,) * 3), image, mask)


class Greyscale:
    def __init__(self, probability: float):
        self.probability = probability

    def __call__(self, image: Image.Image) -> Image.Image:
        if not _chance(self.probability):
            return image
        return image.convert("L").convert("RGB")


def drawing_augmentation(then, settings: DrawingAugmentationSettings = DrawingAugmentationSettings(),
                         style: DrawingStyleSettings | None = None):
    """PIL image -> ``then`` (the backbone's test transform: resize, crop, normalise) of an augmented copy.
    ``style``: add the style steps (``drawing_style``); None: the drawing steps only (``drawing``)."""
    from torchvision import transforms

    s = settings
    # Style first (on the source drawing, where an outline is a stroke of the artist's size), then
    # the drawing steps, which then also vary the added ink's weight and softness.
    style_steps = [] if style is None else [
        FlatColours(style.flat_colour_probability, style.flat_colour_bits),
        Outlines(style.outline_probability, style.outline_edge_threshold, style.outline_ink, style.outline_wide_probability),
        Greyscale(style.greyscale_probability),
    ]
    return transforms.Compose([
        *style_steps,
        transforms.RandomAffine(degrees=s.max_rotation_degrees, translate=(s.max_translation, s.max_translation),
                                scale=s.scale_range, interpolation=transforms.InterpolationMode.BILINEAR, fill=PAPER_WHITE),
        transforms.ColorJitter(brightness=s.brightness, contrast=s.contrast, saturation=s.saturation, hue=s.hue),
        LineWeight(s.line_weight_probability),
        SoftEdges(s.blur_probability, s.blur_sigma),
        then,
    ])

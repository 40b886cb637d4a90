"""Training augmentation for drawings (``data.train_augmentation: drawing``).

The emoji benchmark asks an embedding to recognise a drawing in a style it never saw. Different
artists draw the same emoji at another size and position, a little turned, with other colours,
thicker or thinner outlines and softer or harder edges; they never mirror it (emoji has left- and
right-facing classes and arrows), so there is no flip. Each step below imitates one of those
differences, with strengths small enough that the drawing stays the same emoji.

Every random draw goes through torch's generator, which the training loader seeds per image
(:mod:`dcml.training.inputs`): the augmentation of an image depends only on the run's seed, the
epoch and its position, so a resumed run repeats it exactly and the number of loader workers does
not change a result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter

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


def drawing_augmentation(then, settings: DrawingAugmentationSettings = DrawingAugmentationSettings()):
    """PIL image -> ``then`` (the backbone's test transform: resize, crop, normalise) of an augmented copy."""
    from torchvision import transforms

    s = settings
    return transforms.Compose([
        transforms.RandomAffine(degrees=s.max_rotation_degrees, translate=(s.max_translation, s.max_translation),
                                scale=s.scale_range, interpolation=transforms.InterpolationMode.BILINEAR, fill=PAPER_WHITE),
        transforms.ColorJitter(brightness=s.brightness, contrast=s.contrast, saturation=s.saturation, hue=s.hue),
        LineWeight(s.line_weight_probability),
        SoftEdges(s.blur_probability, s.blur_sigma),
        then,
    ])

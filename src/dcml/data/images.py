"""Image loading shared by every dataset: RGB, with transparency composited on white."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from dcml.data.records import Split
from dcml.errors import DatasetError


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB; RGBA / palette-with-transparency images are composited on white."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None


class ImageFolderSplit(torch.utils.data.Dataset):
    """A torch Dataset over one Split: returns (transformed image, label, index)."""

    def __init__(self, split: Split, transform=None):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, index: int):
        image = load_rgb(self.split.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.split.labels[index]), index

"""Image loading shared by every dataset: 8-bit RGB, upright, with transparency composited on white.

:func:`load_rgb` is the one place an image file is decoded. Besides the usual modes it

* refuses images larger than ``max_pixels`` (decompression bombs: a few kilobytes of PNG can
  claim 15000 x 15000 pixels) with a one-line :class:`~dcml.errors.DatasetError`, checked from
  the header before any pixel is decoded, whatever Pillow's own global limit says;
* scales 16-bit images (gray, gray + alpha, RGB48, RGBA64) to 8 bits (value >> 8) instead of
  letting ``convert("RGB")`` clip them to white, and float images (mode ``F``) from 0..1;
* applies the EXIF orientation, as photo viewers do (a damaged EXIF block counts as none).
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dcml.data.records import Split
from dcml.errors import DatasetError

#: Largest image, in pixels, that :func:`load_rgb` decodes (``data.max_image_pixels`` in a config).
#: Pillow's own default limit (1 GiB / 4 / 3, about 9459 x 9459): an image this size takes about
#: 270 MB of RGB pixels, far above any retrieval benchmark's photos, and an image we accept never makes
#: Pillow warn later (its crop, as used by RandomResizedCrop, checks the same limit again).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MAX = 65535

# EXIF orientation tag value -> the transposition that makes the image upright: the table of
# PIL.ImageOps.exif_transpose. That function is not called itself because it also rewrites the
# EXIF / XMP metadata of its result (which we discard anyway), and that rewriting can fail on
# damaged metadata that has nothing to do with the orientation.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_rgb(path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image as upright 8-bit RGB.

    Transparent pixels (alpha channel, palette or colour-key transparency) are composited on
    white; 16-bit samples are scaled to 8 bits (0..65535 -> 0..255, gray stays gray); float
    images must hold values in 0..1; the EXIF orientation is applied. An image with more than
    ``max_pixels`` pixels (width x height) is refused before it is decoded. Every problem with
    the file is a one-line :class:`~dcml.errors.DatasetError` naming it.
    """
    try:
        with _open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise DatasetError(
                    f"image {path} is {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,} pixels that guards against decompression bombs; downscale it, or raise "
                    f"data.max_image_pixels (e.g. --set data.max_image_pixels={width * height}) if you trust the file"
                )
            image.load()
            orientation = _orientation(image)
            rgb = _to_rgb(image, path)
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except DatasetError:  # already names the image (a DatasetError is a ValueError too)
        raise
    # ValueError: a mode Pillow cannot convert to RGB, a tile table that does not fit the image, ...
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    return rgb


def _open(path: str | Path) -> Image.Image:
    """``Image.open`` (header only) without Pillow's own decompression-bomb check or metadata warnings.

    Pillow warns above its global ``Image.MAX_IMAGE_PIXELS`` and refuses above twice it, inside
    ``Image.open``, with a warning or traceback of its own; :func:`load_rgb` compares the size
    with its ``max_pixels`` instead, so that limit alone decides and its message is the one shown.
    """
    with _pillow_quiet():
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            return _open_past_pillow_limit(path)


@contextlib.contextmanager
def _pillow_quiet():
    """Silence Pillow's size warning and its warnings about damaged metadata.

    A JPEG's EXIF block is parsed as it is opened (for its DPI), and a damaged one makes Pillow warn
    "Corrupt EXIF data": viewers ignore such a block silently, and a warning line per image of a
    dataset would bury the messages that matter. Only Pillow's own UserWarnings are silenced.
    (``catch_warnings`` is process-wide: fine for DataLoader workers, which are processes.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def _open_past_pillow_limit(path: str | Path) -> Image.Image:
    """What ``Image.open`` does, minus its size check: try each registered format on the file.

    Only reached for images above twice Pillow's limit; parsing the header decodes no pixels, so
    :func:`load_rgb` can then report the exact size, or decode the image if ``max_pixels`` allows.
    """
    Image.init()
    with open(path, "rb") as file:
        prefix = file.read(16)
    for format_id in Image.ID:
        factory, accept = Image.OPEN[format_id]
        verdict = accept is None or accept(prefix)
        if isinstance(verdict, str) or not verdict:  # a string is Pillow's "looks like X, but unsupported"
            continue
        try:
            return factory(path)
        except (SyntaxError, IndexError, TypeError, struct.error):  # the exceptions Image.open skips a format on
            continue
    raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8), or 1 (upright) when there is none or the EXIF block is damaged."""
    try:
        with _pillow_quiet():
            value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - any failure to parse metadata means "no orientation", never "no image"
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _to_rgb(image: Image.Image, path: str | Path) -> Image.Image:
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N (16-bit), I (32-bit: 16-bit PGM, old Pillow's PNG)
        values = np.asarray(image)
        rgb = Image.fromarray(_sixteen_to_eight_bits(values, image.mode, path)).convert("RGB")
        transparency = image.info.get("transparency")
        if isinstance(transparency, int):
            # A 16-bit gray PNG's tRNS names one transparent sample value: those pixels become white.
            rgb.paste((255, 255, 255), mask=Image.fromarray(((values == transparency) * 255).astype(np.uint8)))
        return rgb
    if image.mode == "F":
        return Image.fromarray(_float_to_eight_bits(np.asarray(image, dtype=np.float64), path)).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # P, L and RGB with a transparent colour key (tRNS) included: convert("RGBA") applies it.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # 16-bit RGB / RGBA / gray + alpha PNGs arrive here already as 8-bit RGB / RGBA (Pillow keeps the
    # high byte); CMYK, YCbCr, palette and 1-bit images convert as they are.
    return image.convert("RGB")


def _sixteen_to_eight_bits(values: np.ndarray, mode: str, path: str | Path) -> np.ndarray:
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > _SIXTEEN_BIT_MAX:
        raise DatasetError(
            f"cannot read image {path}: {mode} pixels range {low}..{high}, outside the 16-bit range "
            f"0..{_SIXTEEN_BIT_MAX}; save it with 8 or 16 bits per channel"
        )
    return (values.astype(np.uint16) >> 8).astype(np.uint8)


def _float_to_eight_bits(values: np.ndarray, path: str | Path) -> np.ndarray:
    if values.size and not np.isfinite(values).all():
        raise DatasetError(f"cannot read image {path}: float pixels include NaN or infinity; save it with 8 or 16 bits per channel")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > 1:
        # Float images have no agreed range: 0..1 is the common convention; any other range would
        # be a guess (0..255? 0..max?), so it is refused rather than shown too bright or too dark.
        raise DatasetError(
            f"cannot read image {path}: float pixels range {low:g}..{high:g}, expected 0..1; "
            "save it with 8 or 16 bits per channel"
        )
    return np.round(values * 255).astype(np.uint8)


class ImageFolderSplit(torch.utils.data.Dataset):
    """A torch Dataset over one Split: returns (transformed image, label, index).

    ``max_pixels`` is :func:`load_rgb`'s size limit (a config's ``data.max_image_pixels``).
    """

    def __init__(self, split: Split, transform=None, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.split = split
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, index: int):
        image = load_rgb(self.split.paths[index], max_pixels=self.max_pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.split.labels[index]), index

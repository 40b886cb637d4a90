"""Uploaded bytes -> an upright RGB image, through the same reader as every file dcml reads.

Nothing is written to disk: :func:`dcml.data.images.load_rgb` is handed an in-memory file whose
``str()`` is the upload's name, so its one-line reasons name what the caller sent.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from dcml.data.images import load_rgb
from dcml.errors import DatasetError
from dcml.serve.limits import RequestProblem


class _NamedUpload(io.BytesIO):
    """In-memory file that prints as its upload name inside load_rgb's messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = f"upload {name!r}"

    def __str__(self) -> str:
        return self.label


def _header_size(data: bytes, name: str) -> tuple[int, int]:
    """Width and height from the header alone (no pixels decoded), or a 4xx for what is not an image.

    Checked here rather than left to load_rgb: its fallback for images past Pillow's hard limit
    re-opens the source by file name, which an in-memory upload does not have."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                return header.size
    except Image.DecompressionBombError:
        raise RequestProblem(413, f"upload {name!r} claims more pixels than Pillow will ever decode") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError):
        raise RequestProblem(415, f"upload {name!r} is not an image Pillow can read") from None


def decode_upload(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """An uploaded file as 8-bit RGB; 415 if it is not an image, 413 over ``max_pixels``, 422 if damaged."""
    if not data:
        raise RequestProblem(422, f"upload {name!r} is empty")
    width, height = _header_size(data, name)
    if width * height > max_pixels:
        raise RequestProblem(413, f"upload {name!r} is {width}x{height} = {width * height:,} pixels, over this "
                                  f"server's limit of {max_pixels:,} (decompression-bomb guard); downscale it")
    try:
        return load_rgb(_NamedUpload(data, name), max_pixels=max_pixels)
    except DatasetError as error:
        raise RequestProblem(422, str(error)) from None
    except (MemoryError, RuntimeError, TypeError) as error:  # decoders fail in more ways than load_rgb names
        raise RequestProblem(422, f"upload {name!r} cannot be decoded: {error}") from None

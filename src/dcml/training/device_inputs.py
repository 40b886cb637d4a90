"""Training images decoded and augmented on the device (nvJPEG through torchvision), not in loader workers.

Not wired into the trainer yet. The loader workers then only read file bytes (:func:`read_encoded`);
:class:`DeviceAugment` decodes a batch with ``torchvision.io.decode_jpeg(..., device=...)`` and
applies RandomResizedCrop, an optional horizontal flip and normalisation to tensors there, from the
same per-image seeds as the CPU path (``SeededEpoch`` / ``_TrainImages`` in
:mod:`dcml.training.inputs`).

Same as the CPU path, exactly: the crop box and the flip. Each image's parameters are drawn by
torchvision's own ``RandomResizedCrop.get_params`` and then ``torch.rand(1) < 0.5``, after
``torch.manual_seed(seed)`` in a forked RNG, in the order the PIL ``Compose`` draws them and from
the same image size, so they are the same draws.

What differs (pixels only, never which region or whether flipped):

- **decoding**: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's (Pillow's); on the CPU,
  ``decode_jpeg`` is libjpeg-turbo too and decodes as Pillow does;
- **resampling**: the crop is resized by ``torchvision.transforms.v2.functional.resized_crop``
  (bilinear, antialias) on the uint8 tensor: the same filter as Pillow's bilinear reduction, with
  other rounding (on the CPU torch's uint8 path, on CUDA in float then rounded back to 8 bits), so
  a pixel may differ by a few levels out of 255; the test states the bound;
- **normalisation** is the same arithmetic as ``ToTensor`` + ``Normalize`` (x / 255, then
  (x - mean) / std) in float32.

Files the device path cannot decode as :func:`dcml.data.images.load_rgb` does (not JPEG, not RGB or
grey, or with an EXIF orientation, which nvJPEG ignores) are decoded by ``load_rgb`` on the host
and moved to the device: their pixels are then the CPU path's before the resize.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcml.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_rgb
from dcml.errors import DatasetError

_EXIF_ORIENTATION = 0x0112
#: RandomResizedCrop's defaults, as the CPU path's ``transforms.RandomResizedCrop(size)`` uses them.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class EncodedImage:
    """One training image as a loader worker hands it over: JPEG bytes, or (fallback) host pixels."""

    data: torch.Tensor | None  # 1-D uint8, the file's bytes (decoded on the device)
    pixels: torch.Tensor | None  # 3 x H x W uint8, decoded by load_rgb (when the device cannot)


def read_encoded(path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> EncodedImage:
    """The file's bytes when the device can decode it as load_rgb would; otherwise load_rgb's pixels.

    Reads only the header with Pillow (size, mode, orientation): the decompression-bomb limit holds
    before anything is decoded, as on the CPU path.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            plain = (image.format == "JPEG" and image.mode in ("RGB", "L")
                     and image.getexif().get(_EXIF_ORIENTATION, 1) == 1)
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None
    if width * height > max_pixels or not plain:
        # load_rgb raises the bomb error (one line, naming the file) or decodes what nvJPEG cannot.
        rgb = np.asarray(load_rgb(path, max_pixels=max_pixels))
        return EncodedImage(None, torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous())
    return EncodedImage(torch.from_numpy(np.fromfile(str(path), dtype=np.uint8)), None)


@dataclass(frozen=True)
class CropParams:
    top: int
    left: int
    height: int
    width: int
    flip: bool


class DeviceAugment:
    """Batch of encoded images + their seeds -> B x 3 x size x size float32 on ``device``, normalised."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *, horizontal_flip: bool = True,
                 device: str | torch.device = "cuda", scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO):
        self.size, self.horizontal_flip = int(image_size), bool(horizontal_flip)
        self.device = torch.device(device)
        self.scale, self.ratio = [float(v) for v in scale], [float(v) for v in ratio]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def params(self, height: int, width: int, seed: int) -> CropParams:
        """The crop box and flip the CPU path draws for an image of this size and this seed."""
        from torchvision import transforms

        # get_params reads only the size: an expanded scalar stands in for the image (no memory).
        shape = torch.empty(1, 1, 1).expand(3, height, width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            top, left, h, w = transforms.RandomResizedCrop.get_params(shape, self.scale, self.ratio)
            flip = self.horizontal_flip and bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5)
        return CropParams(int(top), int(left), int(h), int(w), flip)

    def decode(self, images: Sequence[EncodedImage]) -> list[torch.Tensor]:
        """3 x H x W uint8 tensors on the device; the JPEGs in one call (nvJPEG batches a list)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(images)
        encoded = [i for i, image in enumerate(images) if image.data is not None]
        if encoded:
            decoded = decode_jpeg([images[i].data for i in encoded], mode=ImageReadMode.RGB, device=self.device)
            for i, tensor in zip(encoded, decoded):
                out[i] = tensor
        for i, image in enumerate(images):
            if image.data is None:
                out[i] = image.pixels.to(self.device, non_blocking=True)
        return out

    def __call__(self, images: Sequence[EncodedImage], seeds: Sequence[int]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        crops = []
        for pixels, seed in zip(self.decode(images), seeds):
            p = self.params(pixels.shape[-2], pixels.shape[-1], seed)
            crop = F.resized_crop(pixels, p.top, p.left, p.height, p.width, [self.size, self.size],
                                  interpolation=F.InterpolationMode.BILINEAR, antialias=True)
            crops.append(crop.flip(-1) if p.flip else crop)
        batch = torch.stack(crops).float().div_(255.0)
        return batch.sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)

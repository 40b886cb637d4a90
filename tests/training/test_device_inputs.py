"""The device data path draws the CPU path's crops and flips, and its pixels agree within a stated bound."""

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from dcml.data.images import load_rgb
from dcml.errors import DatasetError
from dcml.models.backbones import create_backbone
from dcml.training.device_inputs import DeviceAugment, read_encoded

SIZE = 32
#: Pixel bound (normalised units = levels / 255 / std; std >= 0.224): resampling rounding only,
#: since on the CPU both paths decode with libjpeg-turbo.
MAX_LEVELS, MEAN_LEVELS = 3, 0.5


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("resnet18", pretrained=False)


def _jpeg(path, seed, shape=(45, 61), **save):
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 256, size=(shape[0] // 5 + 1, shape[1] // 5 + 1, 3)), np.ones((5, 5, 1)))
    Image.fromarray(smooth[: shape[0], : shape[1]].astype(np.uint8)).save(path, format="JPEG", quality=95, **save)
    return path


def _cpu_path(transform, path, seed, monkeypatch):
    """What _TrainImages does, recording the crop box and the flip it draws."""
    from torchvision import transforms

    seen = {"flip": False}
    get_params = transforms.RandomResizedCrop.get_params
    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params",
                        staticmethod(lambda *a: seen.setdefault("box", get_params(*a))))
    hflip = TF.hflip
    monkeypatch.setattr(TF, "hflip", lambda img: seen.update(flip=True) or hflip(img))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = transform(load_rgb(path))
    monkeypatch.undo()
    return out, seen


@pytest.mark.parametrize("flip", [True, False])
def test_same_crop_flip_and_close_pixels(tmp_path, backbone, monkeypatch, flip):
    transform = backbone.train_transform(SIZE, horizontal_flip=flip)
    augment = DeviceAugment(SIZE, backbone.mean, backbone.std, horizontal_flip=flip, device="cpu")
    paths = [_jpeg(tmp_path / f"{i}.jpg", i) for i in range(4)]
    seeds = [2**62 + 17, 3, 12345, 99]
    batch = augment([read_encoded(p) for p in paths], seeds)
    assert batch.shape == (4, 3, SIZE, SIZE) and batch.dtype == torch.float32
    flips = []
    for row, path, seed in zip(batch, paths, seeds):
        expected, seen = _cpu_path(transform, path, seed, monkeypatch)
        p = augment.params(45, 61, seed)
        assert (p.top, p.left, p.height, p.width) == tuple(seen["box"])
        assert p.flip == seen["flip"]
        flips.append(p.flip)
        levels = ((row - expected) * torch.tensor(backbone.std).view(3, 1, 1) * 255).abs()
        assert levels.max() <= MAX_LEVELS and levels.mean() <= MEAN_LEVELS, (levels.max(), levels.mean())
    assert any(flips) == flip  # the seeds above draw a flip for some image


def test_fallbacks_decode_as_load_rgb(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(png)
    assert read_encoded(png).data is None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: nvJPEG would ignore it
    rotated = read_encoded(_jpeg(tmp_path / "r.jpg", 0, exif=exif.tobytes()))
    assert rotated.data is None and tuple(rotated.pixels.shape) == (3, 61, 45)
    plain = read_encoded(_jpeg(tmp_path / "p.jpg", 0))
    assert plain.data is not None and plain.pixels is None
    with pytest.raises(DatasetError, match="pixels"):
        read_encoded(tmp_path / "p.jpg", max_pixels=100)
    with pytest.raises(DatasetError, match="not found"):
        read_encoded(tmp_path / "missing.jpg")

"""load_rgb: size limit, 16-bit and float images, EXIF orientation, one-line errors."""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from dcml import config as config_module
from dcml.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageFolderSplit, load_rgb
from dcml.data.records import Split
from dcml.errors import DatasetError, UserError


@pytest.fixture(autouse=True)
def warnings_are_errors():
    """Every warning Pillow (or load_rgb) emits while loading fails the test that caused it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def error_of(path, **options) -> str:
    with pytest.raises(DatasetError) as info:
        load_rgb(path, **options)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path, samples: np.ndarray | None, *, color_type: int, bit_depth: int = 16, size=None, extra=b"") -> None:
    """A PNG written by hand, so that 16-bit layouts Pillow does not save (RGB48, RGBA64, gray+alpha)
    can be made. ``samples`` is height x width x channels; None writes a header and a few bytes of
    pixel data only (a huge image that costs nothing until it is decoded)."""
    if samples is None:
        width, height = size
        data = zlib.compress(bytes(64))
    else:
        height, width = samples.shape[:2]
        big_endian = samples.astype(">u2" if bit_depth == 16 else "u1").reshape(height, -1)
        data = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in big_endian))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ------------------------------------------------------------------------- decompression bombs
def test_an_image_over_max_pixels_is_refused_in_one_line(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(path)
    message = error_of(path, max_pixels=199)
    assert "20x10" in message and "200 pixels" in message and "199 pixels" in message
    assert "data.max_image_pixels" in message
    assert load_rgb(path, max_pixels=200).size == (20, 10)  # the limit itself is allowed


def test_a_huge_header_is_refused_before_decoding_and_pillow_stays_silent(tmp_path):
    # 15000 x 15000 is over twice Pillow's own limit: Pillow alone raises DecompressionBombError.
    path = tmp_path / "bomb.png"
    write_png(path, None, color_type=0, bit_depth=8, size=(15000, 15000))
    message = error_of(path)
    assert "15000x15000 = 225,000,000 pixels" in message and f"{DEFAULT_MAX_IMAGE_PIXELS:,} pixels" in message
    # Between the limit and twice it Pillow would only warn (an error here, see the fixture).
    path = tmp_path / "just_over.png"
    write_png(path, None, color_type=0, bit_depth=8, size=(DEFAULT_MAX_IMAGE_PIXELS + 1, 1))
    assert "over the limit" in error_of(path)


def test_an_image_at_the_default_limit_passes_the_size_check_without_a_warning(tmp_path):
    # Exactly DEFAULT_MAX_IMAGE_PIXELS pixels; only a header and a little data, so decoding then
    # fails as truncated, cheaply: the size check passed and Pillow did not warn.
    path = tmp_path / "at_limit.png"
    write_png(path, None, color_type=0, bit_depth=8, size=(DEFAULT_MAX_IMAGE_PIXELS, 1))
    message = error_of(path)
    assert message.startswith("cannot read image") and "over the limit" not in message


def test_pillows_global_limit_neither_warns_nor_decides(tmp_path, monkeypatch):
    # Someone lowered Pillow's global limit: load_rgb's own setting still alone decides.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    warn_range, error_range = tmp_path / "warn.png", tmp_path / "error.png"
    Image.new("RGB", (10, 10), (9, 9, 9)).save(warn_range)  # 100 pixels: Pillow warns
    Image.new("RGB", (40, 20), (9, 9, 9)).save(error_range)  # 800 pixels: Pillow raises
    assert load_rgb(warn_range).size == (10, 10)
    assert pixels(load_rgb(error_range)).tolist() == [[[9, 9, 9]] * 40] * 20
    assert "40x20 = 800 pixels" in error_of(error_range, max_pixels=799)


def test_image_folder_split_passes_max_pixels_on(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (20, 10)).save(path)
    split = Split("test", [path], labels=[0])
    assert ImageFolderSplit(split)[0][0].size == (20, 10)
    with pytest.raises(DatasetError, match="over the limit of 100 pixels"):
        ImageFolderSplit(split, max_pixels=100)[0]


def test_the_config_field_defaults_to_the_loader_constant_and_is_range_checked():
    config = config_module.TrainConfig()
    assert config.data.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    config_module.validate(config)
    for bad in (0, -5):
        broken = dataclasses.replace(config, data=dataclasses.replace(config.data, max_image_pixels=bad))
        with pytest.raises(UserError, match=r"^data\.max_image_pixels must be .*got " + str(bad)):
            config_module.validate(broken)


# ------------------------------------------------------------------------- 16-bit and float
SIXTEEN = np.array([[0, 255, 256, 4660], [32768, 40000, 65280, 65535]], dtype=np.uint16)  # 2 x 4


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    from_pillow, by_hand = tmp_path / "pillow.png", tmp_path / "hand.png"
    Image.fromarray(SIXTEEN).save(from_pillow)
    write_png(by_hand, SIXTEEN[..., None], color_type=0)
    with Image.open(from_pillow) as image:
        assert image.mode == "I;16"  # the mode convert("RGB") clips to white
    expected = np.repeat((SIXTEEN >> 8)[..., None], 3, axis=2).astype(int)
    for path in (from_pillow, by_hand):
        assert (pixels(load_rgb(path)) == expected).all()


def test_16_bit_big_endian_and_32_bit_gray_are_scaled(tmp_path):
    expected = np.repeat((SIXTEEN >> 8)[..., None], 3, axis=2).astype(int)
    big_endian, pgm = tmp_path / "big.tiff", tmp_path / "gray.pgm"
    Image.fromarray(SIXTEEN.astype(">u2")).save(big_endian)
    Image.fromarray(SIXTEEN).save(pgm)
    with Image.open(big_endian) as first, Image.open(pgm) as second:
        assert (first.mode, second.mode) == ("I;16B", "I")
    for path in (big_endian, pgm):
        assert (pixels(load_rgb(path)) == expected).all(), path


def test_16_bit_gray_with_a_transparent_value_is_white_there(tmp_path):
    path = tmp_path / "keyed.png"
    write_png(path, SIXTEEN[..., None], color_type=0, extra=_chunk(b"tRNS", struct.pack(">H", 4660)))
    result = pixels(load_rgb(path))
    assert result[0, 3].tolist() == [255, 255, 255] and result[1, 0].tolist() == [128, 128, 128]


def test_16_bit_gray_alpha_rgb48_and_rgba64_are_scaled(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, size=(3, 5, 3), dtype=np.uint16)
    expected = (rgb >> 8).astype(int)
    opaque = np.full((3, 5, 1), 65535, dtype=np.uint16)
    cases = {
        "rgb48": (rgb, 2, expected),
        "rgba64": (np.concatenate([rgb, opaque], axis=2), 6, expected),
        "gray_alpha": (np.concatenate([rgb[..., :1], opaque], axis=2), 4, np.repeat(expected[..., :1], 3, axis=2)),
    }
    for name, (samples, color_type, wanted) in cases.items():
        path = tmp_path / f"{name}.png"
        write_png(path, samples, color_type=color_type)
        assert (pixels(load_rgb(path)) == wanted).all(), name
    # Transparent (alpha 0) 16-bit pixels are composited on white, as 8-bit ones are.
    clear = np.concatenate([rgb, np.zeros((3, 5, 1), dtype=np.uint16)], axis=2)
    write_png(tmp_path / "clear.png", clear, color_type=6)
    assert (pixels(load_rgb(tmp_path / "clear.png")) == 255).all()


def test_float_images_in_0_to_1_are_scaled_others_refused(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(path)
    assert pixels(load_rgb(path))[0, :, 0].tolist() == [0, 128, 255]
    for values, words in (([[0.0, 300.0]], "range 0..300, expected 0..1"), ([[0.0, np.nan]], "NaN")):
        Image.fromarray(np.array(values, dtype=np.float32)).save(path)
        assert words in error_of(path)


# ------------------------------------------------------------------------- EXIF orientation
def oriented_jpeg(path, orientation=None, exif: bytes | None = None) -> None:
    """64 x 32: left half red, right half blue (big flat areas survive JPEG)."""
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))
    if orientation is not None:
        tags = Image.Exif()
        tags[0x0112] = orientation
        exif = tags.tobytes()
    image.save(path, "JPEG", quality=95, **({"exif": exif} if exif is not None else {}))


def colour_at(image, xy) -> str:
    r, _, b = image.getpixel(xy)
    return "red" if r > 200 and b < 60 else "blue" if b > 200 and r < 60 else f"other {r, b}"


@pytest.mark.parametrize(
    "orientation, size, top_left, bottom_right",
    [(1, (64, 32), "red", "blue"), (3, (64, 32), "blue", "red"), (6, (32, 64), "red", "blue"), (8, (32, 64), "blue", "red")],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, top_left, bottom_right):
    path = tmp_path / f"o{orientation}.jpg"
    oriented_jpeg(path, orientation)
    image = load_rgb(path)
    assert image.size == size
    assert colour_at(image, (4, 4)) == top_left and colour_at(image, (size[0] - 5, size[1] - 5)) == bottom_right
    # The same picture Pillow's exif_transpose (what viewers do) gives.
    with Image.open(path) as original:
        reference = ImageOps.exif_transpose(original).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def _tiff_ifd(entries: list[tuple[int, int, int, int]]) -> bytes:
    """Little-endian TIFF header + one IFD of (tag, type, count, value-or-offset) entries."""
    body = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + body


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + b"\xff" * 20,  # not a TIFF structure at all
        b"Exif\x00\x00" + _tiff_ifd([(0x0112, 3, 40, 4000)]),  # orientation's values lie past the end
        b"Exif\x00\x00" + _tiff_ifd([(0x0112, 3, 1, 99)]),  # an orientation that does not exist
        b"Exif\x00\x00" + _tiff_ifd([(0x0112, 2, 2, 0x36)]),  # orientation as text "6"
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff",  # an IFD claiming 65535 entries
    ],
)
def test_a_damaged_exif_block_is_ignored(tmp_path, exif):
    path = tmp_path / "damaged.jpg"
    oriented_jpeg(path, exif=exif)
    image = load_rgb(path)  # no exception, no warning (see the fixture)
    assert image.size == (64, 32) and colour_at(image, (4, 4)) == "red"


# ------------------------------------------------------------------------- the modes that already worked
def test_transparency_is_composited_on_white_and_other_modes_convert(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    cases = {
        "rgba.png": rgba,
        "la.png": rgba.convert("LA"),
        "palette.png": rgba.convert("P"),  # palette + transparency, as the emoji PNGs
        "cmyk.jpg": Image.new("CMYK", (4, 4), (0, 255, 255, 0)),
        "bilevel.png": Image.new("1", (4, 4), 1),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
    assert pixels(load_rgb(tmp_path / "rgba.png"))[1, 1].tolist() == [255, 255, 255]
    assert pixels(load_rgb(tmp_path / "rgba.png"))[0, 0].tolist() == [255, 0, 0]
    assert pixels(load_rgb(tmp_path / "la.png"))[1, 1].tolist() == [255, 255, 255]
    assert pixels(load_rgb(tmp_path / "palette.png"))[1, 1].tolist() == [255, 255, 255]
    assert colour_at(load_rgb(tmp_path / "cmyk.jpg"), (2, 2)) == "red"
    assert (pixels(load_rgb(tmp_path / "bilevel.png")) == 255).all()


def test_unreadable_files_are_one_line_errors(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (5, 5, 5)).save(good, "PNG")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image")
    (tmp_path / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "folder.png").mkdir()
    os.symlink(tmp_path / "loop_b.png", tmp_path / "loop_a.png")
    os.symlink(tmp_path / "loop_a.png", tmp_path / "loop_b.png")
    for name in ("empty.png", "text.png", "truncated.png", "folder.png", "loop_a.png"):
        assert error_of(tmp_path / name).startswith(f"cannot read image {tmp_path / name}: ")
    assert error_of(tmp_path / "missing.png") == f"image not found: {tmp_path / 'missing.png'}"


def test_unicode_and_undecodable_file_names_load(tmp_path):
    for name in ("ünïcödé 猫.png", os.fsdecode(b"\xff\xfe.png")):
        Image.new("RGB", (3, 2), (7, 8, 9)).save(tmp_path / name)
        assert pixels(load_rgb(tmp_path / name))[0, 0].tolist() == [7, 8, 9]

"""Shared fixtures: tiny fake npm tarballs of the emoji packages, and ``npm pack`` replaced by them."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

# A transparent corner and a half-transparent red centre: the build must composite both on white.
TRANSPARENT = (0, 0, 0, 0)
HALF_RED = (255, 0, 0, 128)
SVG_SQUARE = (
    '<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">'
    '<rect x="18" y="18" width="36" height="36" fill="#0000ff"/></svg>'
)
DATASOURCE_README = (
    "* Android/Google/Noto images, are available under the [Apache License 2.0](https://x).\n"
    "* Twitter images are available under the [Creative Commons Attribution 4.0 license](https://x).\n"
)
OPENMOJI_LICENSE = "Attribution-ShareAlike 4.0 International\n\n(licence text)\n"

# Fillers give the split rule enough classes to fill train, val and test.
FILLERS = [f"1F6{i:02X}" for i in range(0x10, 0x20)]


def _png(mode: str = "RGBA") -> bytes:
    image = Image.new("RGBA", (64, 64), TRANSPARENT)
    for x in range(24, 40):
        for y in range(24, 40):
            image.putpixel((x, y), HALF_RED)
    if mode != "RGBA":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _entry(unified: str, short_name: str, google: bool = True, twitter: bool = True, variations=None) -> dict:
    return {
        "unified": unified,
        "image": f"{unified.lower()}.png",
        "short_name": short_name,
        "category": "Test",
        "has_img_google": google,
        "has_img_twitter": twitter,
        "skin_variations": variations,
    }


def _variation(unified: str, google: bool = True, twitter: bool = True) -> dict:
    return {"unified": unified, "image": f"{unified.lower()}.png", "has_img_google": google, "has_img_twitter": twitter}


def datasource_entries() -> list[dict]:
    waving = {
        "1F3FB": _variation("1F44B-1F3FB"),
        "1F3FF": _variation("1F44B-1F3FF", twitter=False),  # twitter lacks this one
    }
    entries = [
        _entry("1F600", "grinning"),
        _entry("1F44B", "wave", variations=waving),
        _entry("2764-FE0F", "heart"),  # OpenMoji spells it without FE0F
        _entry("1F636-200D-1F32B", "face_in_clouds"),  # OpenMoji spells it with FE0F
        _entry("1F99C", "parrot", twitter=False),  # google only, and no OpenMoji: dropped
    ]
    entries += [_entry(code, f"filler_{code}") for code in FILLERS]
    return entries


def openmoji_entries() -> list[dict]:
    def entry(hexcode: str, annotation: str, base: str = "") -> dict:
        return {"hexcode": hexcode, "annotation": annotation, "skintone_base_hexcode": base}

    return [
        entry("1F600", "grinning face"),
        entry("1F44B", "waving hand"),
        entry("1F44B-1F3FB", "waving hand: light skin tone", "1F44B"),
        entry("1F44B-1F3FD", "waving hand: medium skin tone", "1F44B"),  # only OpenMoji draws this variant
        entry("2764", "red heart"),
        entry("1F636-200D-1F32B-FE0F", "face in clouds"),
        entry("E000", "openmoji extra"),  # only OpenMoji: dropped
    ]


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(f"package/{name}")
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _write_tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            _add(archive, name, data)
    return path


def make_fake_tarballs(folder: Path, *, broken_svg: bool = False) -> dict[str, Path]:
    """Fake npm tarballs of the three emoji packages, keyed by package name."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = datasource_entries()
    tarballs = {}
    for vendor in ("google", "twitter"):
        files = {
            "package.json": json.dumps({"name": f"emoji-datasource-{vendor}", "license": "MIT"}).encode(),
            "README.md": DATASOURCE_README.encode(),
            "LICENSE": b"The MIT License (MIT)\n",
            "emoji.json": json.dumps(entries).encode(),
            f"img/{vendor}/64/sheet-ignored.txt": b"not an image",
        }
        for entry in entries:
            records = [entry, *(entry["skin_variations"] or {}).values()]
            for record in records:
                if record[f"has_img_{vendor}"]:
                    # Google's set has an LA image, as the real one does.
                    mode = "LA" if vendor == "google" and record["unified"] == "1F600" else "RGBA"
                    files[f"img/{vendor}/64/{record['image']}"] = _png(mode)
        files[f"img/{vendor}/32/1f600.png"] = _png()  # another size: must not be extracted
        name = f"emoji-datasource-{vendor}"
        tarballs[name] = _write_tarball(folder / f"{name}-16.0.0.tgz", files)

    files = {
        "package.json": json.dumps({"name": "openmoji", "license": "CC-BY-SA-4.0"}).encode(),
        "LICENSE.txt": OPENMOJI_LICENSE.encode(),
        "data/openmoji.json": json.dumps(openmoji_entries()).encode(),
        "black/svg/1F600.svg": SVG_SQUARE.encode(),  # the black set: must not be extracted
    }
    for entry in openmoji_entries():
        files[f"color/svg/{entry['hexcode']}.svg"] = SVG_SQUARE.encode()
    if broken_svg:
        files["color/svg/2764.svg"] = b"<svg this is not"
    tarballs["openmoji"] = _write_tarball(folder / "openmoji-17.0.0.tgz", files)
    return tarballs


class FakeNpm:
    """Stands in for ``fetch_package``: serves the fake tarballs and records what was asked."""

    def __init__(self, tarballs: dict[str, Path]):
        self.tarballs = tarballs
        self.calls: list[tuple[str, str]] = []

    def __call__(self, name: str, version: str, dest: Path) -> Path:
        self.calls.append((name, version))
        return Path(shutil.copy(self.tarballs[name], dest))


@pytest.fixture
def fake_tarballs(tmp_path_factory) -> dict[str, Path]:
    return make_fake_tarballs(tmp_path_factory.mktemp("npm"))


@pytest.fixture
def fake_npm(monkeypatch, fake_tarballs) -> FakeNpm:
    from dcml.data import emoji

    fake = FakeNpm(fake_tarballs)
    monkeypatch.setattr(emoji, "fetch_package", fake)
    return fake


@pytest.fixture
def emoji_fakes() -> SimpleNamespace:
    """The fake-package helpers, for tests that need a variant of the fake set."""
    return SimpleNamespace(make_tarballs=make_fake_tarballs, FakeNpm=FakeNpm, fillers=FILLERS)


@pytest.fixture
def one_intra_op_thread():
    """For tests of tiny tensors: a second intra-op thread only adds contention on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

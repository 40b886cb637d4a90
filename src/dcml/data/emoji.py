"""The emoji benchmark: the same emoji drawn by different vendors, built offline into the cache.

Sources
    Pinned npm packages, fetched once with ``npm pack`` (see :data:`PACKAGES`):
    ``emoji-datasource-google`` and ``emoji-datasource-twitter`` ship 64-px PNGs
    (``img/<vendor>/64/<image>``) and the ``emoji.json`` metadata; ``openmoji`` ships colour SVGs
    (``color/svg/<hexcode>.svg``) and ``data/openmoji.json``. Only those files (plus the licence
    evidence) are extracted. Every image is stored as a 64x64 RGB PNG, transparency composited on
    white, at ``images/<vendor>/<unified>.png``.

Classes
    One class per *base* emoji of ``emoji.json``; its skin-tone variants belong to the base's class.
    A class holds every vendor's rendering of the base and of each skin-tone variant that vendor
    provides. OpenMoji entries are matched to a class by codepoint sequence with the FE0F variation
    selectors removed (the sources disagree on where FE0F appears, e.g. ``2764-FE0F`` vs ``2764``);
    an OpenMoji skin-tone variant the datasource lacks joins its ``skintone_base_hexcode``'s class.
    The ``unified`` column spells a sequence as emoji-datasource does whenever it knows it.
    Only classes drawn by at least :data:`MIN_VENDORS_PER_CLASS` vendors are kept, so that every
    query can be retrieved across vendors; OpenMoji-only extras are thereby dropped.

Labels and splits
    A label is the index of the class's base sequence in the sorted list of kept base sequences.
    Classes are ordered by ``sha256(f"{SPLIT_SEED}:{unified}")`` (independent of numpy's RNG
    streams); the first :data:`TEST_CLASS_FRACTION` of that order is ``test``, and the first
    :data:`VAL_CLASS_FRACTION` of the remaining (train) classes is ``val``; the rest is ``train``.
    The three splits are class-disjoint. The test split is evaluated cross-vendor (a query never
    retrieves its own vendor's images), Recall@1/2/4/8.

On disk
    ``<cache>/emoji-v1/`` holds ``images/``, ``manifest.csv``
    (``path,label,vendor,split,unified,short_name``) and ``meta.json`` (package versions, licences,
    counts, the split rule and a content check). It is built in a temporary folder inside the cache
    and renamed into place, so a half-built benchmark is never visible; a cache that fails the
    content check is rebuilt.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split
from dcml.data.registry import register_dataset
from dcml.errors import DatasetError, MissingDependencyError, UserError

__all__ = [
    "BENCHMARK_VERSION",
    "PACKAGES",
    "VENDORS",
    "assign_splits",
    "build_emoji_benchmark",
    "cache_problem",
    "composite_on_white",
    "default_cache_dir",
    "fetch_package",
    "load_emoji",
    "normalise_sequence",
    "safe_extract",
]

BENCHMARK_VERSION = "emoji-v1"  # the folder name in the cache; bump it when the layout changes
FORMAT_VERSION = 1  # stored in meta.json; a cache with another value is rebuilt
VENDORS = ("google", "twitter", "openmoji")  # group ids are indices into this tuple
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 64
MIN_VENDORS_PER_CLASS = 2
SPLIT_SEED = 20240517
TEST_CLASS_FRACTION = 0.5
VAL_CLASS_FRACTION = 0.2  # of the classes left for training
EVALUATION = EvaluationSpec(protocol=Protocol.CROSS_GROUP, recall_ks=(1, 2, 4, 8), splits=("test",))
MANIFEST_COLUMNS = ("path", "label", "vendor", "split", "unified", "short_name")
VARIATION_SELECTOR = "FE0F"
NPM_TIMEOUT_SECONDS = 900  # the two datasource tarballs are ~70 MB each
STALE_BUILD_SECONDS = 6 * 3600  # temp build folders older than this were left by a killed build
PARALLEL_MIN_IMAGES = 500  # below this a process pool costs more than it saves
WORKERS = 2


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class _LicenceEvidence:
    artwork: str  # SPDX id of the artwork licence
    file: str  # the package file that states it
    pattern: str  # a regex that file must match for the statement to count as verified


PACKAGES = {
    "google": NpmPackage("emoji-datasource-google", "16.0.0"),
    "twitter": NpmPackage("emoji-datasource-twitter", "16.0.0"),
    "openmoji": NpmPackage("openmoji", "17.0.0"),
}
_LICENCES = {
    "google": _LicenceEvidence("Apache-2.0", "README.md", r"Google[^\n]*images[^\n]*Apache License 2\.0"),
    "twitter": _LicenceEvidence("CC-BY-4.0", "README.md", r"Twitter images[^\n]*Creative Commons Attribution 4\.0"),
    "openmoji": _LicenceEvidence("CC-BY-SA-4.0", "LICENSE.txt", r"Attribution-ShareAlike 4\.0 International"),
}
_EVIDENCE_FILES = frozenset({"package.json", "README.md", "LICENSE", "LICENSE.txt"})
_DATASOURCE_METADATA = "emoji.json"
_OPENMOJI_METADATA = "data/openmoji.json"
_OPENMOJI_SVG_DIR = "color/svg"


def default_cache_dir() -> Path:
    """``$DCML_CACHE_DIR``, else ``$XDG_CACHE_HOME/dcml``, else ``~/.cache/dcml``."""
    if os.environ.get("DCML_CACHE_DIR"):
        return Path(os.environ["DCML_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "dcml"
    return Path.home() / ".cache" / "dcml"


def normalise_sequence(sequence: str) -> str:
    """The matching key of a codepoint sequence: upper-case hex, dash-joined, without FE0F."""
    parts = re.split(r"[-_\s]+", sequence.strip().upper())
    return "-".join(part for part in parts if part and part != VARIATION_SELECTOR)


def _log(message: str) -> None:
    # stderr, so that `dcml data info emoji --json` keeps stdout parseable even when it builds
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fetching


def _npm_executable() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise MissingDependencyError(
            "npm is not installed; the emoji benchmark fetches its artwork with it once: "
            "install Node.js (e.g. `apt-get install npm`) and rerun"
        )
    return npm


def _npm_error_line(stdout: str, stderr: str) -> str:
    """The most telling line of a failed npm run (its last stderr line only names the log file)."""
    try:
        summary = json.loads(stdout)["error"]["summary"]
        if summary:
            return str(summary).splitlines()[0]
    except (ValueError, KeyError, TypeError, IndexError):
        pass
    lines = [re.sub(r"^npm (error|ERR!)\s*", "", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line and "complete log of this run" not in line]
    return lines[-1] if lines else "no error message"


def fetch_package(name: str, version: str, dest: Path) -> Path:
    """Download the npm tarball ``name@version`` into ``dest`` with ``npm pack``; return its path."""
    npm = _npm_executable()
    spec = f"{name}@{version}"
    command = [npm, "pack", spec, "--pack-destination", str(dest), "--json", "--loglevel=error", "--ignore-scripts"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=NPM_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"npm pack {spec} did not finish within {NPM_TIMEOUT_SECONDS} s; check your network") from None
    if result.returncode != 0:
        raise UserError(f"npm pack {spec} failed: {_npm_error_line(result.stdout, result.stderr)}")
    try:
        tarball = dest / json.loads(result.stdout)[0]["filename"]
    except (ValueError, KeyError, IndexError, TypeError):
        tarball = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tarball.is_file():
        raise UserError(f"npm pack {spec} reported success but wrote no tarball into {dest}")
    return tarball


def _package_path(member_name: str, tarball: Path) -> str | None:
    """A member's path inside the package (npm puts everything under one top folder), or None."""
    path = PurePosixPath(member_name)
    if path.is_absolute() or ".." in path.parts:
        raise DatasetError(f"{tarball.name}: refusing unsafe path {member_name!r} in the tarball")
    return "/".join(path.parts[1:]) or None


def safe_extract(tarball: Path, dest: Path, wanted: Callable[[str], bool]) -> int:
    """Extract the regular files of an npm tarball whose package path passes ``wanted``.

    Links and special files are skipped and absolute or ``..`` paths rejected, so nothing lands
    outside ``dest``. Returns the number of files written.
    """
    dest = dest.resolve()
    written = 0
    try:
        with tarfile.open(tarball, "r:*") as archive:
            for member in archive:
                relative = _package_path(member.name, tarball)
                if relative is None or not member.isfile() or not wanted(relative):
                    continue
                target = (dest / relative).resolve()
                if not target.is_relative_to(dest):
                    raise DatasetError(f"{tarball.name}: refusing unsafe path {member.name!r} in the tarball")
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                if source is None:
                    continue
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
                written += 1
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DatasetError(f"cannot read npm tarball {tarball.name}: {error}") from None
    return written


def _wanted_files(vendor: str) -> Callable[[str], bool]:
    if vendor == "openmoji":
        return lambda p: (
            p in _EVIDENCE_FILES
            or p == _OPENMOJI_METADATA
            or (p.startswith(f"{_OPENMOJI_SVG_DIR}/") and p.endswith(".svg"))
        )
    image_dir = _datasource_image_dir(vendor)
    return lambda p: (
        p in _EVIDENCE_FILES or p == _DATASOURCE_METADATA or (p.startswith(f"{image_dir}/") and p.endswith(".png"))
    )


def _datasource_image_dir(vendor: str) -> str:
    return f"img/{vendor}/{IMAGE_SIZE}"


# --------------------------------------------------------------------------- classes


@dataclass
class _EmojiClass:
    unified: str  # base sequence, spelled as its first source does (datasource when it knows it)
    short_name: str
    images: dict[str, dict[str, tuple[str, Path]]] = field(default_factory=dict)  # vendor -> unified -> (kind, src)

    def add(self, vendor: str, unified: str, kind: str, source: Path) -> None:
        # A source listing one sequence twice (with and without FE0F) must not yield two files.
        self.images.setdefault(vendor, {}).setdefault(unified, (kind, source))


@dataclass
class _Catalogue:
    classes: dict[str, _EmojiClass] = field(default_factory=dict)  # matching key -> class
    variant_base: dict[str, str] = field(default_factory=dict)  # variant key -> base key
    spelling: dict[str, str] = field(default_factory=dict)  # key -> datasource spelling
    missing_artwork: int = 0  # images the metadata promises but the package lacks


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{what}: {path.name} is missing from the package") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetError(f"{what}: cannot parse {path.name}: {error}") from None


def _add_datasource(catalogue: _Catalogue, vendor: str, package_dir: Path) -> None:
    entries = _read_json(package_dir / _DATASOURCE_METADATA, PACKAGES[vendor].spec)
    image_dir = package_dir / _datasource_image_dir(vendor)
    flag = f"has_img_{vendor}"
    for entry in entries:
        base_key = normalise_sequence(entry["unified"])
        catalogue.spelling.setdefault(base_key, entry["unified"])
        emoji_class = catalogue.classes.setdefault(base_key, _EmojiClass(entry["unified"], entry.get("short_name", "")))
        renderings = [(base_key, entry)]
        for variant in (entry.get("skin_variations") or {}).values():
            variant_key = normalise_sequence(variant["unified"])
            catalogue.variant_base.setdefault(variant_key, base_key)
            catalogue.spelling.setdefault(variant_key, variant["unified"])
            renderings.append((variant_key, variant))
        for key, record in renderings:
            if not record.get(flag):
                continue
            source = image_dir / record.get("image", f"{record['unified'].lower()}.png")
            if source.is_file():
                emoji_class.add(vendor, catalogue.spelling[key], "png", source)
            else:
                catalogue.missing_artwork += 1


def _add_openmoji(catalogue: _Catalogue, package_dir: Path) -> None:
    entries = _read_json(package_dir / _OPENMOJI_METADATA, PACKAGES["openmoji"].spec)
    svg_dir = package_dir / _OPENMOJI_SVG_DIR
    for entry in entries:
        hexcode = entry["hexcode"]
        source = svg_dir / f"{hexcode}.svg"
        if not source.is_file():
            catalogue.missing_artwork += 1
            continue
        key = normalise_sequence(hexcode)
        base_hexcode = entry.get("skintone_base_hexcode") or hexcode
        if key in catalogue.classes:
            base_key = key
        elif key in catalogue.variant_base:
            base_key = catalogue.variant_base[key]
        else:  # a variant the datasource lacks, or an emoji only OpenMoji draws
            base_key = normalise_sequence(base_hexcode)
        emoji_class = catalogue.classes.setdefault(base_key, _EmojiClass(base_hexcode, ""))
        if not emoji_class.short_name and key == base_key:
            emoji_class.short_name = entry.get("annotation", "").replace(" ", "_")
        emoji_class.add("openmoji", catalogue.spelling.get(key, hexcode), "svg", source)


def assign_splits(class_keys: Iterable[str]) -> dict[str, str]:
    """Map each class key to ``train`` / ``val`` / ``test`` by the seeded hash rule of the module doc."""
    order = sorted(set(class_keys), key=lambda k: (hashlib.sha256(f"{SPLIT_SEED}:{k}".encode()).hexdigest(), k))
    n_test = round(len(order) * TEST_CLASS_FRACTION)
    n_val = round((len(order) - n_test) * VAL_CLASS_FRACTION)
    assignment = {key: "test" for key in order[:n_test]}
    assignment.update({key: "val" for key in order[n_test : n_test + n_val]})
    assignment.update({key: "train" for key in order[n_test + n_val :]})
    return assignment


# --------------------------------------------------------------------------- images


def composite_on_white(image: Image.Image) -> Image.Image:
    """RGB version of ``image`` with any transparency composited on white."""
    rgba = image.convert("RGBA")  # handles RGBA, LA and palette images with a transparent index
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _render_svg(path: Path) -> Image.Image:
    try:
        import resvg_py
    except ImportError:
        resvg_py = None
    try:
        if resvg_py is not None:
            # OpenMoji's colour SVGs hold no text, so loading the system fonts would only cost time.
            png = resvg_py.svg_to_bytes(svg_path=str(path), width=IMAGE_SIZE, height=IMAGE_SIZE, skip_system_fonts=True)
        else:
            try:
                import cairosvg
            except ImportError:
                raise MissingDependencyError(
                    "rendering the OpenMoji SVGs needs resvg-py (pip install resvg-py) or cairosvg"
                ) from None
            png = cairosvg.svg2png(url=str(path), output_width=IMAGE_SIZE, output_height=IMAGE_SIZE)
        return Image.open(io.BytesIO(bytes(png)))
    except UserError:  # the missing renderer, not a damaged file (a UserError is a ValueError too)
        raise
    except (ValueError, OSError) as error:
        raise DatasetError(f"cannot render {path.name}: {error}") from None


def _write_image(job: tuple[str, str, str]) -> None:
    kind, source, target = job
    if kind == "svg":
        image = _render_svg(Path(source))
    else:
        try:
            image = Image.open(source)
            image.load()
        except OSError as error:
            raise DatasetError(f"cannot read {Path(source).name}: {error}") from None
    rgb = composite_on_white(image)
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    rgb.save(target, format="PNG")


def _write_images(jobs: Sequence[tuple[str, str, str]], progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="emoji: writing images", unit="img", disable=not progress, file=sys.stderr)
    with bar:
        if len(jobs) < PARALLEL_MIN_IMAGES or WORKERS <= 1:
            for job in jobs:
                _write_image(job)
                bar.update()
            return
        from concurrent.futures import ProcessPoolExecutor

        chunk = max(1, len(jobs) // (WORKERS * 16))
        with ProcessPoolExecutor(max_workers=WORKERS) as pool:
            for _ in pool.map(_write_image, jobs, chunksize=chunk):
                bar.update()


# --------------------------------------------------------------------------- building


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _licence_facts(vendor: str, package_dir: Path) -> dict:
    evidence = _LICENCES[vendor]
    statement = package_dir / evidence.file
    text = statement.read_text(encoding="utf-8", errors="replace") if statement.is_file() else ""
    verified = re.search(evidence.pattern, text) is not None
    if not verified:
        spec = PACKAGES[vendor].spec
        _log(f"warning: {spec}: could not confirm the {evidence.artwork} artwork licence in {evidence.file}")
    try:
        package_licence = json.loads((package_dir / "package.json").read_text(encoding="utf-8")).get("license")
    except (OSError, ValueError):
        package_licence = None
    return {
        "artwork": evidence.artwork,
        "stated_in": f"{PACKAGES[vendor].spec}/{evidence.file}",
        "verified": verified,
        "package_license": package_licence,
    }


def _manifest_rows(kept: list[_EmojiClass], split_of: dict[str, str], image_root: Path) -> tuple[list[dict], list]:
    rows, jobs = [], []
    for label, emoji_class in enumerate(kept):
        for vendor in VENDORS:
            for unified, (kind, source) in sorted(emoji_class.images.get(vendor, {}).items()):
                relative = f"images/{vendor}/{unified}.png"
                rows.append(
                    {
                        "path": relative,
                        "label": label,
                        "vendor": vendor,
                        "split": split_of[emoji_class.unified],
                        "unified": unified,
                        "short_name": emoji_class.short_name,
                    }
                )
                jobs.append((kind, str(source), str(image_root.parent / relative)))
    return rows, jobs


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _counts(rows: list[dict]) -> dict:
    def summary(selected: list[dict]) -> dict:
        return {"classes": len({r["label"] for r in selected}), "images": len(selected)}

    return {
        **summary(rows),
        "splits": {name: summary([r for r in rows if r["split"] == name]) for name in SPLITS},
        "vendors": {vendor: summary([r for r in rows if r["vendor"] == vendor]) for vendor in VENDORS},
    }


def _build(work: Path, staging: Path, progress: bool) -> None:
    """Fetch, extract and render everything into ``staging`` (a fresh folder inside ``work``)."""
    downloads, sources = work / "npm", work / "sources"
    downloads.mkdir()
    package_dirs, package_facts = {}, {}
    for vendor in VENDORS:
        package = PACKAGES[vendor]
        if progress:
            _log(f"emoji: fetching {package.spec} with npm")
        tarball = fetch_package(package.name, package.version, downloads)
        package_dirs[vendor] = sources / vendor
        package_dirs[vendor].mkdir(parents=True)
        safe_extract(tarball, package_dirs[vendor], _wanted_files(vendor))
        package_facts[vendor] = {"name": package.name, "version": package.version, "sha256": _sha256(tarball)}
        if tarball.parent == downloads:  # the big datasource tarballs are not needed once extracted
            tarball.unlink(missing_ok=True)

    catalogue = _Catalogue()
    for vendor in VENDORS:
        try:
            if vendor == "openmoji":
                _add_openmoji(catalogue, package_dirs[vendor])
            else:
                _add_datasource(catalogue, vendor, package_dirs[vendor])
        except (KeyError, TypeError, AttributeError) as error:
            raise DatasetError(f"{PACKAGES[vendor].spec}: unexpected metadata format ({error!r})") from None
    kept = sorted(
        (c for c in catalogue.classes.values() if len(c.images) >= MIN_VENDORS_PER_CLASS), key=lambda c: c.unified
    )
    if not kept:
        raise DatasetError(f"emoji: no emoji is drawn by {MIN_VENDORS_PER_CLASS} vendors; the packages look broken")
    split_of = assign_splits(c.unified for c in kept)

    image_root = staging / "images"
    for vendor in VENDORS:
        (image_root / vendor).mkdir(parents=True)
    rows, jobs = _manifest_rows(kept, split_of, image_root)
    _write_images(jobs, progress)
    _write_manifest(staging / "manifest.csv", rows)

    meta = {
        "benchmark": BENCHMARK_VERSION,
        "format_version": FORMAT_VERSION,
        "vendors": list(VENDORS),
        "packages": package_facts,
        "licenses": {vendor: _licence_facts(vendor, package_dirs[vendor]) for vendor in VENDORS},
        "image_size": IMAGE_SIZE,
        "split_rule": {
            "rule": "classes ordered by sha256(f'{seed}:{unified}'); the first test_class_fraction are test, "
            "then the first val_class_fraction of the rest are val, the remainder train",
            "seed": SPLIT_SEED,
            "test_class_fraction": TEST_CLASS_FRACTION,
            "val_class_fraction": VAL_CLASS_FRACTION,
            "min_vendors_per_class": MIN_VENDORS_PER_CLASS,
        },
        "counts": {
            **_counts(rows),
            "dropped_classes_too_few_vendors": len(catalogue.classes) - len(kept),
            "missing_artwork": catalogue.missing_artwork,
        },
        "content": {"files": len(rows), "manifest_sha256": _sha256(staging / "manifest.csv")},
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _expected_packages() -> dict:
    return {vendor: {"name": p.name, "version": p.version} for vendor, p in PACKAGES.items()}


def cache_problem(dataset_dir: Path) -> str | None:
    """Why the benchmark at ``dataset_dir`` cannot be used (a short phrase), or None if it can."""
    meta_path = dataset_dir / "meta.json"
    if not meta_path.is_file():
        return "meta.json is missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        expected_files, manifest_hash = meta["content"]["files"], meta["content"]["manifest_sha256"]
        packages = {v: {"name": p["name"], "version": p["version"]} for v, p in meta["packages"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "meta.json is unreadable"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format version {meta.get('format_version')} is not {FORMAT_VERSION}"
    if packages != _expected_packages():
        return "it was built from other package versions"
    manifest = dataset_dir / "manifest.csv"
    if not manifest.is_file():
        return "manifest.csv is missing"
    if _sha256(manifest) != manifest_hash:
        return "manifest.csv does not match meta.json"
    try:
        paths = [row["path"] for row in _read_manifest(dataset_dir)]
    except DatasetError as error:
        return str(error)
    if len(paths) != expected_files:
        return f"the manifest lists {len(paths)} images, meta.json {expected_files}"
    on_disk = sum(len(files) for _, _, files in os.walk(dataset_dir / "images"))
    if on_disk != len(paths):
        return f"{on_disk} image files on disk, {len(paths)} expected"
    missing = next((p for p in paths if not (dataset_dir / p).is_file()), None)
    if missing is not None:
        return f"{missing} is missing"
    return None


def _remove_stale_builds(cache: Path) -> None:
    now = time.time()
    for leftover in cache.glob(f".{BENCHMARK_VERSION}-build-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def build_emoji_benchmark(cache_dir: str | Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Build the benchmark into ``<cache_dir>/emoji-v1`` unless a valid copy is there; return that path."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / BENCHMARK_VERSION
    if not force:
        problem = cache_problem(target)
        if problem is None:
            return target
        if target.exists():
            _log(f"emoji: the benchmark at {target} is unusable ({problem}); rebuilding it")
        else:
            _log(f"emoji: building the benchmark into {target} (once; fetches ~140 MB with npm)")
    else:
        _log(f"emoji: rebuilding the benchmark at {target}")

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the cache directory {cache}: {error}") from None
    _remove_stale_builds(cache)
    work = Path(tempfile.mkdtemp(prefix=f".{BENCHMARK_VERSION}-build-", dir=cache))
    try:
        staging = work / "dataset"
        staging.mkdir()
        _build(work, staging, progress)
        if target.exists() or target.is_symlink():
            # Move the old copy aside into the work folder (same filesystem) so the finally removes it.
            os.replace(target, work / "previous")
        os.replace(staging, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- reading


def _read_manifest(dataset_dir: Path) -> list[dict]:
    path = dataset_dir / "manifest.csv"
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
                raise DatasetError(f"{path}: expected columns {','.join(MANIFEST_COLUMNS)}")
            return list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from None


def _cache_root(root: Path | None) -> Path | None:
    # Accept the benchmark folder itself as well as the cache folder that holds it.
    if root is not None and root.name == BENCHMARK_VERSION and (root / "meta.json").is_file():
        return root.parent
    return root


@register_dataset(
    "emoji",
    "the same emoji drawn by Google, Twitter and OpenMoji; built offline with npm (cross-vendor retrieval)",
    needs_root=False,
)
def load_emoji(root: Path | None = None) -> Dataset:
    """The emoji benchmark; ``root`` overrides the cache folder. Builds it on first use."""
    dataset_dir = build_emoji_benchmark(cache_dir=_cache_root(root))
    meta = json.loads((dataset_dir / "meta.json").read_text(encoding="utf-8"))
    rows = _read_manifest(dataset_dir)
    vendor_id = {vendor: index for index, vendor in enumerate(VENDORS)}
    splits = {}
    for name in SPLITS:
        selected = [row for row in rows if row["split"] == name]
        try:
            labels = np.array([int(row["label"]) for row in selected], dtype=np.int64)
            groups = np.array([vendor_id[row["vendor"]] for row in selected], dtype=np.int64)
        except (KeyError, ValueError) as error:
            raise DatasetError(f"{dataset_dir / 'manifest.csv'}: bad label or vendor ({error})") from None
        splits[name] = Split(name, tuple(dataset_dir / row["path"] for row in selected), labels, groups)
    return Dataset(
        name="emoji",
        root=dataset_dir,
        splits=splits,
        evaluation=EVALUATION,
        group_names=VENDORS,
        group_kind="vendors",
        extra_info={
            "licenses": {
                vendor: facts["artwork"] + ("" if facts.get("verified") else " (unverified)")
                for vendor, facts in meta.get("licenses", {}).items()
            },
            "package_versions": {p["name"]: p["version"] for p in meta.get("packages", {}).values()},
        },
    )

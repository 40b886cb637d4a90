"""`dcml data ...`: build the emoji benchmark, describe any dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcml.atomic_files import json_text


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build the emoji benchmark; describe datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True

    emoji = data_sub.add_parser(
        "emoji",
        help="fetch the emoji artwork with npm and build the offline benchmark (cached)",
        description="Fetch pinned emoji packages with `npm pack`, render them and write the benchmark "
        "into the cache (default: $DCML_CACHE_DIR or $XDG_CACHE_HOME/dcml). A second call reuses it.",
    )
    emoji.add_argument("--cache-dir", type=Path, default=None, help="cache directory (default: %(default)s -> XDG cache)")
    emoji.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    emoji.set_defaults(handler=_emoji)

    info = data_sub.add_parser(
        "info",
        help="count classes and images per split",
        description="Read a dataset from its distributed layout and report counts per split.",
    )
    info.add_argument("name", help="dataset name (see `dcml data list`)")
    info.add_argument("--root", type=Path, default=None, help="folder that holds the dataset (emoji: the cache dir)")
    info.add_argument("--cache-dir", type=Path, default=None, help="emoji only: cache directory")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=_info)

    listing = data_sub.add_parser("list", help="list the datasets dcml can read")
    listing.set_defaults(handler=_list)


def _emoji(args: argparse.Namespace) -> int:
    from dcml.data.emoji import build_emoji_benchmark

    path = build_emoji_benchmark(cache_dir=args.cache_dir, force=args.force)
    print(f"emoji benchmark ready at {path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from dcml.data import load_dataset

    root = args.cache_dir if args.cache_dir is not None else args.root
    dataset = load_dataset(args.name, root)  # count mismatches warn (printed as "warning: ...")
    info = _displayable(dataset.info())
    if args.json:
        # ensure_ascii: pure ASCII output is valid JSON whatever the output encoding (a stream that
        # escapes what it cannot encode would otherwise write \xNN, which JSON does not allow).
        print(json_text(info, indent=2))  # json_text keeps ensure_ascii on and writes null for NaN
        return 0
    print(f"{info['name']} at {info['root']}: {info['classes']} classes, {info['images']} images")
    for split_name, counts in info["splits"].items():
        print(f"  {split_name:<12} {counts['classes']:>7} classes {counts['images']:>9} images")
    for key, value in info.items():
        if key not in ("name", "root", "classes", "images", "splits"):
            print(f"  {key}: {value if not isinstance(value, list) else ', '.join(map(str, value))}")
    return 0


def _displayable(value):
    """``info`` ready for printing and for strict JSON: file and class names that are not valid
    UTF-8 (on Linux Python keeps their bytes as lone surrogates, which strict JSON parsers reject
    and a UTF-8 terminal cannot print) show those bytes as ``\\xNN``, as ``ls`` escapes them; numpy
    numbers become plain ones and anything else its text, so json.dumps cannot fail."""
    if isinstance(value, dict):
        return {_displayable(key): _displayable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_displayable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if hasattr(value, "item") and callable(value.item):  # a numpy scalar
        return _displayable(value.item())
    text = str(value)
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes the file system gave
    except UnicodeEncodeError:  # surrogates that do not stand for undecodable bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _list(args: argparse.Namespace) -> int:  # noqa: ARG001
    from dcml.data import available_datasets

    for name, reader in available_datasets().items():
        print(f"{name:<12} {reader.description}")
    return 0

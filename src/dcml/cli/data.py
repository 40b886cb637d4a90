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
    info.add_argument("--held-out", metavar="GROUP", default=None,
                      help="the unseen-vendor protocol's data: GROUP (emoji: google, twitter or openmoji) leaves the "
                      "train and val splits, as `dcml train --set data.held_out_group=GROUP` trains")
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
    if args.held_out is not None:
        dataset = dataset.holding_out(args.held_out)
    info = dataset.info()
    info["protocols"] = protocol_rows(dataset)
    info = _displayable(info)
    if args.json:
        # ensure_ascii: pure ASCII output is valid JSON whatever the output encoding (a stream that
        # escapes what it cannot encode would otherwise write \xNN, which JSON does not allow).
        print(json_text(info, indent=2))  # json_text keeps ensure_ascii on and writes null for NaN
        return 0
    print(f"{info['name']} at {info['root']}: {info['classes']} classes, {info['images']} images")
    for split_name, counts in info["splits"].items():
        print(f"  {split_name:<12} {counts['classes']:>7} classes {counts['images']:>9} images")
    for key, value in info.items():
        if key not in ("name", "root", "classes", "images", "splits", "protocols"):
            print(f"  {key}: {value if not isinstance(value, list) else ', '.join(map(str, value))}")
    print("  test protocols (rows of `dcml evaluate`):")
    for row, facts in info["protocols"].items():
        counts = f" ({facts['queries']} queries)" if "queries" in facts else ""
        print(f"    {row}{counts}: {facts['description']}" + (f"; {facts['how']}" if "how" in facts else ""))
    return 0


def protocol_rows(dataset) -> dict:
    """The test rows ``dcml evaluate`` reports for ``dataset``, what each measures and its query count;
    for a dataset with groups and none held out, also how to get the unseen row."""
    import numpy as np

    from dcml.evaluation.protocols import ROW_DESCRIPTIONS, UNSEEN_GROUP_ROW, unseen_group_queries
    from dcml.evaluation.runner import report_rows

    def described(row: str) -> str:
        return ROW_DESCRIPTIONS.get(row.rpartition("/")[2], row)

    rows = {row: {"description": described(row)} for row in report_rows(dataset, with_nmi=False)}
    spec = dataset.evaluation
    test = dataset.splits.get(spec.splits[0])
    if UNSEEN_GROUP_ROW in rows and test is not None:
        queries = unseen_group_queries(test.groups, spec.unseen_group)
        rows[UNSEEN_GROUP_ROW].update(held_out=dataset.group_names[spec.unseen_group], queries=int(queries.sum()),
                                      references=int((~queries).sum()))
    elif dataset.group_names is not None and test is not None and test.groups is not None:
        per_group = np.bincount(test.groups, minlength=len(dataset.group_names))
        rows[UNSEEN_GROUP_ROW] = {
            "description": described(UNSEEN_GROUP_ROW),
            "how": "train with --set data.held_out_group=NAME (" + ", ".join(
                f"{name}: {count} test queries" for name, count in zip(dataset.group_names, per_group.tolist())) + ")",
        }
    return rows


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

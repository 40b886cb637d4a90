"""The `dcml` command line. Each sub-module registers one command group."""

from __future__ import annotations

import argparse
import sys
import warnings

from dcml import __version__
from dcml.errors import UserError

# Modules that define `register(subparsers)`; order is the order in `dcml --help`.
_COMMAND_MODULES = ("data", "embed", "metrics", "zero_shot", "train", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcml",
        description="Divide-and-Conquer Metric Learning: datasets, embeddings and retrieval metrics.",
    )
    parser.add_argument("--version", action="version", version=f"dcml {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"dcml.cli.{name}").register(subparsers)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Warnings (a dataset holding fewer images than the official split, ...) are one line each.
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            result = args.handler(args)
        except UserError as error:
            print(f"dcml: error: {error}", file=sys.stderr)
            return error.exit_code
        except KeyboardInterrupt:
            print("dcml: interrupted", file=sys.stderr)
            return 130
    return int(result or 0)

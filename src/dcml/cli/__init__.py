"""The `dcml` command line. Each sub-module registers one command group."""

from __future__ import annotations

import argparse
import sys
import warnings

from dcml import __version__
from dcml.errors import UserError

# Modules that define `register(subparsers)`; order is the order in `dcml --help`.
_COMMAND_MODULES = ("data", "embed", "metrics", "zero_shot")


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


def _format_warning(message, category, filename, lineno, line=None):  # noqa: ARG001
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _format_warning
    try:
        result = args.handler(args)
    except UserError as error:
        print(f"dcml: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("dcml: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)

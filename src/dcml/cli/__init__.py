"""The `dcml` command line. Each sub-module registers one command group."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import warnings

from dcml import __version__
from dcml.errors import UserError

# Modules that define `register(subparsers)`; order is the order in `dcml --help`.
_COMMAND_MODULES = ("data", "embed", "metrics", "zero_shot", "train", "demo", "index", "query", "calibrate", "dedup", "serve", "export")


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


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the command's own clean-up runs (temporary files are removed)."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - the signal module's signature
    raise _Terminated


@contextlib.contextmanager
def _sigterm_like_ctrl_c():
    """Cluster schedulers stop jobs with SIGTERM: end with a word, not a silent exit 143.
    (Training installs its own handler, which first finishes the batch and saves.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # A name the output encoding cannot represent (a non-UTF-8 folder name on Linux reaches Python
    # as surrogate escapes; any non-ASCII name under an ASCII locale) is written as a backslash
    # escape instead of raising UnicodeEncodeError halfway through the output. Every command and
    # message (argparse's, warnings, errors, progress bars) goes through these two streams. The old
    # setting comes back on return, for callers of main() in-process (tests, notebooks).
    restore = []
    for stream in (sys.stdout, sys.stderr):
        if callable(getattr(stream, "reconfigure", None)) and getattr(stream, "errors", None) != "backslashreplace":
            restore.append((stream, stream.errors))
            stream.reconfigure(errors="backslashreplace")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        # Warnings (a dataset holding fewer images than the official split, ...) are one line each.
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            try:
                with _sigterm_like_ctrl_c():
                    result = args.handler(args)
            except UserError as error:
                print(f"dcml: error: {error}", file=sys.stderr)
                return error.exit_code
            except KeyboardInterrupt as interruption:
                terminated = isinstance(interruption, _Terminated)
                print(f"dcml: {'stopped by SIGTERM' if terminated else 'interrupted'}; nothing half-written was left behind",
                      file=sys.stderr)
                return 143 if terminated else 130
        return int(result or 0)
    finally:
        for stream, errors in restore:
            if not stream.closed:
                stream.reconfigure(errors=errors)

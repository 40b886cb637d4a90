"""Writing results so that a failure never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from dcml.errors import UserError


def write_atomically(writers: dict[Path, Callable[[BinaryIO], None]]) -> None:
    """Write every file through a temporary beside it, then rename them all into place.

    All temporaries are written (and fsynced) before any is renamed; on any failure or Ctrl-C
    they are removed, so no destination ever holds a partial file.
    """
    temporaries: list[tuple[str, Path]] = []
    try:
        for path, write in writers.items():
            path = Path(path).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            # Not tempfile.mkstemp: its files are private (0600); open(..., "xb") honours the umask.
            tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            stream = open(tmp, "xb")  # noqa: SIM115 - closed by the with below
            temporaries.append((tmp, path))
            with stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
        while temporaries:
            tmp, path = temporaries[0]
            os.replace(tmp, path)
            temporaries.pop(0)
    except OSError as error:
        raise UserError(f"cannot write {error.filename or 'output'}: {error.strerror or error}") from None
    finally:
        for tmp, _ in temporaries:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def save_npy_atomically(arrays: dict[Path, np.ndarray]) -> None:
    """``np.save`` each array to its path, all-or-nothing (see :func:`write_atomically`)."""
    write_atomically({path: (lambda stream, a=array: np.save(stream, a, allow_pickle=False)) for path, array in arrays.items()})


def _finite_or_none(value):
    """``value`` with every float NaN / infinity (numpy's too) replaced by None, recursively."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def json_text(payload, indent: int | None = None) -> str:
    """JSON that every parser reads: a metric with no value (NaN, e.g. no query had a positive) is
    ``null``, never Python's bare ``NaN`` / ``Infinity``, which are not JSON."""
    return json.dumps(_finite_or_none(payload), indent=indent, allow_nan=False)


def save_json_atomically(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, non-finite numbers as null (see :func:`json_text`, :func:`write_atomically`)."""
    text = json_text(payload, indent=2).encode()
    write_atomically({path: lambda stream: stream.write(text)})


def refuse_to_overwrite(paths, overwrite: bool = False, what: str = "output") -> None:
    """One-line UserError naming the first of ``paths`` that already exists, unless ``overwrite``.

    Every command that writes files calls this before doing any work, so nothing a user already
    has is replaced without ``--overwrite``.
    """
    if overwrite:
        return
    for path in paths:
        path = Path(path).expanduser()
        if path.exists() or path.is_symlink():
            raise UserError(f"{path} already exists (dcml would replace it with its {what}); choose another "
                            "output or pass --overwrite to replace it")

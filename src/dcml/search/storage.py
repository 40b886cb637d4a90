"""Index-folder files: .npy rows streamed in and out in chunks, JSON tables, folders swapped in whole.

Embeddings never need to fit in memory: rows are appended to an .npy file behind a reserved header
(filled in at the end), and read back chunk by chunk with plain file reads (no memory map, whose
touched pages would count against the process). Nothing here unpickles: ``.npy`` files are read only as
plain float32 with ``allow_pickle`` never involved, tables are JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dcml.errors import UserError

CHUNK_ROWS = 65536


#: Bytes reserved for the .npy header written before the rows: numpy's own 1.0 header, padded to 64-byte
#: alignment, is 128 bytes for every float32 N x D shape up to 20-digit sizes.
_HEADER_BYTES = 128


class NpyRowWriter:
    """Append float32 rows of width ``dimension``; :meth:`finish` names the ``.npy`` file.

    Rows go straight after a header reserved at the start of the file, and :meth:`finish` rewrites
    that header with the final row count and renames the file: the rows are written once, never
    copied, and never held in memory."""

    def __init__(self, folder: Path, dimension: int, name: str = "embeddings"):
        self.dimension = int(dimension)
        self.partial = folder / f".{name}.partial.npy"
        self._stream = open(self.partial, "xb")  # noqa: SIM115 - closed in finish()
        self._stream.write(_npy_header(0, self.dimension))
        self.count = 0

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dimension:
            raise UserError(f"embeddings of shape {rows.shape} do not have dimension {self.dimension}")
        self._stream.write(rows.data)
        self.count += len(rows)

    def finish(self, path: Path) -> None:
        if os.path.lexists(path):  # never replaces a file (builds write into fresh folders)
            raise FileExistsError(f"{path} exists")
        self._stream.seek(0)
        self._stream.write(_npy_header(self.count, self.dimension))
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self.partial, path)


def _npy_header(count: int, dimension: int) -> bytes:
    """numpy's 1.0 header of a C-order float32 ``count x dimension`` array, always ``_HEADER_BYTES`` long."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                  "fortran_order": False, "shape": (int(count), int(dimension))})
    header = buffer.getvalue()
    if len(header) != _HEADER_BYTES:  # only for shapes of more than 20 digits: a programming error, not the user's
        raise RuntimeError(f".npy header of {len(header)} bytes for shape ({count}, {dimension})")
    return header


def npy_shape(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, data offset) of a float32 C-order .npy file; one-line error for anything else."""
    try:
        with open(path, "rb") as stream:
            version = np.lib.format.read_magic(stream)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(stream)
            offset = stream.tell()
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {str(error).splitlines()[0] if str(error) else 'damaged'}") from None
    if dtype != np.float32 or fortran or len(shape) != 2:
        raise UserError(f"{path} is not a C-order float32 N x D array (got {dtype}, shape {shape})")
    if os.path.getsize(path) != offset + 4 * shape[0] * shape[1]:
        raise UserError(f"{path} is truncated or damaged (its size does not match its header)")
    return shape, offset


def iter_npy_rows(path: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """The rows of a float32 .npy file, ``chunk_rows`` at a time."""
    (count, dimension), offset = npy_shape(path)
    with open(path, "rb") as stream:
        stream.seek(offset)
        for start in range(0, count, chunk_rows):
            rows = min(chunk_rows, count - start)
            yield np.fromfile(stream, dtype=np.float32, count=rows * dimension).reshape(rows, dimension)


def read_npy_rows(path: Path, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of a float32 .npy file (any order), read one by one from disk."""
    (count, dimension), offset = npy_shape(path)
    out = np.empty((len(ids), dimension), np.float32)
    with open(path, "rb") as stream:
        for position, row in enumerate(np.asarray(ids, dtype=np.int64)):
            stream.seek(offset + 4 * dimension * int(row))
            out[position] = np.fromfile(stream, dtype=np.float32, count=dimension)
    return out


def sample_rows(path: Path, ids: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Rows ``ids`` (sorted, unique) gathered in one sequential pass."""
    ids = np.asarray(ids, dtype=np.int64)
    parts, start = [], 0
    for chunk in iter_npy_rows(path, chunk_rows):
        inside = ids[(ids >= start) & (ids < start + len(chunk))] - start
        if len(inside):
            parts.append(chunk[inside])
        start += len(chunk)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def file_digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 22):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def write_json(path: Path, payload, *, compact: bool = False) -> None:
    """JSON with ``null`` for NaN / infinity (``allow_nan=False`` guards the rule), fsynced.

    ``compact`` (large tables): no indentation, which keeps json on its C encoder; the indenting
    encoder builds one Python string per token (~200 MB for a million paths)."""
    text = json.dumps(_finite(payload), indent=None if compact else 1, separators=(",", ":") if compact else None,
                      allow_nan=False)
    with open(path, "x") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())


def _finite(value):
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {what} {path}: {str(error).splitlines()[0]} (damaged?)") from None


def temporary_folder_beside(final: Path) -> Path:
    """An empty folder next to ``final`` (same file system, so the final rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.building"
    folder.mkdir()
    return folder


def swap_in(temporary: Path, final: Path) -> None:
    """Rename ``temporary`` to ``final``; a previous ``final`` is moved aside first and removed after.

    Until the first rename ``final`` is untouched, so an interrupted build leaves the old index usable."""
    if final.exists():
        aside = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.replaced"
        os.rename(final, aside)
        os.rename(temporary, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(temporary, final)

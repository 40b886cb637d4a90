"""Checkpoints: everything needed to continue a run exactly, written atomically, read without running code.

``last.pt`` (written after every epoch, and at a batch boundary when a run is interrupted) holds the
model, optimiser, loss parameters (betas), the current clustering, the epoch (and, mid-epoch, the
batch), the best validation score so far and every RNG state; ``best.pt`` holds the weights of the
epoch model selection picked. Both go through a temporary file and a rename, so a kill while saving
leaves the previous checkpoint intact.

Format 2 (this one) holds only what ``torch.load(weights_only=True)`` reads: tensors, numbers,
strings, ``None``, lists, tuples and dicts. RNG states and cluster arrays are tensors or lists, the
configuration is a plain dict. Every file is read back with ``weights_only=True`` before it is
written, so dcml never writes a checkpoint it would refuse to read, and loading one can never run
code. Format 1 (dcml before this change) pickled numpy objects: :func:`upgrade_checkpoint`
converts such a file through the same restricted loader, with only numpy's array-rebuilding
functions allowed in addition (``dcml upgrade-checkpoint FILE``).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcml.errors import UserError
from dcml.atomic_files import write_atomically

LAST = "last.pt"
BEST = "best.pt"
FORMAT_VERSION = 2
#: Keys every checkpoint holds; ``last.pt`` files hold :data:`RESUME_KEYS` too.
REQUIRED_KEYS = ("format_version", "config", "model")
RESUME_KEYS = ("next_epoch", "optimizer", "loss", "clustering", "active_learners", "best", "history", "timings", "rng")


# ---------------------------------------------------------------------------- RNG states as plain data
def rng_state() -> dict:
    """Every RNG state of this process as tensors, numbers and lists (no numpy or Python objects)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "state": list(python_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(value: Any) -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as Python numbers (what weights_only reads)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        converted = [plain(item) for item in value]
        return converted if isinstance(value, list) else tuple(converted)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------- writing
def serialize(payload: dict) -> bytes:
    """The bytes of a format-2 checkpoint; refuses (TypeError) anything weights_only could not read back."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **plain(payload)}, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # a programming error: something not plain slipped in
        raise TypeError(f"checkpoint payload holds an object weights_only cannot read: {str(error).splitlines()[0]}") from None
    return data


def save_checkpoint(path: Path, payload: dict) -> None:
    data = serialize(payload)
    write_atomically({Path(path): lambda stream: stream.write(data)})


# ---------------------------------------------------------------------------- reading
def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read(path: Path, allowed_globals: list | None = None) -> Any:
    # torch.save writes zip archives; anything else would reach torch's legacy pickle reader.
    if not zipfile.is_zipfile(path):
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint file (damaged, truncated or another format)")
    try:
        if allowed_globals:
            with torch.serialization.safe_globals(allowed_globals):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" not in str(error).lower():  # a damaged pickle stream, not a forbidden object
            raise UserError(f"cannot read checkpoint {path}: {_first_line(error)} (damaged, truncated or not a checkpoint)") from None
        raise UserError(f"{path} holds Python objects that dcml does not load (loading them could run code): not a dcml "
                        f"checkpoint, or one from dcml 0.1 (convert that once with: dcml upgrade-checkpoint {path})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, MemoryError, OverflowError) as error:
        raise UserError(f"cannot read checkpoint {path}: {_first_line(error)} (damaged, truncated or not a checkpoint)") from None


def _check_structure(path: Path, checkpoint: Any, resumable: bool) -> None:
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise UserError(f"{path} is not a dcml checkpoint")
    version = checkpoint["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{path} is not a dcml checkpoint (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer dcml (checkpoint format {version}; this dcml reads {FORMAT_VERSION}): "
                        "upgrade dcml to read it")
    if version < FORMAT_VERSION:
        raise UserError(f"{path} uses checkpoint format {version} (dcml 0.1, pickled numpy objects), which dcml no longer "
                        f"loads; convert it once with: dcml upgrade-checkpoint {path}")
    keys = REQUIRED_KEYS + (RESUME_KEYS if resumable else ())
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        what = "a resumable last.pt" if resumable else "a dcml checkpoint"
        raise UserError(f"{path} is not {what}: it has no {', '.join(missing)}")
    if not isinstance(checkpoint["config"], dict):
        raise UserError(f"{path} is damaged: its config is not a mapping")
    model = checkpoint["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise UserError(f"{path} is damaged: its model is not a state dict of tensors")


def load_checkpoint(path: Path, *, resumable: bool = False) -> dict:
    """Read a dcml checkpoint with ``torch.load(weights_only=True)``; one-line UserError when it is
    missing, damaged, of another format version or not one. ``resumable``: it must be a ``last.pt``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    checkpoint = _read(path)
    _check_structure(path, checkpoint, resumable)
    checkpoint["path"] = str(path)
    return checkpoint


# ---------------------------------------------------------------------------- format 1 -> 2
def _numpy_rebuilders() -> list:
    """The only globals besides torch's own that a format-1 file may use: numpy rebuilding arrays and scalars."""
    from numpy._core import multiarray

    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *[type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"]]


def _no_object_arrays(value: Any) -> None:
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise UserError("the old checkpoint holds an object array; dcml never wrote one, so it will not convert it")
    if isinstance(value, dict):
        for item in value.values():
            _no_object_arrays(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _no_object_arrays(item)


def _upgrade_rng(state: dict) -> dict:
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    version, python_state, gauss_next = state["python"]
    upgraded = {
        "torch": state["torch"],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "state": list(python_state), "gauss_next": gauss_next},
    }
    if "cuda" in state:
        upgraded["cuda"] = state["cuda"]
    return upgraded


def upgrade_checkpoint(source: Path, destination: Path, overwrite: bool = False) -> dict:
    """Convert a format-1 checkpoint to format 2. Reading it allows numpy's array rebuilders and nothing else."""
    source, destination = Path(source).expanduser(), Path(destination).expanduser()
    if not source.is_file():
        raise UserError(f"checkpoint {source} not found")
    if destination.exists() and not overwrite and destination.resolve() != source.resolve():
        raise UserError(f"{destination} already exists; choose another --out or pass --overwrite")
    old = _read(source, _numpy_rebuilders())
    if isinstance(old, dict) and old.get("format_version") == FORMAT_VERSION:
        raise UserError(f"{source} is already in checkpoint format {FORMAT_VERSION}")
    if not isinstance(old, dict) or old.get("format_version") != 1 or "config" not in old or "model" not in old:
        raise UserError(f"{source} is not a format-1 dcml checkpoint")
    _no_object_arrays(old)
    old = dict(old)
    old.pop("format_version")
    old.pop("path", None)
    if isinstance(old.get("rng"), dict):
        old["rng"] = _upgrade_rng(old["rng"])
    if isinstance(old.get("rng_per_rank"), list):
        old["rng_per_rank"] = [_upgrade_rng(state) for state in old["rng_per_rank"]]
    save_checkpoint(destination, old)
    return load_checkpoint(destination)


def upgrade_in_place(path: Path) -> Path:
    """Convert format-1 ``path`` to format 2 under the same name; the original is renamed to
    ``<stem>.v1<suffix>`` (refused if that exists), so nothing is lost. Returns the kept original."""
    path = Path(path).expanduser()
    kept = path.with_name(f"{path.stem}.v1{path.suffix}")
    if kept.exists():
        raise UserError(f"{kept} already exists (an earlier conversion?); move it away first")
    converted = path.with_name(f".{path.name}.upgrading")
    try:
        upgrade_checkpoint(path, converted, overwrite=True)
        os.replace(path, kept)
        os.replace(converted, path)
    finally:
        if converted.exists():
            converted.unlink()
    return kept


# ---------------------------------------------------------------------------- leftovers of killed saves
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries (see :func:`dcml.atomic_files.write_atomically`) that a process killed mid-save
    left in ``folder``; a temporary of a process still running is left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if not match or not entry.is_file():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_alive(pid):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

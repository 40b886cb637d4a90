"""A registry of dataset readers: `load_dataset("cub200", root)` instead of if-chains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dcml.data.records import Dataset
from dcml.errors import DatasetError, UserError


@dataclass(frozen=True)
class DatasetReader:
    name: str
    load: Callable[..., Dataset]
    description: str
    needs_root: bool = True  # False for datasets dcml builds itself (emoji)


_READERS: dict[str, DatasetReader] = {}


def register_dataset(name: str, description: str, *, needs_root: bool = True):
    """Decorator: register ``fn(root: Path | None) -> Dataset`` under ``name``."""

    def decorate(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _READERS:
            raise ValueError(f"dataset {name!r} registered twice")
        _READERS[name] = DatasetReader(name=name, load=fn, description=description, needs_root=needs_root)
        return fn

    return decorate


def _ensure_builtin_readers() -> None:
    # Importing the modules runs their @register_dataset decorators.
    import dcml.data.paper_datasets  # noqa: F401
    import dcml.data.emoji  # noqa: F401
    import dcml.data.folder  # noqa: F401


def available_datasets() -> dict[str, DatasetReader]:
    _ensure_builtin_readers()
    return dict(sorted(_READERS.items()))


def load_dataset(name: str, root: str | Path | None = None, **options) -> Dataset:
    """Load a registered dataset. ``root`` is where it lies on disk (optional for emoji)."""
    readers = available_datasets()
    if name not in readers:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(readers)}")
    reader = readers[name]
    if root is None and reader.needs_root:
        raise UserError(f"dataset {name!r} needs --root DIR (the folder that holds it)")
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"{name}: root {root} is not a directory")
    return reader.load(root, **options)

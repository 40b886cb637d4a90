"""The index a server answers from: read without locks, replaced whole.

A request takes the current :class:`Snapshot` once and uses it to the end, so an append or a
reload that swaps in a new snapshot never changes an answer half-way, and the old index stays in
memory until its last request is done. Writers (append, reload) take one lock, so two of them
never build from the same starting index.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcml.search.index import Index, Items, add_to_index


@dataclass(frozen=True)
class Snapshot:
    """An index and its calibration, read together at load time (the folder may change on disk later)."""

    index: Index
    calibration: dict | None

    @classmethod
    def of(cls, index: Index) -> Snapshot:
        return cls(index, index.calibration())


class ServedIndex:
    """The current snapshot of the index folder at ``folder``, embedded by ``model``."""

    def __init__(self, index: Index, model):
        self.folder = Path(index.folder)
        self.model = model
        index.use_model(model)
        self._snapshot = Snapshot.of(index)
        self._writing = threading.Lock()

    def current(self) -> Snapshot:
        return self._snapshot  # one attribute read: atomic, never a half-swapped state

    def append(self, embeddings: np.ndarray, items: Items) -> tuple[Snapshot, range]:
        """Append rows and persist them (built beside the folder, renamed in); the new snapshot and the new ids."""
        with self._writing:
            before = self._snapshot.index
            grown = add_to_index(before, embeddings, items)
            grown.use_model(self.model)
            self._snapshot = Snapshot.of(grown)
            return self._snapshot, range(len(before), len(grown))

    def reload(self) -> Snapshot:
        """Swap in the folder as it is on disk now (rebuilt or extended by another command)."""
        with self._writing:
            self._snapshot = Snapshot.of(Index.load(self.folder, model=self.model))
            return self._snapshot

"""An index folder: a faiss index, the items table, the embeddings and a manifest, built and replaced whole.

Layout of ``INDEX/``::

    manifest.json     dcml version, model checkpoint sha256, dimension, distance, kind + parameters,
                      item count, times, measured recall, size and sha256 of every file below
    index.faiss       the faiss index (faiss' own binary format: plain arrays, no Python objects)
    items.json        row id -> path, label, group (JSON, columns; null where unknown)
    embeddings.npy    the L2-normalised float32 embeddings, row id order (rebuild another kind from them)
    calibration.json  optional: distance thresholds from ``dcml calibrate``

A build (and ``add``) writes a new folder beside the destination and renames it into place, so an
interrupted build leaves the previous index usable. Loading checks the manifest first (format,
sizes, checksums), then reads the faiss file; nothing is ever unpickled.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dcml.errors import UserError
from dcml.search import kinds as index_kinds
from dcml.search.exact import exact_search
from dcml.search.storage import (
    NpyRowWriter,
    file_digest,
    iter_npy_rows,
    npy_shape,
    read_npy_rows,
    read_json,
    sample_rows,
    swap_in,
    temporary_folder_beside,
    write_json,
)

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.json"
EMBEDDINGS_FILE = "embeddings.npy"
CALIBRATION_FILE = "calibration.json"
FORMAT = "dcml-index"
FORMAT_VERSION = 1
#: Reported distances: Euclidean between L2-normalised embeddings (0 = identical, 2 = opposite);
#: the same order as evaluation's squared Euclidean distance.
DISTANCE = "euclidean"
_CHECKED_FILES = (INDEX_FILE, ITEMS_FILE, EMBEDDINGS_FILE)
#: Rows per chunk read while faiss' index fills: two chunks are alive at a time (the one being added,
#: the next one read), 16 MB at 128-d, so the fill adds about 3% to a million-vector index.
FILL_ROWS = 16384
#: Rows per chunk of the exact search that measures an approximate index's recall (4 MB at 128-d).
RECALL_ROWS = 8192


@dataclass
class Items:
    """Row id -> path (and label / group where known, else None)."""

    paths: list[str]
    labels: list[int | None] = field(default_factory=list)
    groups: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.labels = list(self.labels) or [None] * len(self.paths)
        self.groups = list(self.groups) or [None] * len(self.paths)
        if not len(self.paths) == len(self.labels) == len(self.groups):
            raise UserError(f"items table: {len(self.paths)} paths, {len(self.labels)} labels, {len(self.groups)} groups")
        self.labels = [None if v is None else int(v) for v in self.labels]
        self.groups = [None if v is None else int(v) for v in self.groups]

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, keep: np.ndarray) -> Items:
        rows = np.flatnonzero(keep)
        return Items([self.paths[i] for i in rows], [self.labels[i] for i in rows], [self.groups[i] for i in rows])

    def extended(self, other: Items) -> Items:
        return Items(self.paths + other.paths, self.labels + other.labels, self.groups + other.groups)

    def to_json(self) -> dict:
        return {"paths": self.paths, "labels": self.labels, "groups": self.groups}

    @classmethod
    def from_json(cls, payload, source: Path) -> Items:
        if not isinstance(payload, dict) or not isinstance(payload.get("paths"), list):
            raise UserError(f"{source} is not a dcml items table")
        try:
            return cls(payload["paths"], payload.get("labels") or [], payload.get("groups") or [])
        except UserError:  # the table's own, more precise complaint (a UserError is a ValueError too)
            raise
        except (TypeError, ValueError):
            raise UserError(f"{source} is damaged: labels and groups must be integers or null") from None

    @property
    def has_labels(self) -> bool:
        return any(label is not None for label in self.labels)


@dataclass(frozen=True)
class SearchResult:
    """Per query (rows): the ``k`` nearest item ids and their Euclidean distances, nearest first."""

    ids: np.ndarray
    distances: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def model_description(model) -> dict:
    """What an index records about the model that embedded it (``model``: a TrainedModel)."""
    return {"checkpoint": str(Path(model.checkpoint).resolve()), "sha256": model.sha256, "backbone": model.config.model.backbone,
            "image_size": model.image_size, "active_learners": model.active_learners}


# ---------------------------------------------------------------------------- building
class IndexBuilder:
    """Collects embeddings in a temporary folder beside ``out``; :meth:`finish` builds and renames it in.

    Use as a context manager: leaving it without ``finish`` (an error, Ctrl-C) removes the
    temporary folder and leaves ``out`` as it was."""

    def __init__(self, out: str | Path, dimension: int, *, overwrite: bool = False):
        self.out = Path(out).expanduser()
        refuse_replacing(self.out, overwrite)
        self.folder = temporary_folder_beside(self.out)
        self.writer = NpyRowWriter(self.folder, dimension)
        self.dimension = int(dimension)
        self.max_norm = 0.0
        self.finished = False

    def __enter__(self) -> IndexBuilder:
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        if len(rows):
            if not np.isfinite(rows).all():
                raise UserError("embeddings hold NaN or infinite values; they cannot be indexed")
            self.max_norm = max(self.max_norm, float(np.linalg.norm(rows, axis=1).max()))
        self.writer.append(rows)

    def finish(self, items: Items, model: dict, kind: str = "flat", params: dict | None = None, *, seed: int = 0,
               created: str | None = None, progress=None) -> Index:
        count = self.writer.count
        if count != len(items):
            raise UserError(f"{count} embeddings for {len(items)} items")
        if count == 0:
            raise UserError("nothing to index: no readable images")
        params = index_kinds.check_parameters(kind, dict(params or {}), count, self.dimension)
        embeddings = self.folder / EMBEDDINGS_FILE
        self.writer.finish(embeddings)
        # The items' JSON text (~60 bytes a path) exists only while faiss' index does not yet.
        write_json(self.folder / ITEMS_FILE, items.to_json(), compact=True)
        started = time.perf_counter()
        index = _fill_faiss_index(embeddings, kind, params, self.dimension, count, seed)
        recall = _measured_recall(index, embeddings, kind, count, seed)
        build_seconds = time.perf_counter() - started

        import faiss

        faiss.write_index(index, str(self.folder / INDEX_FILE))
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        from dcml import __version__

        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dcml_version": __version__,
            "model": model, "dimension": self.dimension, "distance": DISTANCE, "normalized": True,
            "kind": kind, "parameters": params, "items": count, "max_norm": self.max_norm,
            "created": created or now, "updated": now, "build_seconds": build_seconds,
            "recall_at_10": recall["recall"], "recall_queries": recall["queries"], "recall_k": recall["k"],
            "files": {name: file_digest(self.folder / name) for name in _CHECKED_FILES},
        }
        write_json(self.folder / MANIFEST_FILE, manifest)
        self.finished = True
        swap_in(self.folder, self.out)
        del index  # freed before the written index is read back: never two copies in memory
        return Index.load(self.out, items=items)


def refuse_replacing(out: Path, overwrite: bool) -> None:
    """Only an existing index (or an empty folder) may be replaced, and only with ``overwrite``."""
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    if out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST_FILE).is_file()):
        return
    raise UserError(f"{out} exists and is not a dcml index; dcml will not replace it, even with --overwrite")


def _fill_faiss_index(embeddings: Path, kind: str, params: dict, dimension: int, count: int, seed: int):
    index = index_kinds.new_index(kind, params, dimension)
    if index_kinds.needs_training(kind):
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(count, index_kinds.training_size(params, count), replace=False))
        index.train(sample_rows(embeddings, sample))  # a sample, never the whole collection
    if kind == "flat":
        _fill_flat(index, embeddings, count, dimension)
    elif kind == "hnsw":
        _fill_hnsw(index, embeddings, count, dimension, params["m"])
    else:
        _fill_ivf(index, embeddings)
    index_kinds.apply_search_parameters(index, kind, params)
    return index


# Chunk by chunk, faiss grows its std::vectors by doubling, so a build briefly holds up to twice
# what the finished index needs (measured at 1M x 128 before these fills: flat 1.77x, IVF 2.05x,
# HNSW 3.04x the raw vectors). Each fill below sizes faiss' storage once, before the rows arrive; a single ``add`` of
# everything would instead need all the rows in memory beside faiss' own copy.
def _fill_flat(index, embeddings: Path, count: int, dimension: int) -> None:
    """Copy the rows straight into a flat index's storage, sized once."""
    import faiss

    index.codes.resize(count * dimension * 4)
    storage = faiss.rev_swig_ptr(index.codes.data(), count * dimension * 4).view(np.float32).reshape(count, dimension)
    start = 0
    for chunk in iter_npy_rows(embeddings, FILL_ROWS):
        storage[start : start + len(chunk)] = chunk
        start += len(chunk)
    index.ntotal = count


def _reserve(vector, size: int) -> None:
    """Allocate room for ``size`` elements in a faiss (std::)vector, contents unchanged.

    Growing a vector and shrinking it back keeps its allocation (resize never gives capacity back),
    and appending within that capacity never reallocates."""
    kept = vector.size()
    if size > kept:
        vector.resize(size)
        vector.resize(kept)


def _fill_hnsw(index, embeddings: Path, count: int, dimension: int, m: int) -> None:
    """Add the rows chunk by chunk to an HNSW index whose vectors and graph were allocated once.

    The vectors take exactly ``count x dimension`` floats. A node has 2m links on level 0 and m more
    per upper level; faiss draws levels with P(level >= l) = m^-l, so m / (m - 1) upper links a node
    on average. Twice that average is reserved: the sum over many nodes never comes near it, and a
    few extra bytes a vector beat a reallocation that doubles the graph."""
    import faiss

    hnsw = index.hnsw
    _reserve(faiss.downcast_index(index.storage).codes, count * dimension * 4)
    _reserve(hnsw.neighbors, int(count * (2 * m + 2 * m / max(m - 1, 1))) + 64 * m)
    _reserve(hnsw.offsets, count + 1)
    _reserve(hnsw.levels, count)
    for chunk in iter_npy_rows(embeddings, FILL_ROWS):
        index.add(chunk)


def _fill_ivf(index, embeddings: Path) -> None:
    """Add the rows to an IVF index whose inverted lists were each sized once.

    A first pass assigns every row to its list (8 bytes a row, kept), each list reserves its final
    size, and the second pass adds the rows with those assignments: nothing is quantized twice."""
    import faiss

    chunks = iter_npy_rows(embeddings, FILL_ROWS)
    assignments = np.concatenate([index.quantizer.assign(chunk, 1).reshape(-1) for chunk in chunks])
    sizes = np.bincount(assignments, minlength=index.nlist)
    lists = faiss.downcast_InvertedLists(index.invlists)
    for list_no in np.flatnonzero(sizes):
        # The list's ids and codes grown to their final size and back: the allocation stays (see _reserve).
        lists.resize(int(list_no), int(sizes[list_no]))
        lists.resize(int(list_no), 0)
    start = 0
    for chunk in iter_npy_rows(embeddings, FILL_ROWS):
        ids = np.ascontiguousarray(assignments[start : start + len(chunk)])
        index.add_core(len(chunk), faiss.swig_ptr(chunk), None, faiss.swig_ptr(ids))
        start += len(chunk)


def _measured_recall(index, embeddings: Path, kind: str, count: int, seed: int) -> dict:
    """Recall@10 of an approximate kind against exact search, on a sample of the items as queries."""
    k = min(index_kinds.RECALL_K, count)
    if kind == "flat":
        return {"recall": 1.0, "queries": 0, "k": k}
    rng = np.random.default_rng(seed + 1)
    ids = np.sort(rng.choice(count, min(count, index_kinds.RECALL_SAMPLE), replace=False))
    # Beside the finished index: the sampled rows read one by one, the database in small chunks.
    queries = read_npy_rows(embeddings, ids)
    truth = index_kinds.exact_neighbours(queries, iter_npy_rows(embeddings, RECALL_ROWS), k)
    _, found = index.search(queries, k)
    return {"recall": index_kinds.recall_at_k(found, truth), "queries": len(ids), "k": k}


def build_index(out: str | Path, embeddings: np.ndarray, items: Items, model: dict, kind: str = "flat",
                params: dict | None = None, *, overwrite: bool = False, seed: int = 0) -> Index:
    """Build an index folder from embeddings already in memory (rows L2-normalised here)."""
    from dcml.model_runner import l2_normalize

    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise UserError(f"embeddings must be N x D, got shape {embeddings.shape}")
    with IndexBuilder(out, embeddings.shape[1], overwrite=overwrite) as builder:
        for start in range(0, len(embeddings), 65536):
            builder.append(l2_normalize(embeddings[start : start + 65536]))
        return builder.finish(items, model, kind, params, seed=seed)


# ---------------------------------------------------------------------------- loading and searching
def read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise UserError(f"index {folder} not found" if not folder.exists() else f"{folder} is not an index folder")
    manifest = read_json(folder / MANIFEST_FILE, "index manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{folder / MANIFEST_FILE} is not a dcml index manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"index {folder} has format version {manifest.get('format_version')!r}; this dcml reads {FORMAT_VERSION}")
    required = ("model", "dimension", "kind", "parameters", "items", "files")
    missing = [key for key in required if key not in manifest]
    if missing or not isinstance(manifest["files"], dict) or not isinstance(manifest["model"], dict):
        raise UserError(f"{folder / MANIFEST_FILE} is damaged: missing {', '.join(missing) or 'file records'}")
    return manifest


def verify_files(folder: Path, manifest: dict, names=_CHECKED_FILES) -> None:
    """Each file exists with the size and sha256 the manifest recorded (a damaged file is one line)."""
    for name in names:
        path = folder / name
        expected = manifest["files"].get(name)
        if not path.is_file():
            raise UserError(f"index {folder} is incomplete: {name} is missing (rebuild it with dcml index build)")
        if not isinstance(expected, dict) or file_digest(path) != {"bytes": expected.get("bytes"), "sha256": expected.get("sha256")}:
            raise UserError(f"index {folder}: {name} does not match its manifest (damaged or modified); rebuild the index")


class Index:
    """A loaded index folder. ``Index.load(path).search(vectors_or_images, k)``."""

    def __init__(self, folder: Path, manifest: dict, faiss_index, items: Items, model=None):
        self.folder = folder
        self.manifest = manifest
        self.faiss_index = faiss_index
        self.items = items
        self._model = model

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: str | Path, model=None, *, items: Items | None = None) -> Index:
        """Read and check an index folder; ``model`` (a TrainedModel) must be the one that built it.

        ``items``: the items table just written there (a build's own), taken as it is rather than
        parsed into a second copy (a million paths are ~0.2x the raw vectors of a 128-d index)."""
        import faiss

        folder = Path(folder).expanduser()
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))  # checked against the manifest's sha256 above
        except RuntimeError as error:
            raise UserError(f"cannot read {folder / INDEX_FILE}: {str(error).strip().splitlines()[-1]}") from None
        if items is None:
            items = Items.from_json(read_json(folder / ITEMS_FILE, "items table"), folder / ITEMS_FILE)
        if index.ntotal != manifest["items"] or len(items) != manifest["items"] or index.d != manifest["dimension"]:
            raise UserError(f"index {folder} is inconsistent: {index.ntotal} vectors of dimension {index.d}, "
                            f"{len(items)} items, manifest says {manifest['items']} of {manifest['dimension']}")
        index_kinds.apply_search_parameters(index, manifest["kind"], manifest["parameters"])
        loaded = cls(folder, manifest, index, items)
        if model is not None:
            loaded.use_model(model)
        return loaded

    def __len__(self) -> int:
        return int(self.manifest["items"])

    def drop_faiss_index(self) -> None:
        """Free the faiss index; what is left describes the folder (manifest, items, embeddings file).

        For adding and rebuilding, which read the stored embeddings: the new index is then the only
        one in memory. Searching afterwards is an error."""
        self.faiss_index = None

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def embeddings_path(self) -> Path:
        return self.folder / EMBEDDINGS_FILE

    def embeddings(self) -> np.ndarray:
        return np.concatenate(list(iter_npy_rows(self.embeddings_path)))

    # ------------------------------------------------------------------ the model
    def use_model(self, model) -> None:
        """Search images with ``model``; refused unless it is the checkpoint the index was built with."""
        expected = self.manifest["model"].get("sha256")
        if model.sha256 != expected:
            raise UserError(f"model {model.checkpoint} (sha256 {model.sha256[:12]}) is not the model index {self.folder} "
                            f"was built with (sha256 {str(expected)[:12]}); embeddings of different models are not comparable")
        self._model = model

    def model(self):
        """The model that built the index (loaded from the checkpoint path the manifest records)."""
        if self._model is None:
            from dcml.inference import load_model

            recorded = self.manifest["model"].get("checkpoint")
            if not recorded or not Path(recorded).is_file():
                raise UserError(f"the checkpoint index {self.folder} was built with ({recorded}) is gone; pass --model RUN")
            self.use_model(load_model(recorded))
        return self._model

    # ------------------------------------------------------------------ searching
    def search(self, queries, k: int = 10) -> SearchResult:
        """The ``k`` nearest items of each query: an N x D array of embeddings, or images (paths, PIL)."""
        if isinstance(queries, np.ndarray):
            return self.search_vectors(queries, k)
        return self.search_vectors(self.model().embed(queries), k)

    def check_k(self, k: int) -> None:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"k must be a positive integer, got {k!r}")
        if k > len(self):
            raise UserError(f"k={k} is above the index size ({len(self)} items)")

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> SearchResult:
        from dcml.model_runner import l2_normalize

        if self.faiss_index is None:
            raise RuntimeError(f"index {self.folder}: its faiss index was dropped; load it again to search")
        self.check_k(k)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise UserError(f"query embeddings of shape {vectors.shape} do not match the index dimension {self.dimension}")
        if not np.isfinite(vectors).all():
            raise UserError("query embeddings hold NaN or infinite values")
        vectors = np.ascontiguousarray(l2_normalize(vectors))
        if len(vectors) == 0:
            return SearchResult(np.zeros((0, k), np.int64), np.zeros((0, k), np.float64))
        if self.kind == "flat":
            squared, ids = exact_search(vectors, k, len(self), self.faiss_index.search, self._rows,
                                        float(self.manifest.get("max_norm") or 1.0))
        else:
            squared, ids = self.faiss_index.search(vectors, k)
            squared = np.where(ids < 0, np.inf, squared).astype(np.float64)
        return SearchResult(ids.astype(np.int64), np.sqrt(np.maximum(squared, 0.0)))

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        return self.faiss_index.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    # ------------------------------------------------------------------ description
    def info(self) -> dict:
        m = self.manifest
        calibration = self.calibration()
        return {
            "path": str(self.folder), "items": len(self), "dimension": self.dimension, "distance": m.get("distance"),
            "kind": self.kind, "parameters": m["parameters"], "recall_at_10": m.get("recall_at_10"),
            "labelled_items": sum(label is not None for label in self.items.labels),
            "model": m["model"], "dcml_version": m.get("dcml_version"), "created": m.get("created"),
            "updated": m.get("updated"), "thresholds": None if calibration is None else calibration.get("thresholds"),
        }

    def calibration(self) -> dict | None:
        path = self.folder / CALIBRATION_FILE
        if not path.is_file():
            return None
        payload = read_json(path, "calibration")
        if not isinstance(payload, dict) or payload.get("model_sha256") != self.manifest["model"].get("sha256"):
            raise UserError(f"{path} was calibrated for another model; run dcml calibrate again")
        return payload


# ---------------------------------------------------------------------------- adding and rebuilding
def copy_into(builder: IndexBuilder, source: Index) -> None:
    """The source index's embeddings, chunk by chunk (never re-embedded)."""
    npy_shape(source.embeddings_path)
    for chunk in iter_npy_rows(source.embeddings_path):
        builder.append(chunk)


def extra_files(source: Index, folder: Path) -> None:
    """Files that travel with an index through add / rebuild (its calibration)."""
    if (source.folder / CALIBRATION_FILE).is_file():
        shutil.copy2(source.folder / CALIBRATION_FILE, folder / CALIBRATION_FILE)


def add_to_index(source: Index, new_embeddings: np.ndarray, new_items: Items, *, seed: int = 0) -> Index:
    """The index with ``new_items`` appended (same kind and parameters), replacing it atomically."""
    from dcml.model_runner import l2_normalize

    def append(builder: IndexBuilder) -> Items:
        builder.append(l2_normalize(new_embeddings))
        return new_items

    return extend_index(source, append, seed=seed)


def extend_index(source: Index, append, *, seed: int = 0) -> Index:
    """The index with the rows ``append(builder)`` adds after its own (it returns their Items), replacing
    it atomically (same kind and parameters); ``source`` as it was when ``append`` adds nothing."""
    with IndexBuilder(source.folder, source.dimension, overwrite=True) as builder:
        copy_into(builder, source)
        new_items = append(builder)
        if not len(new_items):
            return source  # leaving the builder unfinished removes its folder
        extra_files(source, builder.folder)
        return builder.finish(source.items.extended(new_items), source.manifest["model"], source.kind,
                              _build_parameters(source), seed=seed, created=source.manifest.get("created"))


def rebuild_index(source: Index, out: str | Path, kind: str, params: dict | None = None, *, overwrite: bool = False,
                  seed: int = 0) -> Index:
    """Another kind of index over the same embeddings and items (no re-embedding)."""
    with IndexBuilder(out, source.dimension, overwrite=overwrite) as builder:
        copy_into(builder, source)
        extra_files(source, builder.folder)
        return builder.finish(source.items, source.manifest["model"], kind, params, seed=seed)


def _build_parameters(source: Index) -> dict:
    """Parameters as the user set them; IVF list counts are re-derived when the collection grows past them."""
    return dict(source.manifest["parameters"])

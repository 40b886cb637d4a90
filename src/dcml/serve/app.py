"""The HTTP routes of ``dcml serve``: search, embed, items, info, health; append and reload behind --allow-writes.

Every refusal is a 4xx whose JSON body is ``{"error": "<one line>"}``; JSON never holds NaN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import asdict

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import Response

from dcml.errors import UserError
from dcml.atomic_files import json_text
from dcml.search.calibration import resolve_threshold
from dcml.search.index import Items
from dcml.serve.batcher import MicroBatcher
from dcml.serve.gate import Gate, error_response
from dcml.serve.limits import RequestProblem, ServeLimits
from dcml.serve.state import ServedIndex, Snapshot
from dcml.serve.uploads import decode_upload

log = logging.getLogger("dcml.serve")

#: Form fields other than files are short (k, a threshold name, labels, names): a bound keeps a
#: huge text field from being buffered.
_MAX_FIELD_BYTES = 64 * 1024
_UPLOADS_FIELD = "images"

_IMAGES_BODY = {"multipart/form-data": {"schema": {"type": "object", "required": [_UPLOADS_FIELD], "properties": {
    _UPLOADS_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
    "k": {"type": "integer"}, "threshold": {"type": "string"}}}}}
_VECTORS_BODY = {"application/json": {"schema": {"type": "object", "required": ["vectors"], "properties": {
    "vectors": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    "k": {"type": "integer"}, "threshold": {"type": "string"}}}}}


class JSONText(Response):
    """JSON through :func:`dcml.atomic_files.json_text`: a non-finite number is null, never a bare NaN."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return json_text(content).encode()


def create_app(served: ServedIndex, *, limits: ServeLimits | None = None, token: str | None = None,
               allow_writes: bool = False) -> FastAPI:
    """The ASGI app over an index already loaded with its model (loaded once, by the caller)."""
    limits = limits or ServeLimits()
    model = served.model
    batcher = MicroBatcher(model.embed_tensors, max_batch=limits.max_batch, max_wait_s=limits.batch_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="dcml serve", version=_version(), default_response_class=JSONText, lifespan=lifespan,
                  description="Search a dcml index with images or embeddings. Errors: `{\"error\": \"...\"}` with a 4xx status.")
    _install_error_handlers(app)
    app.state.batcher = batcher
    app.state.served = served

    async def embed_uploads(uploads: list[tuple[str, bytes]]) -> np.ndarray:
        images = await run_in_threadpool(_transform_all, uploads, model.transform, limits.max_image_pixels)
        return await asyncio.wrap_future(batcher.submit(images))

    @app.get("/health", summary="liveness, item count and batching counters")
    async def health() -> dict:
        stats = batcher.stats
        return {"status": "ok", "items": len(served.current().index), "batches": stats.batches,
                "images_embedded": stats.images, "largest_batch": stats.largest}

    @app.get("/info", summary="the index manifest, its calibrated thresholds and this server's limits")
    async def info() -> dict:
        snapshot = served.current()
        thresholds = None if snapshot.calibration is None else snapshot.calibration.get("thresholds")
        return {"manifest": snapshot.index.manifest, "thresholds": thresholds, "limits": asdict(limits),
                "writes": allow_writes}

    @app.get("/items/{item_id}", summary="one indexed item: path, label, group")
    async def item(item_id: int) -> dict:
        index = served.current().index
        if not 0 <= item_id < len(index):
            raise RequestProblem(404, f"no item {item_id}: the index holds ids 0..{len(index) - 1}")
        return _item(index.items, item_id)

    @app.post("/embed", summary="embed uploaded images (multipart field 'images')",
              openapi_extra={"requestBody": {"required": True, "content": _IMAGES_BODY}})
    async def embed(request: Request) -> dict:
        uploads, _fields = await _read_uploads(request, limits)
        vectors = await embed_uploads(uploads)
        return {"dimension": int(vectors.shape[1]), "names": [name for name, _ in uploads],
                "model_sha256": model.sha256, "embeddings": vectors.tolist()}

    @app.post("/search", summary="nearest items of uploaded images or of JSON embedding vectors",
              openapi_extra={"requestBody": {"required": True, "content": {**_IMAGES_BODY, **_VECTORS_BODY}}})
    async def search(request: Request) -> dict:
        snapshot = served.current()  # the whole request answers from this index, whatever is swapped in meanwhile
        if _content_type(request) == "application/json":
            body = await _read_json(request)
            vectors = _vectors(body.get("vectors"), snapshot.index.dimension, limits)
            names = [f"vectors[{i}]" for i in range(len(vectors))]
            fields = body
        else:
            uploads, fields = await _read_uploads(request, limits)
            vectors = await embed_uploads(uploads)
            names = [name for name, _ in uploads]
        k, threshold = _search_options(request, fields, snapshot, limits)
        result = await run_in_threadpool(_search_rows, snapshot, vectors, k)
        return {"index": str(snapshot.index.folder), "k": k, "distance": snapshot.index.manifest.get("distance"),
                "threshold": None if threshold is None else {"name": threshold[0], "distance": threshold[1]},
                "queries": _records(snapshot, names, result, threshold)}

    @app.post("/items", summary="embed uploaded images and append them to the index (--allow-writes)",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": [_UPLOADS_FIELD], "properties": {
                      _UPLOADS_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
                      "paths": {"type": "array", "items": {"type": "string"}},
                      "labels": {"type": "array", "items": {"type": "integer"}}}}}}}})
    async def add_items(request: Request) -> dict:
        _require_writes(allow_writes)
        uploads, fields = await _read_uploads(request, limits)
        items = _new_items(uploads, fields)
        vectors = await embed_uploads(uploads)
        try:
            snapshot, ids = await run_in_threadpool(served.append, vectors, items)
        except (OSError, UserError) as error:  # e.g. a full disk: the new folder is dropped, the old one stays
            raise RequestProblem(507, f"the items were not added, the index is unchanged: {error}") from None
        return {"added": len(ids), "ids": list(ids), "items": len(snapshot.index)}

    @app.post("/reload", summary="swap in the index folder as rebuilt on disk (--allow-writes)")
    async def reload() -> dict:
        _require_writes(allow_writes)
        try:
            snapshot = await run_in_threadpool(served.reload)
        except UserError as error:
            raise RequestProblem(409, f"kept the index already loaded: {error}") from None
        return {"items": len(snapshot.index), "updated": snapshot.index.manifest.get("updated")}

    app.add_middleware(Gate, token=token, max_body_bytes=limits.max_upload_bytes)
    return app


# ---------------------------------------------------------------------------- errors
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestProblem)
    async def _problem(_request: Request, error: RequestProblem) -> Response:
        return error_response(error.status, error.reason)

    @app.exception_handler(UserError)
    async def _user_error(_request: Request, error: UserError) -> Response:
        return error_response(422, " ".join(str(error).split()))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> Response:
        first = (error.errors() or [{}])[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, error: HTTPException) -> Response:
        return error_response(error.status_code, " ".join(str(error.detail).split()))


def _require_writes(allowed: bool) -> None:
    if not allowed:
        raise RequestProblem(403, "this server is read-only; start dcml serve with --allow-writes (and a token)")


# ---------------------------------------------------------------------------- request bodies
def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestProblem(400, f"the body is not valid JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(body, dict):
        raise RequestProblem(422, 'the JSON body must be an object, e.g. {"vectors": [[...]], "k": 10}')
    return body


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


async def _read_uploads(request: Request, limits: ServeLimits) -> tuple[list[tuple[str, bytes]], FormData]:
    """(name, bytes) of each file in the 'images' field, and the form's other fields."""
    if _content_type(request) != "multipart/form-data":
        raise RequestProblem(415, f"send images as multipart/form-data in the field '{_UPLOADS_FIELD}' "
                                  "(or, for /search, a JSON body with 'vectors')")
    try:
        form = await request.form(max_files=limits.max_images, max_fields=4 * limits.max_images + 8,
                                  max_part_size=_MAX_FIELD_BYTES)
    except HTTPException as error:  # starlette's multipart parser: too many parts, a malformed body
        raise RequestProblem(413 if "Too many" in str(error.detail) else 400, str(error.detail)) from None
    try:
        files = [value for value in form.getlist(_UPLOADS_FIELD) if isinstance(value, UploadFile)]
        if not files:
            others = [key for key, value in form.multi_items() if isinstance(value, UploadFile)]
            hint = f" (got files in {', '.join(sorted(set(others)))})" if others else ""
            raise RequestProblem(422, f"no image in the multipart field '{_UPLOADS_FIELD}'{hint}")
        limits.check_count(len(files), "images", limits.max_images)
        uploads = [(file.filename or f"image {i}", await file.read()) for i, file in enumerate(files)]
    finally:
        await form.close()
    return uploads, form


def _transform_all(uploads: list[tuple[str, bytes]], transform, max_pixels: int) -> torch.Tensor:
    return torch.stack([transform(decode_upload(data, name, max_pixels)) for name, data in uploads])


def _vectors(value, dimension: int, limits: ServeLimits) -> np.ndarray:
    if not isinstance(value, list):
        raise RequestProblem(422, "'vectors' must be a list of embedding vectors (lists of numbers)")
    limits.check_count(len(value), "vectors", limits.max_vectors)
    try:
        with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, refused just below
            vectors = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestProblem(422, f"'vectors' must be {len(value)} lists of {dimension} numbers each") from None
    if vectors.ndim != 2 or vectors.shape[1] != dimension:
        raise RequestProblem(422, f"'vectors' has shape {list(vectors.shape)}; this index holds {dimension}-d vectors")
    if not np.isfinite(vectors).all():
        raise RequestProblem(422, "'vectors' holds a value too large for float32")
    if not (np.linalg.norm(vectors, axis=1) > 0).all():
        raise RequestProblem(422, "'vectors' holds an all-zero vector, which has no direction to search")
    return vectors


def _field(request: Request, fields, name: str):
    """A search option from the query string or the body (JSON key / form field), not both."""
    in_query = request.query_params.get(name)
    in_body = fields.get(name)
    if in_query is not None and in_body is not None:
        raise RequestProblem(422, f"give {name} once: in the query string or in the body")
    return in_query if in_query is not None else in_body


def _search_options(request: Request, fields, snapshot: Snapshot, limits: ServeLimits) -> tuple[int, tuple[str, float] | None]:
    raw_k = _field(request, fields, "k")
    k = 10 if raw_k is None else _integer(raw_k, "k")
    limits.check_k(k, len(snapshot.index))
    spec = _field(request, fields, "threshold")
    if spec is not None and (isinstance(spec, bool) or not isinstance(spec, (str, int, float))):
        raise RequestProblem(422, "threshold must be a distance or a calibrated name such as precision@0.95")
    return k, resolve_threshold(spec, snapshot.calibration)


def _integer(value, name: str) -> int:
    if isinstance(value, bool):
        raise RequestProblem(422, f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise RequestProblem(422, f"{name} must be an integer, got {str(value)[:40]!r}") from None


def _new_items(uploads: list[tuple[str, bytes]], fields: FormData) -> Items:
    """Names and labels of appended images: the 'paths' / 'labels' fields, one per image, or none."""
    paths = fields.getlist("paths")
    labels = fields.getlist("labels")
    for name, given in (("paths", paths), ("labels", labels)):
        if given and len(given) != len(uploads):
            raise RequestProblem(422, f"{len(given)} {name} for {len(uploads)} images; give one per image or none")
    # An uploaded image has no file on this server: its item path is the name the caller chose.
    names = [str(p) for p in paths] if paths else [f"upload:{name}" for name, _ in uploads]
    return Items(names, [None if str(v).strip() == "" else _integer(v, "labels") for v in labels])


# ---------------------------------------------------------------------------- answers
def _search_rows(snapshot: Snapshot, vectors: np.ndarray, k: int):
    try:
        return snapshot.index.search_vectors(vectors, k)
    except UserError as error:
        raise RequestProblem(422, str(error)) from None


def _item(items: Items, i: int) -> dict:
    return {"id": int(i), "path": items.paths[i], "label": items.labels[i], "group": items.groups[i]}


def _records(snapshot: Snapshot, names: list[str], result, threshold) -> list[dict]:
    """One record per query, with the fields ``dcml query --json`` gives its results."""
    items = snapshot.index.items
    records = []
    for row, name in enumerate(names):
        results = []
        for rank, (i, distance) in enumerate(zip(result.ids[row], result.distances[row]), start=1):
            if i < 0:  # an approximate index can return fewer than k
                continue
            entry = {"rank": rank, **_item(items, int(i)), "distance": float(distance)}
            if threshold is not None:
                entry["match"] = bool(distance <= threshold[1])
            results.append(entry)
        record = {"query": name, "results": results}
        if threshold is not None:
            record["match"] = any(entry["match"] for entry in results)
        records.append(record)
    return records


def _version() -> str:
    from dcml import __version__

    return __version__

"""dcml serve over real HTTP on a loopback port: answers equal dcml query's, bad requests are 4xx, writes persist."""

from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from dcml.cli import main
from dcml.search.index import Index
from dcml.serve import ServeLimits

from .conftest import TOKEN, live_server, test_images

SMALL = ServeLimits(max_k=20, max_images=4, max_upload_bytes=200_000, max_image_pixels=1_000_000, batch_wait_ms=20)


def _files(paths) -> list:
    return [("images", (path.name, path.read_bytes(), "image/png")) for path in paths]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data worth the name): a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _query_json(index, paths, *extra) -> dict:
    import contextlib

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["query", str(index), *map(str, paths), "--json", *extra]) == 0
    return json.loads(buffer.getvalue())


def _same_results(served: list[dict], queried: list[dict]) -> None:
    assert len(served) == len(queried)
    for mine, theirs in zip(served, queried):
        assert [r["id"] for r in mine["results"]] == [r["id"] for r in theirs["results"]]
        for a, b in zip(mine["results"], theirs["results"]):
            assert (a["rank"], a["path"], a["label"], a["group"], a.get("match")) == (b["rank"], b["path"], b["label"], b["group"], b.get("match"))
            assert a["distance"] == pytest.approx(b["distance"], abs=1e-5)
        assert mine.get("match") == theirs.get("match")


@pytest.fixture(scope="module")
def small_server(built_index, model):
    with live_server(built_index, model, limits=SMALL) as running:
        yield running


def test_search_with_images_equals_dcml_query(server, built_index, serve_folder):
    url, _ = server
    queries = test_images(serve_folder)[1::6]
    expected = _query_json(built_index, queries, "-k", "5")
    response = httpx.post(f"{url}/search", params={"k": 5}, files=_files(queries), timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 5 and body["threshold"] is None
    assert [q["query"] for q in body["queries"]] == [p.name for p in queries]
    _same_results(body["queries"], expected["queries"])


def test_search_with_vectors_and_a_calibrated_threshold_equals_dcml_query(server, built_index, serve_folder, model):
    url, _ = server
    queries = test_images(serve_folder)[::5]
    expected = _query_json(built_index, queries, "-k", "4", "--threshold", "f1")
    vectors = model.embed(queries).tolist()
    response = httpx.post(f"{url}/search", json={"vectors": vectors, "k": 4, "threshold": "f1"}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["threshold"] == expected["threshold"]
    assert all("match" in r for q in body["queries"] for r in q["results"])
    _same_results(body["queries"], expected["queries"])


def test_embed_items_info_and_health(server, built_index, serve_folder, model):
    url, _ = server
    paths = test_images(serve_folder)[:3]
    embedded = httpx.post(f"{url}/embed", files=_files(paths), timeout=30).json()
    np.testing.assert_allclose(np.array(embedded["embeddings"]), model.embed(paths), atol=1e-5)
    assert embedded["dimension"] == model.dimension and embedded["model_sha256"] == model.sha256
    index = Index.load(built_index)
    item = httpx.get(f"{url}/items/7").json()
    assert item == {"id": 7, "path": index.items.paths[7], "label": index.items.labels[7], "group": index.items.groups[7]}
    info = httpx.get(f"{url}/info").json()
    assert info["manifest"] == json.loads((built_index / "manifest.json").read_text())
    assert "f1" in info["thresholds"] and info["writes"] is False
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["items"] == len(index)
    assert httpx.get(f"{url}/openapi.json").json()["paths"].keys() >= {"/search", "/embed", "/items/{item_id}", "/info"}


def _bad_requests(serve_folder) -> list[tuple[str, dict, int]]:
    image = test_images(serve_folder)[0]
    png = image.read_bytes()
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(big, format="PNG")
    return [
        ("not an image", {"files": [("images", ("a.png", b"hello, not a picture", "image/png"))]}, 415),
        ("corrupt image", {"files": [("images", ("cut.png", png[: len(png) // 2], "image/png"))]}, 422),
        ("empty upload", {"files": [("images", ("e.png", b"", "image/png"))]}, 422),
        ("over the pixel limit", {"files": [("images", ("wide.png", _png_header(2000, 1000), "image/png"))]}, 413),
        ("decompression bomb", {"files": [("images", ("bomb.png", _png_header(100_000, 100_000), "image/png"))]}, 413),
        ("body over the limit", {"files": [("images", ("big.png", big.getvalue(), "image/png"))]}, 413),
        ("too many images", {"files": _files([image] * 5)}, 413),
        ("no images field", {"files": [("photo", ("a.png", png, "image/png"))]}, 422),
        ("k above the limit", {"files": _files([image]), "params": {"k": 21}}, 422),
        ("k zero", {"files": _files([image]), "params": {"k": 0}}, 422),
        ("k not a number", {"files": _files([image]), "params": {"k": "ten"}}, 422),
        ("k twice", {"files": _files([image]), "params": {"k": 3}, "data": {"k": "4"}}, 422),
        ("unknown threshold", {"files": _files([image]), "params": {"threshold": "precision@0.5"}}, 422),
        ("negative threshold", {"files": _files([image]), "params": {"threshold": "-1"}}, 422),
        ("wrong content type", {"content": b"raw bytes", "headers": {"content-type": "image/png"}}, 415),
        ("JSON that is not JSON", {"content": b"{vectors:", "headers": {"content-type": "application/json"}}, 400),
        ("JSON with NaN", {"content": b'{"vectors": [[NaN]]}', "headers": {"content-type": "application/json"}}, 400),
        ("JSON list", {"json": [[0.1, 0.2]]}, 422),
        ("vectors of the wrong width", {"json": {"vectors": [[0.1, 0.2]]}}, 422),
        ("vectors ragged", {"json": {"vectors": [[0.1] * 16, [0.1]]}}, 422),
        ("no vectors", {"json": {"vectors": []}}, 422),
        ("a zero vector", {"json": {"vectors": [[0.0] * 16]}}, 422),
        ("vectors overflowing float32", {"json": {"vectors": [[1e300] * 16]}}, 422),
    ]


def test_every_bad_request_gets_its_4xx_with_a_one_line_reason(small_server, serve_folder):
    url, _ = small_server
    with httpx.Client(base_url=url, timeout=30) as client:
        for what, request, status in _bad_requests(serve_folder):
            response = client.post("/search", **request)
            assert response.status_code == status, (what, response.status_code, response.text)
            reason = response.json()["error"]
            assert reason and "\n" not in reason and "Traceback" not in reason, what
        others = [(client.get("/items/24"), 404), (client.get("/items/x"), 422), (client.get("/nowhere"), 404),
                  (client.post("/items", files=_files(test_images(serve_folder)[:1])), 403), (client.post("/reload"), 403),
                  (client.delete("/search"), 405)]
        for response, status in others:
            assert response.status_code == status and "\n" not in response.json()["error"], response.text
        # A body streamed without a Content-Length is cut off at the limit too. The stream opens a
        # well-formed file part, so the form parser keeps reading until the gate stops it (a stream
        # of garbage may instead be refused as bad multipart, 400, by whichever comes first).
        part_head = (b'--b\r\nContent-Disposition: form-data; name="images"; filename="big.png"\r\n'
                     b"Content-Type: image/png\r\n\r\n")
        chunked = client.post("/embed", content=iter([part_head] + [b"x" * 65536] * 5),
                              headers={"content-type": "multipart/form-data; boundary=b"})
        assert chunked.status_code == 413, chunked.text
        # ... and nothing above killed the server or its model thread.
        assert client.get("/health").json()["status"] == "ok"
        ok = client.post("/search", files=_files(test_images(serve_folder)[:1]), params={"k": 2})
        assert ok.status_code == 200 and len(ok.json()["queries"][0]["results"]) == 2


def test_concurrent_clients_all_get_their_own_answers(small_server, built_index, serve_folder, model):
    url, app = small_server
    paths = test_images(serve_folder)
    expected = Index.load(built_index, model=model).search(paths, k=3)

    def ask(i: int) -> tuple[int, list[int]]:
        with httpx.Client(base_url=url, timeout=60) as client:
            body = client.post("/search", files=_files([paths[i]]), params={"k": 3}).json()
        return i, [r["id"] for r in body["queries"][0]["results"]]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [i % len(paths) for i in range(40)]))
    for i, ids in answers:
        assert ids == expected.ids[i].tolist(), i
    assert app.state.batcher.stats.largest > 1  # 8 clients and a 20 ms wait: passes were shared


def test_the_token_is_enforced_on_every_path(built_index, model, serve_folder):
    with live_server(built_index, model, token=TOKEN) as (url, _):
        image = test_images(serve_folder)[:1]
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
            for response in (httpx.get(f"{url}/health", headers=headers), httpx.get(f"{url}/docs", headers=headers),
                             httpx.post(f"{url}/search", files=_files(image), headers=headers)):
                assert response.status_code == 401 and "token" in response.json()["error"]
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{url}/health", headers=good).status_code == 200
        assert httpx.post(f"{url}/search", files=_files(image), headers=good).status_code == 200


def test_appended_items_persist_across_a_restart(index_copy, model, serve_folder):
    new = test_images(serve_folder, "val")[:2]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with live_server(index_copy, model, token=TOKEN, allow_writes=True) as (url, _):
        added = httpx.post(f"{url}/items", files=_files(new), data={"labels": ["70", "71"], "paths": ["new/a.png", "new/b.png"]},
                           headers=auth, timeout=60)
        assert added.status_code == 200, added.text
        assert added.json() == {"added": 2, "ids": [24, 25], "items": 26}
        found = httpx.post(f"{url}/search", files=_files(new[:1]), params={"k": 1}, headers=auth).json()
        assert found["queries"][0]["results"][0]["id"] == 24 and found["queries"][0]["results"][0]["distance"] < 1e-3
    assert len(Index.load(index_copy)) == 26 and not [p for p in index_copy.parent.iterdir() if p.name.startswith(".")]
    with live_server(index_copy, model, token=TOKEN) as (url, _):
        assert httpx.get(f"{url}/items/25", headers=auth).json() == {"id": 25, "path": "new/b.png", "label": 71, "group": None}
        info = httpx.get(f"{url}/info", headers=auth).json()
        assert info["manifest"]["items"] == 26 and "f1" in info["thresholds"]  # the calibration travelled along


def test_a_failed_append_leaves_the_previous_index(index_copy, model, serve_folder, monkeypatch):
    import dcml.search.index as index_module

    def crash(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_module, "swap_in", crash)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with live_server(index_copy, model, token=TOKEN, allow_writes=True) as (url, _):
        failed = httpx.post(f"{url}/items", files=_files(test_images(serve_folder, "val")[:1]), headers=auth, timeout=60)
        assert failed.status_code == 507 and "unchanged" in failed.json()["error"]
        assert httpx.get(f"{url}/health", headers=auth).json()["items"] == 24
    assert len(Index.load(index_copy)) == 24  # the previous index, whole (checksums verified by load)


def test_reload_swaps_in_a_rebuilt_index_without_dropping_requests(index_copy, model, serve_folder):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    paths = test_images(serve_folder)
    failures: list[str] = []
    counts: list[int] = []
    with live_server(index_copy, model, token=TOKEN, allow_writes=True) as (url, _):
        stop = threading.Event()

        def keep_searching() -> None:
            with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
                for i in range(200):  # bounded, even if stop never comes
                    if stop.is_set():
                        return
                    response = client.post("/search", files=_files([paths[i % len(paths)]]), params={"k": 1})
                    if response.status_code != 200:
                        failures.append(response.text)
                    counts.append(response.status_code)

        workers = [threading.Thread(target=keep_searching) for _ in range(3)]
        for worker in workers:
            worker.start()
        try:
            assert main(["index", "add", str(index_copy), "--images", str(serve_folder / "val"), "--no-progress"]) == 0
            reloaded = httpx.post(f"{url}/reload", headers=auth, timeout=60)
        finally:
            stop.set()
            for worker in workers:
                worker.join(60)
        assert reloaded.status_code == 200 and reloaded.json()["items"] == 40
        assert httpx.get(f"{url}/health", headers=auth).json()["items"] == 40
    assert not failures and counts


@pytest.mark.parametrize("arguments, words", [
    (["--host", "0.0.0.0"], "reachable from other machines"),
    (["--allow-writes"], "set a token"),
    (["--token", "short"], "at least 16"),
])
def test_serve_refuses_an_open_server_unless_forced(built_index, arguments, words, capsys, monkeypatch):
    monkeypatch.delenv("DCML_SERVE_TOKEN", raising=False)
    assert main(["serve", str(built_index), *arguments]) == 2
    error = capsys.readouterr().err
    assert words in error and len(error.strip().splitlines()) == 1

"""Index folders: build, search as evaluation ranks, add, interrupted builds, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dcml
from dcml.cli import main
from dcml.errors import UserError
from dcml.search.exact import nearest_neighbours
from dcml.search.index import Index, Items, build_index


def _model_info(sha="0" * 64):
    return {"checkpoint": "none", "sha256": sha}


def _clustered(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    labels = rng.integers(0, 20, n)
    return (centres[labels] + 0.3 * rng.normal(size=(n, d))).astype(np.float32), labels


def test_run_index_query_top1_is_brute_force(tiny_run, search_folder, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(tiny_run), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    index = Index.load(out)
    assert len(index) == 24 and index.items.has_labels
    queries = sorted((search_folder / "test").rglob("*.png"))[::5]
    capsys.readouterr()
    assert main(["query", str(out), *map(str, queries), "-k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    vectors = dcml.load_model(tiny_run).embed(queries)
    embeddings = index.embeddings()
    brute = np.argmin(((vectors[:, None, :].astype(np.float64) - embeddings[None]) ** 2).sum(-1), axis=1)
    assert [q["results"][0]["id"] for q in answer["queries"]] == brute.tolist()
    # The Python API answers the same.
    assert dcml.Index.load(out).search(queries, k=3).ids[:, 0].tolist() == brute.tolist()


def test_exact_search_ranks_as_evaluation_does_with_ties():
    from dcml.evaluation.metrics import retrieval_ranks

    x, labels = _clustered(300)
    x[50] = x[10]  # exact duplicates: ties must break by index, as evaluation's stable order
    x[51] = x[10]
    x[200] = x[199]
    ranks = retrieval_ranks(dcml.model_runner.l2_normalize(x), labels, max_k=20)
    ids, _ = nearest_neighbours(x, x, 20, exclude=np.arange(len(x)))
    for q in range(len(x)):
        hits = np.flatnonzero(labels[ids[q]] == labels[q])
        if ranks.first_rank[q] <= 20:
            assert hits[0] + 1 == ranks.first_rank[q]
        else:
            assert len(hits) == 0
    assert ids[10, 0] == 50 and ids[10, 1] == 51  # the tied duplicates, lower index first


def test_index_search_equals_nearest_neighbours(tmp_path):
    x, _ = _clustered()
    index = build_index(tmp_path / "i", x, Items([f"p{i}" for i in range(len(x))]), _model_info())
    result = index.search(x[:50], 7)
    ids, distances = nearest_neighbours(x, x[:50], 7)
    np.testing.assert_array_equal(result.ids, ids)
    np.testing.assert_allclose(result.distances, distances, atol=1e-9)


def test_add_equals_a_build_on_the_union(tiny_run, search_folder, tmp_path, capsys):
    first, union = tmp_path / "first", tmp_path / "union"
    extra = search_folder / "val"
    assert main(["index", "build", "--model", str(tiny_run), "--images", str(search_folder / "test"), "--out",
                 str(first), "--no-progress"]) == 0
    assert main(["index", "add", str(first), "--images", str(extra), "--no-progress"]) == 0
    assert main(["index", "add", str(first), "--images", str(extra), "--no-progress"]) == 0
    assert "already" in capsys.readouterr().out
    added = Index.load(first)
    paths = added.items.paths
    assert len(paths) == 40 and len(set(paths)) == 40
    built = build_index(union, dcml.load_model(tiny_run).embed(paths), Items(paths), added.manifest["model"])
    np.testing.assert_allclose(added.embeddings(), built.embeddings(), atol=1e-6)
    queries = built.embeddings()[::3]
    np.testing.assert_array_equal(added.search(queries, 5).ids, built.search(queries, 5).ids)


def test_interrupted_build_leaves_the_old_index(tmp_path, monkeypatch):
    import faiss

    x, _ = _clustered()
    items = Items([f"p{i}" for i in range(len(x))])
    build_index(tmp_path / "i", x, items, _model_info())
    before = (tmp_path / "i" / "manifest.json").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "i", x[::-1].copy(), items, _model_info(), overwrite=True)
    assert (tmp_path / "i" / "manifest.json").read_text() == before
    assert Index.load(tmp_path / "i").search(x[:3], 1).ids[:, 0].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i"]  # no temporary folder left behind


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_approximate_kinds_measure_their_recall(tmp_path, kind):
    x, _ = _clustered(600)
    index = build_index(tmp_path / kind, x, Items([f"p{i}" for i in range(len(x))]), _model_info(), kind)
    recall = index.manifest["recall_at_10"]
    assert 0 < recall <= 1 and index.manifest["recall_queries"] == 600
    found = index.search(x[:100], 10).ids
    exact, _ = nearest_neighbours(x, x[:100], 10)
    measured = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert measured >= 0.5 and (kind != "hnsw" or measured >= 0.9)
    reloaded = Index.load(tmp_path / kind)
    np.testing.assert_array_equal(reloaded.search(x[:20], 10).ids, found[:20])


def test_bad_input_is_one_line(tmp_path):
    x, _ = _clustered(50)
    folder = tmp_path / "i"
    index = build_index(folder, x, Items([f"p{i}" for i in range(50)]), _model_info())
    problems = [
        lambda: index.search(x[:2], 51),  # k above the index size
        lambda: index.search(np.zeros((2, 5), np.float32), 3),  # dimension mismatch
        lambda: build_index(folder, x, Items([f"p{i}" for i in range(50)]), _model_info()),  # exists, no overwrite
        lambda: Index.load(tmp_path / "missing"),
    ]

    class FakeModel:
        sha256 = "1" * 64
        checkpoint = "other.pt"

    problems.append(lambda: index.use_model(FakeModel()))
    for problem in problems:
        with pytest.raises(UserError) as info:
            problem()
        assert "\n" not in str(info.value)
    # A damaged file is caught by its checksum; a damaged manifest by its format.
    data = bytearray((folder / "index.faiss").read_bytes())
    data[-5] ^= 0xFF
    (folder / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its manifest"):
        Index.load(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read index manifest"):
        Index.load(folder)


def test_refuses_to_replace_a_folder_that_is_not_an_index(tmp_path):
    x, _ = _clustered(50)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(UserError, match="not a dcml index"):
        build_index(tmp_path / "mine", x, Items([f"p{i}" for i in range(50)]), _model_info(), overwrite=True)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


def test_query_cli_answers_the_rest_of_a_batch(tiny_run, search_folder, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(tiny_run), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    good = sorted((search_folder / "test").rglob("*.png"))[0]
    capsys.readouterr()
    assert main(["query", str(out), str(corrupt), str(good), "-k", "2", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["queries"]
    assert records[0]["error"] and records[0]["results"] == []
    assert records[1]["error"] is None and len(records[1]["results"]) == 2
    assert main(["query", str(out), str(corrupt)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["query", str(out), str(good), "-k", "99"]) == 2
    assert "above the index size" in capsys.readouterr().err
    # A different model (another checkpoint) is refused.
    assert main(["query", str(out), str(good), "--model", str(tiny_run / "last.pt")]) == 2
    assert "is not the model" in capsys.readouterr().err


def test_query_grid_and_threshold(tiny_run, search_folder, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(tiny_run), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    assert main(["calibrate", "--model", str(tiny_run), "--index", str(out), "--no-progress"]) == 0
    good = sorted((search_folder / "test").rglob("*.png"))[0]
    grid = tmp_path / "grid.png"
    capsys.readouterr()
    assert main(["query", str(out), str(good), "-k", "3", "--threshold", "precision@0.95", "--json", "--grid", str(grid)]) == 0
    record = json.loads(capsys.readouterr().out)["queries"][0]
    assert record["match"] is True and record["results"][0]["match"] is True
    assert record["results"][0]["same_label"] is True
    from PIL import Image

    assert Image.open(grid).size[0] > 4 * 96
    assert main(["query", str(out), str(good), "--threshold", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"][0]["match"] is False


def test_ivf_lists_sized_once_hold_what_faiss_add_puts_there(tmp_path):
    import faiss

    x, _ = _clustered(3000, d=16)
    x = dcml.model_runner.l2_normalize(x)
    index = build_index(tmp_path / "ivf", x, Items([f"p{i}" for i in range(len(x))]), _model_info(), "ivf",
                        {"nlist": 20, "nprobe": 3})
    built = faiss.extract_index_ivf(index.faiss_index)
    reference = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 20)
    reference.quantizer.add(built.quantizer.reconstruct_n(0, 20))
    reference.is_trained = True
    reference.add(x)
    for list_no in range(20):  # same rows in every list, in the same order
        assert built.invlists.list_size(list_no) == reference.invlists.list_size(list_no)
        ids = faiss.rev_swig_ptr(built.invlists.get_ids(list_no), built.invlists.list_size(list_no))
        expected = faiss.rev_swig_ptr(reference.invlists.get_ids(list_no), reference.invlists.list_size(list_no))
        np.testing.assert_array_equal(ids, expected)
    reference.nprobe = 3
    _, expected_ids = reference.search(x[:50], 5)
    np.testing.assert_array_equal(index.search(x[:50], 5).ids, expected_ids)


def test_embeddings_file_is_a_plain_npy_written_once(tmp_path):
    from dcml.search.storage import NpyRowWriter, npy_shape

    rows = np.random.default_rng(0).normal(size=(1000, 7)).astype(np.float32)
    writer = NpyRowWriter(tmp_path, 7)
    for start in range(0, 1000, 300):
        writer.append(rows[start : start + 300])
    writer.finish(tmp_path / "e.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy", allow_pickle=False), rows)
    assert npy_shape(tmp_path / "e.npy") == ((1000, 7), 128)
    empty = NpyRowWriter(tmp_path, 7, name="empty")
    empty.finish(tmp_path / "empty.npy")
    assert np.load(tmp_path / "empty.npy", allow_pickle=False).shape == (0, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "empty.npy"]  # no partial file left

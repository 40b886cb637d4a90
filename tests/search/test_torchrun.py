"""dcml index build under torchrun (2 CPU processes, gloo): the ranks share the embedding, rank 0 builds one index."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dcml.cli import main
from dcml.search.index import Index

WORKER = Path(__file__).with_name("torchrun_worker.py")


def _torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_torchrun_build_equals_a_single_process_build(tiny_run, search_folder, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(search_folder / "test", images)
    (images / "zz-corrupt.png").write_bytes(b"not an image")  # sorted last: in rank 1's shard
    single, sharded, log = tmp_path / "single", tmp_path / "sharded", tmp_path / "log"
    log.mkdir()
    build = ["index", "build", "--model", str(tiny_run), "--images", str(images), "--no-progress"]
    assert main([*build, "--out", str(single)]) == 0
    result = _torchrun("cli", str(log), *build, "--out", str(sharded))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("indexed 24 images") == 1 and "skipped 1 unreadable image" in result.stdout  # rank 0 alone

    # Each rank embedded its contiguous half of the sorted list, the unreadable file in rank 1's.
    shards = [(log / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    expected, got = Index.load(single), Index.load(sharded)
    assert [len(shard) for shard in shards] == [12, 13] and shards[1][-1].endswith("zz-corrupt.png")
    assert shards[0] + shards[1][:-1] == expected.items.paths

    assert got.items.paths == expected.items.paths
    np.testing.assert_allclose(got.embeddings(), expected.embeddings(), rtol=0, atol=1e-5)
    queries = expected.embeddings()
    np.testing.assert_array_equal(got.search(queries, 1).ids, expected.search(queries, 1).ids)
    assert got.manifest["model"] == expected.manifest["model"] and got.manifest["items"] == 24
    # Nothing but the index: no shard file in it, no build folder beside it.
    assert sorted(p.name for p in got.folder.iterdir()) == sorted(p.name for p in expected.folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "log", "sharded", "single"]


def test_commands_that_replace_an_index_refuse_torchrun(tiny_run, search_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(tiny_run), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun tells every rank
    capsys.readouterr()
    assert main(["index", "add", str(out), "--images", str(search_folder / "val"), "--no-progress"]) == 2
    assert main(["index", "rebuild", str(out), "--kind", "ivf", "--out", str(tmp_path / "ivf")]) == 2
    err = capsys.readouterr().err
    assert err.count("runs as one process") == 2 and err.count("\n") == 2
    assert len(Index.load(out)) == 24 and not (tmp_path / "ivf").exists()


@pytest.mark.slow
def test_a_user_error_on_rank_0_stops_every_rank(tiny_run, search_folder, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    (tmp_path / "log").mkdir()
    # Only rank 0 checks --out; rank 1 must stop too rather than wait for it in a collective.
    result = _torchrun("cli", str(tmp_path / "log"), "index", "build", "--model", str(tiny_run), "--images",
                       str(search_folder / "test"), "--out", str(taken), "--no-progress", timeout=90)
    assert result.returncode != 0
    assert result.stderr.count("already exists; choose another --out") == 2  # one line from each rank
    assert not list((tmp_path / "log").iterdir())  # neither rank embedded anything
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]

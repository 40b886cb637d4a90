"""torchrun with 2 CPU processes (gloo): both ranks hold the same clusters and the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import tiny_overrides
from dcml.training.distributed import Distributed

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("count, world", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_cover_every_row_once_in_order(count, world):
    shards = [Distributed(rank=r, world_size=world).shard(count) for r in range(world)]
    assert np.array_equal(np.concatenate(shards), np.arange(count))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_a_plain_run_is_one_rank_doing_everything():
    single = Distributed()
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert not single.enabled and single.is_main
    assert np.array_equal(single.gather_rows(rows, 6), rows)
    assert single.broadcast({"a": 1}) == {"a": 1}
    assert single.on_main(lambda: 5) == 5


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_ranks_hold_identical_clusters_and_weights_after_a_step(tiny_folder, tmp_path):
    _torchrun("step", str(tmp_path), str(tiny_folder))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(rank0["assignment"], rank1["assignment"])
    assert torch.equal(rank0["usable"], rank1["usable"])
    assert len(torch.unique(rank0["assignment"])) == 2  # two learners
    assert rank0["frozen"] == [True, False, True]  # DDP rebuilt for each change of trainable parameters
    previous = rank0["initial"]
    for epoch, (state0, state1) in enumerate(zip(rank0["states"], rank1["states"])):
        moved = [k for k in state0 if state0[k].is_floating_point() and not torch.equal(state0[k], previous[k])]
        assert moved, f"epoch {epoch} changed no weight"
        backbone_moved = any(k.startswith("backbone.") for k in moved)
        assert backbone_moved != rank0["frozen"][epoch], epoch
        for key, value in state0.items():
            assert torch.equal(value, state1[key]), (epoch, key)
        previous = state0
    for beta0, beta1 in zip(rank0["beta"], rank1["beta"]):
        assert torch.equal(beta0, beta1)
    # Each rank ran its own share of the 4 batches; the log counts all of them.
    assert [r["batches"] for r in rank0["records"]] == [r["batches"] for r in rank1["records"]] == [4, 4, 4]
    # Feature passes are sharded: the shards partition the training split.
    shards = torch.cat([rank0["shard"], rank1["shard"]])
    assert torch.equal(shards, torch.arange(len(rank0["assignment"])))
    assert rank0["val"] == rank1["val"]


@pytest.mark.slow
def test_reused_training_features_are_pooled_over_the_ranks(tiny_folder, tmp_path):
    _torchrun("bank", str(tmp_path), str(tiny_folder))
    rank0, rank1 = (torch.load(tmp_path / f"bank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0["pooled"].nan_to_num(-7), rank1["pooled"].nan_to_num(-7))
    visited = (rank0["visits"] >= 0) | (rank1["visits"] >= 0)
    assert (rank0["visits"] >= 0).any() and (rank1["visits"] >= 0).any() and not visited.all()
    pooled = rank0["pooled"]
    assert not pooled[visited].isnan().any() and pooled[~visited].isnan().all()
    # The weights did not move, so each kept row is the image's test-time feature.
    torch.testing.assert_close(pooled[visited], rank0["fresh"][visited], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_training_writes_once_and_resumes(tiny_folder, tmp_path):
    out = tmp_path / "run"
    base = ["train", "--preset", "emoji", "--no-progress", "--out", str(out)]
    # The emoji preset's reuse_training_features stays on: the ranks pool their features.
    settings = [f"--set={item}" for item in tiny_overrides(tiny_folder) + ["clustering.reuse_training_features=true"]]
    first = _torchrun("cli", *base, *settings, "--epochs", "2", "--set", "schedule.conquer_epoch=1")
    assert first.stdout.count("selected epoch") == 1  # rank 0 alone reports
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1]
    _torchrun("cli", "train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["best.pt", "config.yaml", "last.pt", "log.jsonl",
                                                                               "metrics.json", "tensorboard"]
    assert len(torch.load(out / "last.pt", weights_only=False)["rng_per_rank"]) == 2

"""The micro-batcher: callers share forward passes up to max_batch, each gets its own rows, errors stay per batch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from dcml.serve.batcher import MicroBatcher


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _images(value: float, count: int) -> torch.Tensor:
    return torch.full((count, 1, 1, 2), value)


def test_jobs_queued_behind_a_running_pass_share_the_next_ones():
    release = threading.Event()
    calls: list[int] = []

    def embed(images: torch.Tensor) -> np.ndarray:
        calls.append(len(images))
        if len(calls) == 1:
            release.wait(10)  # keep the first pass running while the others queue up
        return images.flatten(1).numpy().copy()

    batcher = MicroBatcher(embed, max_batch=8, max_wait_s=0.0)
    try:
        first = batcher.submit(_images(0.0, 1))
        _wait_for(lambda: calls == [1])
        others = [batcher.submit(_images(float(i), 2)) for i in range(1, 6)]  # 10 images
        release.set()
        assert first.result(10).tolist() == [[0.0, 0.0]]
        for i, future in enumerate(others, start=1):
            assert future.result(10).tolist() == [[float(i)] * 2] * 2  # each caller gets its own rows
        assert calls == [1, 8, 2]  # four jobs filled one pass of max_batch; the fifth ran next
        assert batcher.stats.largest == 8 and batcher.stats.images == 11
    finally:
        release.set()
        batcher.close()


def test_a_lone_request_waits_no_longer_than_the_bound():
    batcher = MicroBatcher(lambda images: images.flatten(1).numpy(), max_batch=32, max_wait_s=0.05)
    try:
        started = time.monotonic()
        assert batcher.submit(_images(1.0, 1)).result(10).shape == (1, 2)
        assert time.monotonic() - started < 2.0
    finally:
        batcher.close()


def test_a_failing_pass_fails_its_callers_and_the_thread_lives_on():
    def embed(images: torch.Tensor) -> np.ndarray:
        if (images < 0).any():
            raise ValueError("bad batch")
        return images.flatten(1).numpy()

    batcher = MicroBatcher(embed, max_batch=4, max_wait_s=0.0)
    try:
        with pytest.raises(ValueError, match="bad batch"):
            batcher.submit(_images(-1.0, 1)).result(10)
        assert batcher.submit(_images(2.0, 1)).result(10).tolist() == [[2.0, 2.0]]
    finally:
        batcher.close()

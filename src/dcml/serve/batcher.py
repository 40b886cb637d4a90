"""Concurrent requests share forward passes: one model thread takes whatever images are waiting.

A forward pass of B images costs far less than B passes of one, so under load the server gets
faster per image instead of queueing single-image passes. The model thread takes every job
already queued, then waits at most ``max_wait_s`` for more (never past ``max_batch`` images):
a lone request pays that short wait and nothing else, and while a batch runs the next one fills.
One thread owns the model, so requests never run torch concurrently against each other.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

Embed = Callable[[torch.Tensor], np.ndarray]


@dataclass
class _Job:
    images: torch.Tensor  # B x 3 x S x S, already transformed
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """What the model thread has done (read by /health and the tests)."""

    batches: int = 0
    images: int = 0
    largest: int = 0


class MicroBatcher:
    """``submit(images)`` -> a Future of their embedding rows; batches are formed across callers."""

    def __init__(self, embed: Embed, *, max_batch: int = 32, max_wait_s: float = 0.002):
        self._embed = embed
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.stats = BatchStats()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dcml-serve-model", daemon=True)
        self._thread.start()

    def submit(self, images: torch.Tensor) -> Future:
        if self._closed:
            raise RuntimeError("the model thread has stopped")
        job = _Job(images)
        self._jobs.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Finish the jobs already queued, then stop the thread."""
        self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the model thread
    def _loop(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch, stop = self._gather(first)
            self._run(batch)
            if stop:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` plus the jobs that arrive within the wait, up to max_batch images; True if close() was seen."""
        batch, count = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._jobs.get_nowait() if remaining <= 0 else self._jobs.get(timeout=remaining)
            except queue.Empty:
                break
            if job is None:
                return batch, True
            if count + len(job.images) > self.max_batch:
                self._run(batch)  # the newcomer would overflow: run what we have, start over from it
                batch, count = [job], len(job.images)
                deadline = time.monotonic() + self.max_wait_s
                continue
            batch.append(job)
            count += len(job.images)
        return batch, False

    def _run(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            rows = self._embed(torch.cat([job.images for job in live]))
        except Exception as error:  # noqa: BLE001 - handed to every waiting caller; the thread lives on
            for job in live:
                job.future.set_exception(error)
            return
        self.stats.batches += 1
        self.stats.images += len(rows)
        self.stats.largest = max(self.stats.largest, len(rows))
        start = 0
        for job in live:
            job.future.set_result(rows[start : start + len(job.images)])
            start += len(job.images)

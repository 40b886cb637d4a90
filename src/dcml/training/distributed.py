"""Multi-GPU and multi-node training through ``torchrun`` (PyTorch DistributedDataParallel).

``torchrun --nproc_per_node N -m dcml train ...`` starts N copies of the command and tells each its
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. Everything the trainer needs from the process group is
in :class:`Distributed`: which rank am I, my share of a split, gather rows from every rank,
share an object from rank 0. In a plain (single-process) run every method is a no-op, so the trainer
has one code path.

Who does what in a run of N ranks: every rank draws its own share of each epoch's batches (the
cluster sampler deals batch i to rank i mod N) and DDP averages the gradients; feature passes over a
split (re-clustering, validation, test) are cut into N contiguous shards and gathered; k-means and
the metrics run on rank 0 only and their result is broadcast, so every rank trains with the same
clusters; only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from dcml.errors import UserError

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run (``world_size == 1``: a plain run, every method a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    collective_device: torch.device = torch.device("cpu")  # where tensors must live for the backend

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ splitting work
    def _shard_bounds(self, count: int) -> np.ndarray:
        return np.linspace(0, count, self.world_size + 1).round().astype(np.int64)

    def shard(self, count: int) -> np.ndarray:
        """This rank's contiguous share of ``range(count)`` (shares differ by at most one when uneven)."""
        bounds = self._shard_bounds(count)
        return np.arange(bounds[self.rank], bounds[self.rank + 1])

    def gather_rows(self, local: np.ndarray, count: int) -> np.ndarray:
        """Concatenate every rank's :meth:`shard` rows, in rank order, on every rank."""
        if not self.enabled:
            return local
        import torch.distributed as dist

        bounds = self._shard_bounds(count)
        longest = int(np.diff(bounds).max())
        padded = torch.zeros((longest, *local.shape[1:]), dtype=torch.from_numpy(local[:0]).dtype, device=self.collective_device)
        padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local)).to(self.collective_device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return np.concatenate([part[: hi - lo].cpu().numpy() for part, lo, hi in zip(parts, bounds[:-1], bounds[1:])])

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.collective_device)
        return box[0]

    def all_gather_objects(self, value: Any) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def average_gradients(self, parameters) -> None:
        """Average the gradients of parameters DDP does not manage (the loss's betas) across ranks."""
        if not self.enabled:
            return
        import torch.distributed as dist

        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_reduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise ``op`` ("sum", "max" or "min") of every rank's ``array``, on every rank."""
        if not self.enabled:
            return array
        import torch.distributed as dist

        # A copy: all_reduce works in place, and the caller's array must keep this rank's values.
        tensor = torch.from_numpy(np.array(array, copy=True)).to(self.collective_device)
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return tensor.cpu().numpy()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (so every rank takes the same branch)."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce(np.array([int(flag)], dtype=np.int64), "max")[0])

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only and share its result, or its UserError, with every rank.

        The other ranks would otherwise wait in their next collective until the timeout when rank 0
        stops on a user error (a missing checkpoint, an occupied output folder).
        """
        if not self.enabled:
            return work()
        outcome: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                outcome = (True, work())
            except UserError as error:
                outcome = (False, str(error))
        ok, value = self.broadcast(outcome)
        if not ok:
            raise UserError(value)
        return value


SINGLE = Distributed()


def resolve_backend(device_name: str, backend: str = "auto") -> tuple[str, bool]:
    """(process-group backend, whether ranks use CUDA) for a configuration's device and backend."""
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available (use device=cpu)")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise UserError("runtime.distributed_backend=nccl needs CUDA GPUs; use gloo (or auto) on the CPU")
    return backend, use_cuda


def setup(device_name: str, backend: str = "auto", timeout_minutes: int = 60) -> Distributed:
    """Join the process group torchrun describes in the environment (once); a plain run gets :data:`SINGLE`.

    ``device_name`` is the configuration's device: under torchrun with CUDA each rank takes GPU
    ``LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        return SINGLE
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend, use_cuda = resolve_backend(device_name, backend)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    collective = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, collective_device=collective)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

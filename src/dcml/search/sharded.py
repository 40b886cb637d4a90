"""Embedding a collection under ``torchrun``: every rank embeds its shard, rank 0 assembles one index.

``torchrun --nproc_per_node 8 -m dcml index build --model RUN --images DIR --out INDEX --device cuda``
starts one process per GPU, the launcher training uses. Each rank takes its contiguous share of the
sorted image list (:meth:`~dcml.training.distributed.Distributed.shard`) and streams its
embeddings to a file of its own in rank 0's build folder; rank 0 embeds the first share straight
into the index's embeddings, then appends the other ranks' files in rank order, so the rows are in
the list's order as in a single-process build, and builds the one index. No rank holds more than
a batch of embeddings in memory, and the other ranks write nothing anywhere else.

On several nodes the build folder (beside ``--out``) must be on a file system every node sees,
as training's ``--out`` must.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from dcml.errors import UserError
from dcml.search.storage import NpyRowWriter, iter_npy_rows, npy_shape

T = TypeVar("T")


def every_rank(dist, work: Callable[[], T]) -> T:
    """``work()`` on every rank; a UserError on any rank stops every rank with that message.

    Without it, a rank stopped by a user error (say, a folder one node cannot read) would leave the
    others waiting in their next collective until the process group's timeout."""
    if not dist.enabled:
        return work()
    failure, own = None, None
    try:
        value = work()
    except UserError as error:
        value, failure, own = None, str(error), error
    failures = [message for message in dist.all_gather_objects(failure) if message is not None]
    if own is not None:
        raise own
    if failures:
        raise UserError(failures[0])
    return value


def check_same_list(dist, paths: Sequence[str], source: str) -> None:
    """Every rank must shard the same list, or rows would be missed or doubled."""
    if not dist.enabled:
        return
    digest = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
    if len(set(dist.all_gather_objects(digest))) > 1:
        raise UserError(f"the ranks found different images in {source}; under torchrun every rank must see the same files")


def _shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.npy"


def embed_sharded(dist, builder, model, paths: Sequence[str]) -> np.ndarray:
    """Embed ``paths`` (each rank its shard) into ``builder``: rank 0's IndexBuilder, None elsewhere.

    Returns the readable mask of all ``paths`` on every rank; afterwards rank 0's builder holds the
    L2-normalised rows of every readable path, in path order."""
    from dcml.model_runner import l2_normalize
    from dcml.training.distributed import Distributed

    mine = [paths[i] for i in dist.shard(len(paths))]
    folder = Path(dist.broadcast(str(builder.folder) if dist.is_main else None))

    def embed() -> np.ndarray:
        if dist.is_main:
            return model.embed_paths_tolerant(mine, sink=lambda rows: builder.append(l2_normalize(rows))).readable
        if not folder.is_dir():
            raise UserError(f"rank {dist.rank} cannot see the build folder {folder}: on several nodes the folder of "
                            "--out must be on a file system every node shares")
        writer = NpyRowWriter(folder, model.dimension, name=f"shard-{dist.rank:05d}")
        readable = model.embed_paths_tolerant(mine, sink=lambda rows: writer.append(l2_normalize(rows))).readable
        writer.finish(folder / _shard_file(dist.rank))
        return readable

    readable = every_rank(dist, embed)
    # Gathering the masks also waits for every rank: their files are complete once it returns.
    readable = dist.gather_rows(readable.astype(np.uint8), len(paths)).astype(bool)
    if dist.is_main:
        for rank in range(1, dist.world_size):
            rows = Distributed(rank=rank, world_size=dist.world_size).shard(len(paths))
            _append_shard(builder, folder / _shard_file(rank), int(readable[rows].sum()), rank)
    return readable


def _append_shard(builder, path: Path, expected: int, rank: int) -> None:
    if not path.is_file():
        raise UserError(f"rank {rank}'s embeddings never reached {path.parent}: on several nodes the folder of --out "
                        "must be on a file system every node shares")
    (count, _), _ = npy_shape(path)
    if count != expected:
        raise UserError(f"rank {rank} wrote {count} embeddings for the {expected} images it read")
    for chunk in iter_npy_rows(path):
        builder.append(chunk)
    path.unlink()  # appended: its disk space back before the index is built

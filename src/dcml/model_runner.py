"""The one code path that runs a model over images: batches in, one output row per input, in order.

Training's feature passes, ``dcml evaluate``, ``dcml zero-shot``, ``dcml embed`` and the search
index all embed through :func:`run_over_batches`, so precision, memory layout and eval-mode handling
cannot drift apart between them. What a "forward" is (pooled backbone features, the trained
embedding, a pass over cached feature maps) is the caller's; this module only schedules it.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcml.data.images import ImageFolderSplit, load_rgb
from dcml.data.records import Split
from dcml.errors import DatasetError, UserError

#: ``forward(device_batch) -> rows``: maps a batch already on the device to a B x D output.
Forward = Callable[[torch.Tensor], torch.Tensor]
#: ``sink(rows)``: receives each batch's rows (float32, on the CPU) instead of keeping them in memory.
Sink = Callable[[np.ndarray], None]


def run_over_batches(
    batches: Iterable,
    forward: Forward,
    *,
    device: str | torch.device = "cpu",
    model: nn.Module | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    channels_last: bool = True,
    total: int | None = None,
    progress: bool = False,
    desc: str = "embed",
    sink: Sink | None = None,
    width: int = 0,
) -> np.ndarray | int:
    """Run ``forward`` over every batch, under ``torch.inference_mode()``, and collect its rows in order.

    ``batches`` yields input tensors, or tuples / lists whose first item is the input tensor (what a
    DataLoader over :class:`ImageFolderSplit` or the trainer's ``eval_batches`` yields). Each input
    is moved to ``device``; 4-D inputs (images, feature maps) are made channels-last, which makes
    oneDNN and cuDNN convolutions faster without changing the model. ``model`` (optional) is put in
    eval mode for the pass and its train/eval mode restored afterwards, also on errors.
    ``autocast`` is a factory of the context each forward runs in (e.g. bf16 on CUDA); outputs are
    converted to float32 whatever it computes in. ``total`` (number of input rows) sizes the
    progress bar, shown on stderr when ``progress``.

    Returns the rows as one float32 N x D array (N x ... for feature maps; ``N x width`` when there
    were no batches), or, with
    ``sink``, hands each batch's rows to it and returns the number of rows.
    """
    from tqdm import tqdm

    device = torch.device(device)
    autocast = autocast or contextlib.nullcontext
    was_training = model.training if model is not None else None
    chunks: list[np.ndarray] = []
    count = 0
    worker_failure: UserError | None = None
    if model is not None:
        model.eval()
    try:
        with torch.inference_mode(), tqdm(total=total, unit="img", desc=desc, disable=not progress, leave=False) as bar:
            for batch in batches:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                inputs = inputs.to(device, non_blocking=True)
                if channels_last and inputs.ndim == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                with autocast():
                    output = forward(inputs)
                if output.ndim < 2 or output.shape[0] != inputs.shape[0]:  # rows, or per-input feature maps
                    raise RuntimeError(f"forward returned shape {tuple(output.shape)} for a batch of {inputs.shape[0]} inputs")
                rows = output.float().cpu().numpy()
                if sink is None:
                    chunks.append(rows)
                else:
                    sink(rows)
                count += len(rows)
                bar.update(len(rows))
    except UserError as error:
        # An error raised in a DataLoader worker comes back with the worker's traceback in its
        # message; keep its last line so the CLI still prints one line.
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        if len(lines) <= 1:
            raise
        worker_failure = type(error)(_strip_exception_name(lines[-1], type(error)))
        # The error sits in a reference cycle with the loader's frames; clearing them lets worker
        # processes shut down now rather than (slowly) in the garbage collector.
        traceback.clear_frames(error.__traceback__)
    finally:
        if model is not None:
            model.train(was_training)
    if worker_failure is not None:
        raise worker_failure  # outside the except block: no reference to the loader's frames
    if sink is not None:
        return count
    if not chunks:
        return np.zeros((0, width), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def check_loader_settings(batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"number of workers must be >= 0, got {num_workers}")


def split_loader(split: Split, transform, batch_size: int, num_workers: int, device: torch.device):
    """Test-transform batches ``(images, labels, indices)`` of ``split``, in split order."""
    check_loader_settings(batch_size, num_workers)
    return torch.utils.data.DataLoader(
        ImageFolderSplit(split, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )


class ImagePaths(torch.utils.data.Dataset):
    """Image files as ``(tensor, readable)``; an unreadable file gives a zero tensor and ``False``
    instead of an exception, so one bad file does not stop a batch (callers drop or report it)."""

    def __init__(self, paths: Sequence[str | Path], transform, shape: tuple[int, ...]):
        self.paths = list(paths)
        self.transform = transform
        self.shape = shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(self.paths[index])), True
        except DatasetError:
            return torch.zeros(self.shape), False


def paths_loader(paths: Sequence[str | Path], transform, shape: tuple[int, ...], batch_size: int, num_workers: int,
                 device: torch.device):
    """Batches ``(images, readable)`` of ``paths`` in order (see :class:`ImagePaths`)."""
    check_loader_settings(batch_size, num_workers)
    return torch.utils.data.DataLoader(
        ImagePaths(paths, transform, shape), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )


def extract_embeddings(
    model: nn.Module,
    split: Split,
    transform,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every image of ``split`` with ``model`` (``model(images) -> B x D``); row ``i`` is ``split.paths[i]``.

    ``transform`` turns a PIL RGB image into the model's input tensor (e.g. a backbone's
    ``test_transform()``). The model is moved to ``device`` and runs through
    :func:`run_over_batches`. Returns ``(embeddings float32 [N, D], labels int64 [N])``; embeddings
    are the raw model outputs (not L2-normalised).
    """
    device = torch.device(device)
    loader = split_loader(split, transform, batch_size, num_workers, device)
    model.to(device)
    embeddings = run_over_batches(loader, model, device=device, model=model, total=split.num_images,
                                  progress=progress, desc=f"embed {split.name}")
    return embeddings, np.asarray(split.labels, dtype=np.int64)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _strip_exception_name(line: str, exception_type: type) -> str:
    """``"dcml.errors.DatasetError: cannot read x"`` -> ``"cannot read x"``."""
    head, sep, rest = line.partition(": ")
    if sep and head.rsplit(".", 1)[-1] == exception_type.__name__:
        return rest
    return line

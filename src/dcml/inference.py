"""The trained-model boundary: ``dcml.load_model(RUN)`` gives the embedding evaluation scores, outside the trainer.

A checkpoint holds every weight (backbone included) and the run's configuration, so the model is
rebuilt with the backbone's pretrained weights switched off (no ImageNet file, no network), the
checkpoint's state dict loaded strictly, and the run's test-time transform and image size. What it
returns for an image is the normalised concatenation of the active learners, computed by the same
forward as the trainer's feature pass and through :func:`dcml.model_runner.run_over_batches`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dcml.data.records import Split
from dcml.model_runner import paths_loader, run_over_batches, split_loader
from dcml.errors import UserError

#: The checkpoint ``load_model(RUN_DIR)`` prefers: the epoch model selection picked.
PREFERRED_CHECKPOINTS = ("best.pt", "last.pt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def resolve_checkpoint(source: str | Path) -> Path:
    """A run folder's ``best.pt`` (else ``last.pt``), or ``source`` itself when it is a file."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in PREFERRED_CHECKPOINTS:
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path} holds no checkpoint ({' or '.join(PREFERRED_CHECKPOINTS)}); is it a dcml run folder?")
    if not path.exists():
        raise UserError(f"model {path} not found (expected a run folder or a .pt checkpoint)")
    return path


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, hidden entries skipped), sorted by path."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found")
    found = [
        path for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    if not found:
        raise UserError(f"image folder {folder} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    return sorted(found)


@dataclass(frozen=True)
class PathEmbeddings:
    """Embeddings of the readable files among ``paths``: ``embeddings[i]`` is ``paths[readable][i]``."""

    embeddings: np.ndarray
    readable: np.ndarray  # bool, one per input path

    @property
    def num_unreadable(self) -> int:
        return int((~self.readable).sum())


class TrainedModel:
    """A trained dcml model for inference: eval mode, the run's test transform, the evaluated embedding.

    ``embed`` accepts a file path, a folder, a PIL image, a :class:`~dcml.data.records.Split`, or a
    sequence of paths / PIL images, and returns L2-normalised float32 rows in input order.
    """

    def __init__(self, model, config, *, active_learners: int, checkpoint: Path, sha256: str, device: torch.device,
                 batch_size: int, num_workers: int = 0, progress: bool = False):
        from dcml.training.device import autocast_for

        self.model = model
        self.config = config
        self.active_learners = int(active_learners)
        self.checkpoint = checkpoint
        self.sha256 = sha256
        self.device = device
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.progress = progress
        self.image_size = int(config.data.image_size)
        self.transform = model.backbone.test_transform(self.image_size)
        self.autocast = autocast_for(config.runtime.precision, device)
        self.dimension = int(model.head.dim)

    def __repr__(self) -> str:
        return (f"TrainedModel({self.config.model.backbone}, dim={self.dimension}, learners={self.active_learners}, "
                f"image_size={self.image_size}, checkpoint={str(self.checkpoint)!r})")

    # ------------------------------------------------------------------ the forward
    def forward(self, images: torch.Tensor, cached: bool = False) -> torch.Tensor:
        """The trainer's evaluated embedding: features -> head (under autocast) -> full embedding in float32.

        Call inside ``self.autocast()``, as :func:`run_over_batches` does."""
        raw = self.model.head(self.model.features(images, cached=cached))
        # The trainer assembles the full embedding outside autocast, in float32; so does this.
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.model.head.full_embedding(raw.float(), self.active_learners)

    def _run(self, batches, total: int, desc: str, sink=None):
        return run_over_batches(batches, self.forward, device=self.device, model=self.model, autocast=self.autocast,
                                total=total, progress=self.progress, desc=desc, sink=sink, width=self.dimension)

    # ------------------------------------------------------------------ inputs
    def embed_split(self, split: Split) -> np.ndarray:
        loader = split_loader(split, self.transform, self.batch_size, self.num_workers, self.device)
        return self._run(loader, split.num_images, f"embed {split.name}")

    def embed_tensors(self, images: torch.Tensor) -> np.ndarray:
        """Embed already transformed images (B x 3 x S x S)."""
        batches = (images[start : start + self.batch_size] for start in range(0, len(images), self.batch_size))
        return self._run(batches, len(images), "embed")

    def embed_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        tensors = [self.transform(image.convert("RGB")) for image in images]
        if not tensors:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self.embed_tensors(torch.stack(tensors))

    def embed_paths_tolerant(self, paths: Sequence[str | Path], sink=None) -> PathEmbeddings:
        """Embed image files; unreadable ones are left out and flagged instead of raising.

        With ``sink``, the rows of the readable files go to it batch by batch (bounded memory) and
        ``embeddings`` is empty."""
        shape = (3, self.image_size, self.image_size)
        loader = paths_loader(paths, self.transform, shape, self.batch_size, self.num_workers, self.device)
        flags: list[np.ndarray] = []

        def batches():
            for images, readable in loader:
                flags.append(readable.numpy().astype(bool))
                yield images

        kept: list[np.ndarray] = []

        def keep_readable(rows: np.ndarray) -> None:
            rows = rows[flags[-1]]
            if sink is None:
                kept.append(rows)
            elif len(rows):
                sink(rows)

        self._run(batches(), len(paths), "embed", sink=keep_readable)
        readable = np.concatenate(flags) if flags else np.zeros(0, dtype=bool)
        embeddings = np.concatenate(kept) if kept else np.zeros((0, self.dimension), dtype=np.float32)
        return PathEmbeddings(np.ascontiguousarray(embeddings, dtype=np.float32), readable)

    def embed_paths(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Embed image files in order; an unreadable file is a one-line error naming it."""
        result = self.embed_paths_tolerant(paths)
        if result.num_unreadable:
            first = paths[int(np.flatnonzero(~result.readable)[0])]
            from dcml.data.images import load_rgb

            load_rgb(first)  # raises the reader's own one-line reason
            raise UserError(f"cannot read image {first}")
        return result.embeddings

    def embed(self, images) -> np.ndarray:
        """Embeddings (N x D, L2-normalised float32) of a path, folder, PIL image, Split or a sequence of them."""
        if isinstance(images, Split):
            return self.embed_split(images)
        if isinstance(images, Image.Image):
            return self.embed_pil([images])
        if isinstance(images, (str, Path)):
            path = Path(images).expanduser()
            return self.embed_paths(list_images(path) if path.is_dir() else [path])
        if isinstance(images, torch.Tensor):
            return self.embed_tensors(images if images.ndim == 4 else images[None])
        items = list(images) if isinstance(images, Iterable) else [images]
        if all(isinstance(item, Image.Image) for item in items):
            return self.embed_pil(items)
        if all(isinstance(item, (str, Path)) for item in items):
            return self.embed_paths([Path(item).expanduser() for item in items])
        raise TypeError("embed() takes paths, a folder, PIL images, a tensor batch or a Split")

    def embed_dataset(self, name: str | None = None, root: str | Path | None = None, split: str = "test") -> tuple[np.ndarray, Split]:
        """Embed a split of a dataset (default: the run's own dataset and root)."""
        from dcml.data import load_dataset

        d = self.config.data
        dataset_name = name or d.dataset
        dataset_root = root if root is not None else (d.root if name is None or name == d.dataset else None)
        dataset = load_dataset(dataset_name, Path(dataset_root).expanduser() if dataset_root else None)
        chosen = dataset.split(split)
        return self.embed_split(chosen), chosen


def _rebuild_config(checkpoint: dict, path: Path):
    """The run's configuration, with the backbone's pretrained weights off (the checkpoint holds them all)."""
    from dcml.config import load_config

    try:
        return load_config(None, ["model.pretrained=false", "model.weights=null"], base=checkpoint["config"])
    except UserError as error:
        raise UserError(f"checkpoint {path} holds a configuration this dcml does not accept: {error}") from None


def load_model(source: str | Path, device: str | torch.device = "cpu", *, batch_size: int | None = None,
               num_workers: int = 0, progress: bool = False) -> TrainedModel:
    """Load a trained run (its folder: ``best.pt``, else ``last.pt``) or a checkpoint file for inference.

    Needs nothing but the checkpoint: no ImageNet weights, no dataset, no network. Raises a one-line
    :class:`~dcml.errors.UserError` for a missing path, a damaged file or a file that is not a
    dcml checkpoint. ``batch_size`` defaults to the trainer's feature-pass batch
    (``runtime.feature_batch_size``, else ``data.eval_batch_size``).
    """
    from dcml.models.embedding_model import build_model
    from dcml.training.checkpoint import load_checkpoint

    path = resolve_checkpoint(source)
    checkpoint = load_checkpoint(path)
    config = _rebuild_config(checkpoint, path)
    device = _device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random initialisation is about to be overwritten
        model = build_model(config)
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as error:
        raise UserError(f"checkpoint {path} does not fit the model its config describes: {str(error).strip().splitlines()[0]}") from None
    model.to(device).eval()
    if config.runtime.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    active = checkpoint.get("active_learners") or config.clustering.learners
    batch = batch_size or config.runtime.feature_batch_size or config.data.eval_batch_size
    return TrainedModel(model, config, active_learners=int(active), checkpoint=path, sha256=file_sha256(path),
                        device=device, batch_size=batch, num_workers=num_workers, progress=progress)


def _device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"unusable device {name!r}: {str(error).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"unusable device {name!r}: CUDA is not available")
    return device

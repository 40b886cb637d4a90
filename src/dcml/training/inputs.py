"""Where the trainer's inputs come from: decoded images, or the cached output of the frozen units.

Both sources answer the same two questions: the batches of one training epoch (images or cached
tensors, labels, learner id) and the inputs of a whole split for embedding, in split order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dcml.data.images import load_rgb
from dcml.data.records import Split
from dcml.errors import DatasetError


class _TrainImages(torch.utils.data.Dataset):
    """Items are ``(index, learner)`` pairs from the cluster sampler: the learner rides along."""

    def __init__(self, split: Split, labels: np.ndarray, transform):
        self.split, self.labels, self.transform = split, labels, transform

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, item):
        index, learner = item
        image = self.transform(load_rgb(self.split.paths[index]))
        return image, int(self.labels[index]), int(index), int(learner)


class _EvalImages(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform, indices: np.ndarray | None = None):
        self.split, self.transform = split, transform
        self.indices = np.arange(split.num_images) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position):
        index = int(self.indices[position])
        return self.transform(load_rgb(self.split.paths[index])), index


def _loader_options(num_workers: int, device: torch.device) -> dict:
    options = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        options["persistent_workers"] = False  # one loader per epoch: workers would outlive it
    return options


class ImageInputs:
    """Decode and transform images every time (augmentation possible)."""

    cached = False

    def __init__(self, train_transform, test_transform, num_workers: int, eval_batch_size: int, device: torch.device):
        self.train_transform, self.test_transform = train_transform, test_transform
        self.num_workers, self.eval_batch_size, self.device = num_workers, eval_batch_size, device

    def train_batches(self, split: Split, labels: np.ndarray, batch_sampler) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        loader = torch.utils.data.DataLoader(
            _TrainImages(split, labels, self.train_transform), batch_sampler=batch_sampler, **_loader_options(self.num_workers, self.device)
        )
        for images, batch_labels, indices, learners in loader:
            yield images, batch_labels, indices, int(learners[0])

    def eval_batches(self, split: Split, indices: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Test-transform inputs of ``split`` (or of its images ``indices``), in order, with their indices."""
        loader = torch.utils.data.DataLoader(
            _EvalImages(split, self.test_transform, indices), batch_size=self.eval_batch_size, shuffle=False,
            **_loader_options(self.num_workers, self.device),
        )
        yield from loader


class CachedInputs:
    """The frozen lower units' outputs for every image of every split, computed once.

    Faithful: with no training augmentation the frozen units see the same test-transform input in
    every epoch, so caching their output computes the same function as running them each time (up
    to float rounding, which depends on how many images a convolution processes at once).
    """

    cached = True

    def __init__(self, tensors: dict[str, torch.Tensor], eval_batch_size: int):
        self.tensors = tensors
        self.eval_batch_size = eval_batch_size

    @classmethod
    def build(cls, model, splits: dict[str, Split], test_transform, num_workers: int, eval_batch_size: int,
              device: torch.device, progress: bool = True) -> "CachedInputs":
        from tqdm import tqdm

        images = ImageInputs(None, test_transform, num_workers, eval_batch_size, device)
        tensors = {}
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for name, split in splits.items():
                    parts = []
                    with tqdm(total=split.num_images, unit="img", desc=f"cache {name}", disable=not progress, leave=False) as bar:
                        for batch, _ in images.eval_batches(split):
                            batch = batch.to(device).contiguous(memory_format=torch.channels_last)
                            parts.append(model.frozen_forward(batch).float().cpu())
                            bar.update(len(batch))
                    if not parts:
                        raise DatasetError(f"split {name!r} has no images")
                    tensors[name] = torch.cat(parts).contiguous(memory_format=torch.channels_last)
        finally:
            model.train(was_training)
        return cls(tensors, eval_batch_size)

    def train_batches(self, split: Split, labels: np.ndarray, batch_sampler):
        source = self.tensors[split.name]
        labels_tensor = torch.as_tensor(labels)
        for batch in batch_sampler:
            indices = torch.as_tensor([index for index, _ in batch], dtype=torch.long)
            yield source[indices], labels_tensor[indices], indices, int(batch[0][1])

    def eval_batches(self, split: Split, indices: np.ndarray | None = None):
        source = self.tensors[split.name]
        order = torch.arange(len(source)) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
        for start in range(0, len(order), self.eval_batch_size):
            chunk = order[start : start + self.eval_batch_size]
            yield (source[start : start + len(chunk)] if indices is None else source[chunk]), chunk

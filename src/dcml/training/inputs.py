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


def _loader_options(num_workers: int, device: torch.device, seed: int = 0) -> dict:
    # An own generator: a DataLoader otherwise draws its workers' base seed from torch's global RNG,
    # which would make the training randomness (dropout, negative sampling) depend on how many
    # loaders ran, e.g. differ between image and cached inputs, or across a resume.
    options = {"num_workers": num_workers, "pin_memory": device.type == "cuda",
               "generator": torch.Generator().manual_seed(seed)}
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
        # Workers' augmentation seeds follow the sampler's (seed, epoch), so they repeat on resume.
        seed = int(np.random.SeedSequence([getattr(batch_sampler, "seed", 0), getattr(batch_sampler, "epoch", 0)]).generate_state(1)[0])
        loader = torch.utils.data.DataLoader(
            _TrainImages(split, labels, self.train_transform), batch_sampler=batch_sampler,
            **_loader_options(self.num_workers, self.device, seed),
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
    """The frozen lower units' outputs for every image of a split, computed on first use.

    Faithful: with no training augmentation the frozen units see the same test-transform input in
    every epoch, so caching their output computes the same function as running them each time (up
    to float rounding, which depends on how many images a convolution processes at once).
    """

    cached = True

    def __init__(self, model, test_transform, num_workers: int, eval_batch_size: int, device: torch.device,
                 progress: bool = True):
        self._model = model
        self._images = ImageInputs(None, test_transform, num_workers, eval_batch_size, device)
        self.eval_batch_size = eval_batch_size
        self.device = device
        self.progress = progress
        self.tensors: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _key(split: Split) -> tuple:
        # Carved validation splits share names across seeds: the images themselves identify a split.
        return split.name, split.num_images, hash(split.paths)

    def tensor(self, split: Split) -> torch.Tensor:
        key = self._key(split)
        if key not in self.tensors:
            self.tensors[key] = self._compute(split)
        return self.tensors[key]

    def _compute(self, split: Split) -> torch.Tensor:
        from tqdm import tqdm

        model = self._model
        was_training = model.training
        model.eval()
        parts = []
        try:
            with torch.inference_mode(), tqdm(total=split.num_images, unit="img", desc=f"cache {split.name}",
                                              disable=not self.progress, leave=False) as bar:
                for batch, _ in self._images.eval_batches(split):
                    batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
                    parts.append(model.frozen_forward(batch).float().cpu())
                    bar.update(len(batch))
        finally:
            model.train(was_training)
        if not parts:
            raise DatasetError(f"split {split.name!r} has no images")
        return torch.cat(parts).contiguous(memory_format=torch.channels_last)

    def train_batches(self, split: Split, labels: np.ndarray, batch_sampler):
        source = self.tensor(split)
        labels_tensor = torch.as_tensor(labels)
        for batch in batch_sampler:
            indices = torch.as_tensor([index for index, _ in batch], dtype=torch.long)
            yield source[indices], labels_tensor[indices], indices, int(batch[0][1])

    def eval_batches(self, split: Split, indices: np.ndarray | None = None):
        source = self.tensor(split)
        order = torch.arange(len(source)) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
        for start in range(0, len(order), self.eval_batch_size):
            chunk = order[start : start + self.eval_batch_size]
            yield (source[start : start + len(chunk)] if indices is None else source[chunk]), chunk

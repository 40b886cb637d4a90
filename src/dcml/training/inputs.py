"""Where the trainer's inputs come from: decoded images, or the cached output of the frozen units.

Both sources answer the same two questions: the batches of one training epoch (images or cached
tensors, labels, learner id) and the inputs of a whole split for embedding, in split order.
"""

from __future__ import annotations

import contextlib

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dcml.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_rgb
from dcml.data.records import Split
from dcml.errors import DatasetError


class _TrainImages(torch.utils.data.Dataset):
    """Items are ``(index, learner, seed)`` triples: the learner rides along, the seed drives the augmentation."""

    def __init__(self, split: Split, labels: np.ndarray, transform, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.split, self.labels, self.transform, self.max_pixels = split, labels, transform, max_pixels

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, item):
        index, learner, seed = item
        image = seeded_transform(self.transform, load_rgb(self.split.paths[index], max_pixels=self.max_pixels), seed)
        return image, int(self.labels[index]), int(index), int(learner)


def seeded_transform(transform, image, seed: int):
    """``transform(image)`` with torch's generator seeded by ``seed`` (and restored afterwards).

    The crop and flip of an image depend only on its seed, not on which worker process draws it or
    how long that worker has lived: results do not depend on num_workers or on persistent workers,
    and a resumed run repeats the augmentation exactly.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return transform(image)


def _item_seeds(entropy: list[int], count: int) -> np.ndarray:
    """``count`` per-item seeds from ``entropy`` (63-bit, so torch.manual_seed takes them)."""
    return np.random.SeedSequence(entropy).generate_state(count, dtype=np.uint64) >> np.uint64(1)


class _AugmentedImages(torch.utils.data.Dataset):
    """One augmented view of every image of a split, in order: ``(tensor, index)`` like :class:`_EvalImages`."""

    def __init__(self, split: Split, transform, seeds: np.ndarray, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.split, self.transform, self.seeds, self.max_pixels = split, transform, seeds, max_pixels

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, index):
        image = load_rgb(self.split.paths[index], max_pixels=self.max_pixels)
        return seeded_transform(self.transform, image, int(self.seeds[index])), index


class _EvalImages(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform, indices: np.ndarray | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.split, self.transform, self.max_pixels = split, transform, max_pixels
        self.indices = np.arange(split.num_images) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position):
        index = int(self.indices[position])
        return self.transform(load_rgb(self.split.paths[index], max_pixels=self.max_pixels)), index


class SeededEpoch:
    """The long-lived training loader's batch sampler: the current epoch's cluster sampler, every
    item paired with its augmentation seed (a function of seed, epoch, rank and position only)."""

    def __init__(self) -> None:
        self.sampler = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        s = self.sampler
        entropy = [int(s.seed), int(s.epoch)]
        if s.num_replicas > 1:
            entropy.append(int(s.rank))
        # Positions count from the epoch's first batch, also when a resumed epoch starts later.
        for position, batch in enumerate(s, start=s.first_batch):
            seeds = _item_seeds(entropy + [position], len(batch))
            yield [(index, learner, int(seed)) for (index, learner), seed in zip(batch, seeds)]


@dataclass(frozen=True)
class LoaderSettings:
    """How the DataLoaders run (none of it changes which images or augmentations a batch holds)."""

    num_workers: int = 0
    pin_memory: bool = False  # only meaningful on CUDA
    persistent_workers: bool = False  # the training loader's workers live across epochs
    prefetch_factor: int = 2
    # Not how the loaders run but what their images may be: the decompression-bomb limit (data.max_image_pixels).
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def options(self, seed: int = 0, persistent: bool = False) -> dict:
        # An own generator: a DataLoader otherwise draws its workers' base seed from torch's global
        # RNG, which would make the training randomness (dropout, negative sampling) depend on how
        # many loaders ran.
        options = {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                   "generator": torch.Generator().manual_seed(seed)}
        if self.num_workers > 0:
            options["persistent_workers"] = persistent and self.persistent_workers
            options["prefetch_factor"] = self.prefetch_factor
        return options


class ImageInputs:
    """Decode and transform images every time (augmentation possible).

    The training loader is built once and lives for the whole run (with persistent workers, its
    worker processes too); each epoch only swaps the batch sampler it reads from.
    """

    cached = False

    def __init__(self, train_transform, test_transform, loader: LoaderSettings, eval_batch_size: int, device: torch.device):
        self.train_transform, self.test_transform = train_transform, test_transform
        self.loader = loader
        self.eval_batch_size, self.device = eval_batch_size, device
        self._epoch = SeededEpoch()
        self._train_loader = None
        self._train_key = None

    def train_batches(self, split: Split, labels: np.ndarray, batch_sampler) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        key = (split.name, split.num_images, hash(split.paths))
        if self._train_loader is None or self._train_key != key:
            self._train_loader = torch.utils.data.DataLoader(
                _TrainImages(split, labels, self.train_transform, self.loader.max_image_pixels), batch_sampler=self._epoch,
                **self.loader.options(batch_sampler.seed, persistent=True),
            )
            self._train_key = key
        self._epoch.sampler = batch_sampler
        for images, batch_labels, indices, learners in self._train_loader:
            yield images, batch_labels, indices, int(learners[0])

    def eval_batches(self, split: Split, indices: np.ndarray | None = None, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Test-transform inputs of ``split`` (or of its images ``indices``), in order, with their indices."""
        loader = torch.utils.data.DataLoader(
            _EvalImages(split, self.test_transform, indices, self.loader.max_image_pixels), batch_size=batch_size or self.eval_batch_size, shuffle=False,
            **self.loader.options(),
        )
        yield from loader


class CachedInputs:
    """The frozen lower units' outputs for every image of a split, computed on first use.

    Faithful: with no training augmentation the frozen units see the same test-transform input in
    every epoch, so caching their output computes the same function as running them each time (up
    to float rounding, which depends on how many images a convolution processes at once).

    With ``views`` (``data.augmented_views``) the training batches also draw from augmented copies:
    the frozen units' output of ``views`` augmented versions of every training image (``train_transform``,
    drawn from the run's seed) is computed once; each item of a batch then takes one of the
    ``views + 1`` versions (the plain one included), drawn from the seed, epoch and batch position,
    so a resumed run draws the same ones. Augmentation then costs one frozen pass per view instead of
    one per training step; what it gives up is variety (a fixed set of copies, not a new draw each
    time an image is seen). Evaluation and the feature passes use the plain version only.
    """

    cached = True

    def __init__(self, model, test_transform, loader: LoaderSettings, eval_batch_size: int, device: torch.device,
                 progress: bool = True, autocast=None, *, train_transform=None, views: int = 0):
        if views and train_transform is None:
            raise ValueError("augmented views need a train transform")
        self._model = model
        self._train_transform, self.views = train_transform, int(views)
        self._loader = loader
        self._images = ImageInputs(None, test_transform, loader, eval_batch_size, device)
        self._autocast = autocast if autocast is not None else contextlib.nullcontext
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
        from dcml.model_runner import run_over_batches

        if split.num_images == 0:
            raise DatasetError(f"split {split.name!r} has no images")
        maps = run_over_batches(self._images.eval_batches(split), self._model.frozen_forward, device=self.device,
                                model=self._model, autocast=self._autocast, total=split.num_images,
                                progress=self.progress, desc=f"cache {split.name}")
        return torch.from_numpy(maps).contiguous(memory_format=torch.channels_last)

    def _views_tensor(self, split: Split, seed: int) -> torch.Tensor:
        """(views + 1) x N x ... : the plain version, then each augmented view of every image of ``split``."""
        from dcml.model_runner import run_over_batches

        key = ("views", self.views, int(seed), *self._key(split))
        if key not in self.tensors:
            versions = [self.tensor(split)]
            for view in range(1, self.views + 1):
                seeds = _item_seeds([int(seed), _VIEW_STREAM, view], split.num_images)
                loader = torch.utils.data.DataLoader(
                    _AugmentedImages(split, self._train_transform, seeds, self._loader.max_image_pixels),
                    batch_size=self.eval_batch_size, shuffle=False, **self._loader.options(),
                )
                maps = run_over_batches(loader, self._model.frozen_forward, device=self.device, model=self._model,
                                        autocast=self._autocast, total=split.num_images, progress=self.progress,
                                        desc=f"cache {split.name} view {view}/{self.views}")
                versions.append(torch.from_numpy(maps).contiguous(memory_format=torch.channels_last))
            self.tensors[key] = torch.stack(versions)
        return self.tensors[key]

    def train_batches(self, split: Split, labels: np.ndarray, batch_sampler):
        labels_tensor = torch.as_tensor(labels)
        if not self.views:
            source = self.tensor(split)
            for batch in batch_sampler:
                indices = torch.as_tensor([index for index, _ in batch], dtype=torch.long)
                yield source[indices], labels_tensor[indices], indices, int(batch[0][1])
            return
        s = batch_sampler
        versions = self._views_tensor(split, s.seed)
        entropy = [int(s.seed), _VIEW_STREAM, int(s.epoch)] + ([int(s.rank)] if s.num_replicas > 1 else [])
        for position, batch in enumerate(s, start=s.first_batch):
            indices = torch.as_tensor([index for index, _ in batch], dtype=torch.long)
            chosen = torch.from_numpy((_item_seeds(entropy + [position], len(batch)) % np.uint64(self.views + 1)).astype(np.int64))
            yield versions[chosen, indices], labels_tensor[indices], indices, int(batch[0][1])

    def eval_batches(self, split: Split, indices: np.ndarray | None = None, batch_size: int | None = None):
        source = self.tensor(split)
        order = torch.arange(len(source)) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
        step = batch_size or self.eval_batch_size
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            yield (source[start : start + len(chunk)] if indices is None else source[chunk]), chunk


#: Mixed into the entropy of augmented views and their choice, apart from the augmentation streams.
_VIEW_STREAM = 0x76696577  # "view"


def input_cache_key(config) -> tuple:
    """Runs with equal keys feed the same frozen units the same images: their cached outputs can be shared."""
    d, m = config.data, config.model
    return (d.dataset, d.root, d.image_size, m.backbone, m.pretrained, m.weights, m.trainable_blocks,
            d.train_augmentation, d.augmented_views)


def build_inputs(config, model, device: torch.device, *, shared: dict | None = None, progress: bool = True, autocast=None):
    """The trainer's inputs for ``config``: decoded images, or the frozen units' cached output
    (``data.cache_frozen_features``), shared between runs through ``shared`` when their key matches."""
    d, r = config.data, config.runtime
    backbone = model.backbone
    test_transform = backbone.test_transform(d.image_size)
    loader = LoaderSettings(num_workers=d.num_workers, pin_memory=r.pin_memory and device.type == "cuda",
                            persistent_workers=r.persistent_workers, prefetch_factor=r.prefetch_factor,
                            max_image_pixels=d.max_image_pixels)
    if d.train_augmentation == "none":
        train_transform = test_transform
    elif d.train_augmentation in ("drawing", "drawing_style"):
        from dcml.data.augment import DrawingAugmentationSettings, DrawingStyleSettings, drawing_augmentation

        style = DrawingStyleSettings() if d.train_augmentation == "drawing_style" else None
        train_transform = drawing_augmentation(test_transform, DrawingAugmentationSettings(), style)
    else:
        train_transform = backbone.train_transform(d.image_size, horizontal_flip=d.train_augmentation == "crop_flip")
    if not d.cache_frozen_features:
        return ImageInputs(train_transform, test_transform, loader, d.eval_batch_size, device)
    key = input_cache_key(config)
    if shared is not None and key in shared:
        return shared[key]
    # The frozen units hold the same (pretrained) weights in every run that shares this key.
    inputs = CachedInputs(model, test_transform, loader, d.eval_batch_size, device, progress, autocast,
                          train_transform=train_transform, views=d.augmented_views)
    if shared is not None:
        shared[key] = inputs
    return inputs

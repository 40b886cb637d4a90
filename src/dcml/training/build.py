"""The parts of one training run, built from its config: device, data, model, loss, optimiser, inputs.

:func:`build_run` is everything a :class:`~dcml.training.trainer.Trainer` needs before its first
epoch. The order of the steps is part of the behaviour: the run is seeded first, and the dataset
split, the initial weights, the loss's parameters and the input cache then draw from the global
random streams in that order, so the same config always builds the same run (and a resume
rebuilds the run it continues).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ContextManager

import numpy as np
import torch

from dcml.config import TrainConfig, validate_against_data
from dcml.data.records import Dataset, Split
from dcml.models.embedding_model import EmbeddingModel, build_model
from dcml.training import preflight
from dcml.training.datasets import prepare_dataset
from dcml.training.device import autocast_for, rank_seed, resolve_device, seed_everything
from dcml.training.distributed import Distributed
from dcml.training.epoch import EpochLoop
from dcml.training.forward import ForwardForPhase, TrainForward
from dcml.training.inputs import CachedInputs, ImageInputs, build_inputs
from dcml.training.objective import Objective
from dcml.training.optim import build_optimizer
from dcml.training.split_embedder import SplitEmbedder
from dcml.training.stopping import StopSignals


def without_pretrained_weights(config: TrainConfig) -> TrainConfig:
    """``config`` building a randomly initialised backbone (its weights are about to be replaced)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=False, weights=None))


@dataclasses.dataclass(frozen=True)
class RunParts:
    """What :func:`build_run` built; the trainer keeps each part as an attribute of its own."""

    device: torch.device
    autocast: Callable[[], ContextManager]  # a fresh context per forward pass (bf16 autocast or nothing)
    dataset: Dataset
    train_split: Split
    val_split: Split
    train_labels: np.ndarray  # int64: each training image's class as an index 0..C-1 (C = training classes)
    model: EmbeddingModel
    loss: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]  # each parameter group's configured rate, which the schedule's decay scales
    inputs: ImageInputs | CachedInputs  # decoded images, or the frozen units' cached output
    embedder: SplitEmbedder
    forward: ForwardForPhase

    def epoch_loop(self, dist: Distributed, stop: StopSignals, progress_bar: bool) -> EpochLoop:
        """The batch loop over these parts; ``stop`` is the run's stop signals (served between batches)."""
        return EpochLoop(model=self.model, forward=self.forward, optimizer=self.optimizer, loss=self.loss,
                         objective=self.objective, inputs=self.inputs, device=self.device, autocast=self.autocast,
                         dist=dist, stop=stop, progress_bar=progress_bar)


def build_run(config: TrainConfig, distributed: Distributed, *, progress: bool, dataset: Dataset | None = None,
              shared_inputs: dict | None = None, load_pretrained: bool = True) -> RunParts:
    """Check ``config`` against the machine and the data, seed, and build the run's parts.

    ``dataset``: already prepared (else :func:`~dcml.training.datasets.prepare_dataset`);
    ``shared_inputs``: a cache of frozen-unit features shared by several runs in one process;
    ``load_pretrained=False``: a random backbone (a checkpoint is about to replace its weights);
    ``progress``: show progress bars (rank 0 only).
    """
    preflight.check_distributed(config, distributed.enabled)
    device = resolve_device(config.device, distributed)
    autocast = autocast_for(config.runtime.precision, device)
    seed_everything(config.seed)

    dataset = dataset if dataset is not None else prepare_dataset(config)
    train_split, val_split = dataset.split("train"), dataset.split("val")
    class_ids, train_labels = np.unique(train_split.labels, return_inverse=True)

    model = build_model(config if load_pretrained else without_pretrained_weights(config)).to(device)
    if config.runtime.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    validate_against_data(config, len(class_ids), model.backbone.num_units, dataset.evaluation.protocol.value)
    preflight.check_selection_metric(config, dataset)
    loss = preflight.create_configured_loss(config, len(class_ids)).to(device)
    objective = Objective(model, loss, config.model.mask_regularization)
    optimizer = build_optimizer(model, loss, config)
    inputs = build_inputs(config, model, device, shared=shared_inputs, progress=progress, autocast=autocast)
    embedder = SplitEmbedder(model, inputs, device, autocast, distributed, config.runtime.feature_batch_size, progress)
    train_forward = TrainForward(model)
    if config.runtime.compile:
        train_forward.compile()
    forward = ForwardForPhase(train_forward, distributed, device, broadcast_buffers=not config.model.freeze_bn_stats)
    if distributed.enabled:
        # Every rank starts from rank 0's weights (DDP broadcasts them); the randomness of
        # dropout and negative sampling differs per rank.
        seed_everything(rank_seed(config.seed, distributed.rank))

    return RunParts(device=device, autocast=autocast, dataset=dataset, train_split=train_split, val_split=val_split,
                    train_labels=train_labels.astype(np.int64), model=model, loss=loss, objective=objective,
                    optimizer=optimizer, base_lrs=[group["lr"] for group in optimizer.param_groups], inputs=inputs,
                    embedder=embedder, forward=forward)

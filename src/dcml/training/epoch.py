"""One epoch's batches on one rank: the per-batch training step and the loop around it.

Each batch comes from the epoch's :class:`~dcml.sampling.ClusterBatchSampler`, runs forward (through
DDP under torchrun), gets the loss its phase calls for and takes one optimiser step. What the
finished batches add up to lives in an :class:`~dcml.training.run_state.EpochProgress`, so a stop
request served at a batch boundary can be saved and resumed exactly.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from dcml.training import checkpoint as ckpt
from dcml.training.distributed import Distributed
from dcml.training.forward import ForwardForPhase
from dcml.training.objective import Objective
from dcml.training.run_state import EpochProgress
from dcml.training.schedule import EpochPlan
from dcml.training.stopping import DivergenceWatch, StopSignals, TrainingStopped

#: Progress-bar loss refresh period in batches (reading the loss waits for the GPU); also how often
#: CUDA runs check the loss is finite and torchrun ranks agree on a stop request.
LOSS_DISPLAY_EVERY = 25

#: ``loss_of_batch(plan, raw, labels, learner)``: the loss of one batch of cluster ``learner``.
LossOfBatch = Callable[[EpochPlan, torch.Tensor, torch.Tensor, int], torch.Tensor]
#: ``save_stopped(progress, epoch_batches)``: write the epoch in progress; returns what was saved (for the message).
SaveStopped = Callable[[EpochProgress, int], str]


def epoch_sampler(config, labels, clustering, dist: Distributed, epoch: int, first_batch: int):
    """This rank's :class:`~dcml.sampling.ClusterBatchSampler` of ``epoch``, from batch ``first_batch`` on."""
    from dcml.sampling import ClusterBatchSampler

    s = config.sampler
    sampler = ClusterBatchSampler(labels, clustering, classes_per_batch=s.classes_per_batch,
                                  images_per_class=s.images_per_class, epoch_length=s.epoch_length, seed=config.seed,
                                  batches_per_epoch=s.batches_per_epoch, pass_unit=s.pass_unit,
                                  fill_small_clusters=s.fill_small_clusters, num_replicas=dist.world_size, rank=dist.rank)
    sampler.set_epoch(epoch, first_batch=first_batch)
    return sampler


class EpochLoop:
    """Trains the batches of an epoch; ``run`` continues an :class:`EpochProgress` from its next batch."""

    def __init__(self, *, model, forward: ForwardForPhase, optimizer: torch.optim.Optimizer, loss: torch.nn.Module,
                 objective: Objective, inputs, device: torch.device, autocast, dist: Distributed, stop: StopSignals,
                 progress_bar: bool):
        self.model, self.forward, self.optimizer, self.loss, self.objective = model, forward, optimizer, loss, objective
        self.inputs, self.device, self.autocast, self.dist, self.stop = inputs, device, autocast, dist, stop
        self.progress_bar = progress_bar

    def run(self, plan: EpochPlan, sampler, progress: EpochProgress, *, split, labels, epochs: int,
            loss_of_batch: LossOfBatch, save_stopped: SaveStopped) -> None:
        """Train ``sampler``'s batches of ``split`` from ``progress.batches`` on; ``progress`` ends ``trained``.

        A stop request (SIGTERM, Ctrl-C) is served at the next batch boundary: ``save_stopped`` writes
        the progress so far and the run stops with :class:`TrainingStopped`.
        """
        from tqdm import tqdm

        epoch_batches = sampler.epoch_batches()
        self.model.train()
        loss_parameters = list(self.loss.learnable_parameters())
        # Summed on the device and read once at the end: reading a loss every step would wait for the GPU.
        learner_losses = torch.as_tensor(progress.loss_sums, dtype=torch.float64).to(self.device)
        watch = DivergenceWatch(self.device, LOSS_DISPLAY_EVERY)
        bar = tqdm(total=epoch_batches, initial=progress.batches, unit="batch",
                   desc=f"epoch {plan.epoch + 1}/{epochs} {plan.phase}", disable=not self.progress_bar, leave=False)
        start = time.perf_counter()
        with self.objective.phase(plan), bar, self.stop.deferred():
            forward = self.forward.current()
            batches = iter(self.inputs.train_batches(split, labels, sampler))
            while True:
                if self._stop_requested_at(progress.batches):
                    watch.check()  # nothing trained past a non-finite loss is ever saved
                    progress.train_seconds += time.perf_counter() - start
                    progress.loss_sums = learner_losses.cpu().numpy()
                    saved = save_stopped(progress, epoch_batches)
                    raise TrainingStopped(self.stop.requested or "SIGTERM", saved)
                wait_start = time.perf_counter()
                item = next(batches, None)
                progress.data_wait += time.perf_counter() - wait_start
                if item is None:
                    break
                self._step(plan, forward, item, progress, learner_losses, loss_parameters, watch, loss_of_batch)
                bar.update(1)
                if self.progress_bar and (progress.batches % LOSS_DISPLAY_EVERY == 0 or progress.batches == epoch_batches):
                    bar.set_postfix(loss=f"{float(learner_losses.sum()) / max(int(progress.learner_batches.sum()), 1):.4f}")
            watch.check()
        progress.train_seconds += time.perf_counter() - start
        progress.loss_sums = learner_losses.cpu().numpy()
        progress.trained = True
        progress.rng = ckpt.rng_state()  # a stop during validation resumes from here

    def _step(self, plan: EpochPlan, forward, item, progress: EpochProgress, learner_losses: torch.Tensor,
              loss_parameters: list, watch: DivergenceWatch, loss_of_batch: LossOfBatch) -> None:
        """One batch: forward, keep its features for the bank, the phase's loss, backward, one optimiser step."""
        inputs, labels, indices, learner = item
        labels = labels.to(self.device, non_blocking=True)
        with self.autocast():
            features, raw = forward(self._to_device(inputs), cached=self.inputs.cached)
        if progress.bank is not None:
            progress.bank.record(indices.numpy(), features.detach().float().cpu().numpy(),
                                 progress.batches * self.dist.world_size + self.dist.rank)
        loss = loss_of_batch(plan, raw.float(), labels, learner)
        watch.record(loss, plan.epoch, progress.batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_gradients(loss_parameters)
        self.optimizer.step()
        learner_losses[learner] += loss.detach()
        progress.batches += 1
        progress.images += len(labels)
        progress.learner_batches[learner] += 1

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """A batch on the training device; image and feature maps channels-last (faster convolutions)."""
        inputs = inputs.to(self.device, non_blocking=True)
        return inputs.contiguous(memory_format=torch.channels_last) if inputs.ndim == 4 else inputs

    def _stop_requested_at(self, batch: int) -> bool:
        """Whether to stop before this batch. Under torchrun ranks must stop together: they agree every few batches."""
        if not self.dist.enabled:
            return self.stop.requested is not None
        return batch % LOSS_DISPLAY_EVERY == 0 and batch > 0 and self.dist.any(self.stop.requested is not None)

"""The differentiable part of a training step, and its DistributedDataParallel wrapper under torchrun."""

from __future__ import annotations

import torch

from dcml.training.distributed import Distributed


class TrainForward(torch.nn.Module):
    """inputs -> (pooled backbone features, raw embedding), as one module so DDP and torch.compile can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, cached: bool = False):
        features = self.model.features(inputs, cached=cached)
        return features, self.model.head(features)


class ForwardForPhase:
    """The forward module of an epoch: ``TrainForward`` itself, or under torchrun its DDP wrapper.

    DDP fixes the parameters it synchronises when it is built, so a backbone freeze (or the masks
    leaving the loss after the divide phase) builds a new wrapper; the old one is dropped first.
    """

    def __init__(self, forward: TrainForward, dist: Distributed, device: torch.device, broadcast_buffers: bool):
        self.forward, self.dist, self.device, self.broadcast_buffers = forward, dist, device, broadcast_buffers
        self._ddp = None
        self._key: tuple | None = None

    def current(self) -> torch.nn.Module:
        if not self.dist.enabled:
            return self.forward
        key = tuple(name for name, p in self.forward.named_parameters() if p.requires_grad)
        if self._ddp is None or self._key != key:
            from torch.nn.parallel import DistributedDataParallel

            self._ddp = None
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.forward, device_ids=device_ids, broadcast_buffers=self.broadcast_buffers)
            self._key = key
        return self._ddp

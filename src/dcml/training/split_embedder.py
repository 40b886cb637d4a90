"""A whole split through the model being trained: its full embedding or its pooled backbone features.

Validation, the test report and every fresh re-clustering pass read the split this way. Under
torchrun every rank embeds its shard of the split and every rank gets the whole result.
"""

from __future__ import annotations

import numpy as np
import torch

from dcml.data.records import Split
from dcml.training.distributed import Distributed

EMBEDDING, BACKBONE = "embedding", "backbone"


class SplitEmbedder:
    def __init__(self, model, inputs, device: torch.device, autocast, dist: Distributed, batch_size: int | None,
                 progress: bool):
        self.model, self.inputs, self.device, self.autocast, self.dist = model, inputs, device, autocast, dist
        self.batch_size, self.progress = batch_size, progress

    def embed(self, split: Split, learners: int, space: str = EMBEDDING, indices: np.ndarray | None = None) -> np.ndarray:
        """``space="embedding"``: the full embedding of ``learners`` learners; ``"backbone"``: pooled
        backbone features. ``indices``: only those images of the split (in that order)."""
        if indices is None and self.dist.enabled:
            local = self._embed_local(split, learners, space, self.dist.shard(split.num_images))
            return self.dist.gather_rows(local, split.num_images)
        return self._embed_local(split, learners, space, indices)

    def _embed_local(self, split: Split, learners: int, space: str, indices: np.ndarray | None) -> np.ndarray:
        from dcml.model_runner import run_over_batches

        model, cached = self.model, self.inputs.cached

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            features = model.features(inputs, cached=cached)
            if space != EMBEDDING:
                return features
            raw = model.head(features)
            # The learners' normalisation and the concatenation in float32, outside autocast.
            with torch.autocast(device_type=self.device.type, enabled=False):
                return model.head.full_embedding(raw.float(), learners)

        width = model.head.dim if space == EMBEDDING else model.backbone.feature_dim
        batches = self.inputs.eval_batches(split, indices, self.batch_size)
        return run_over_batches(batches, forward, device=self.device, model=model, autocast=self.autocast,
                                total=split.num_images if indices is None else len(indices), width=width,
                                progress=self.progress, desc=f"embed {split.name}")

    def head_embedding(self, features: np.ndarray, learners: int) -> np.ndarray:
        """The full embedding of backbone ``features`` already computed (the feature bank's), in eval mode."""
        head = self.model.head
        was_training = head.training
        head.eval()
        with torch.inference_mode():
            with self.autocast():
                raw = head(torch.from_numpy(features).to(self.device))
            embedding = head.full_embedding(raw.float(), learners).float().cpu().numpy()
        head.train(was_training)
        return embedding

"""What one batch trains in each phase of the method: which embedding gets the loss, with which
loss parameters, and which weights move.

- **divide**: a batch comes from one cluster, and only that cluster's learner (its slice of the
  embedding, or its learned mask: each L2-normalised) gets the loss, with that learner's loss
  parameters (its margin-loss beta). With learned masks the mask-similarity regulariser is added.
- **conquer**: the full normalised embedding gets the loss. Batches stay per cluster, as in the
  authors' v1 code, and so the batch's learner keeps its loss parameters (its beta) on the full
  embedding. The masks no longer take part, so they do not train.
- **finetune**: the full embedding as one metric (K = 1): the first learner's loss parameters.

In every phase the backbone can be frozen for some epochs after a re-clustering (the plan says when).
"""

from __future__ import annotations

import contextlib

import torch

from dcml.training.schedule import DIVIDE, FINETUNE, EpochPlan


class Objective:
    def __init__(self, model, loss: torch.nn.Module, mask_regularization: float):
        self.model, self.loss, self.mask_regularization = model, loss, mask_regularization

    @contextlib.contextmanager
    def phase(self, plan: EpochPlan):
        """Make trainable what trains in ``plan``'s phase for the duration; everything trains again after."""
        head = self.model.head
        self.model.set_backbone_trainable(not plan.backbone_frozen)
        if head.masks is not None:
            head.masks.requires_grad_(plan.phase == DIVIDE)
        try:
            yield
        finally:
            self.model.set_backbone_trainable(True)
            if head.masks is not None:
                head.masks.requires_grad_(True)

    def __call__(self, plan: EpochPlan, raw: torch.Tensor, labels: torch.Tensor, learner: int) -> torch.Tensor:
        """The loss of one batch drawn from cluster ``learner``; ``raw`` is the head's output before normalisation."""
        head = self.model.head
        if plan.phase == DIVIDE:
            embeddings = head.learner_embedding(raw, learner, plan.active_learners)
        else:
            embeddings = head.full_embedding(raw, plan.active_learners)
        loss = self.loss(embeddings, labels, learner=0 if plan.phase == FINETUNE else learner)
        if head.masks is not None and plan.phase == DIVIDE and self.mask_regularization:
            loss = loss + self.mask_regularization * head.mask_similarity()
        return loss

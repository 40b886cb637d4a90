"""Model selection: the epoch with the best validation score (never a test score) and its weights.

The test report uses the selected epoch's weights; ``best.pt`` holds them, ``last.pt`` holds
:meth:`Selection.state` so a resumed run keeps selecting against the same best.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from dcml.errors import UserError


@dataclasses.dataclass
class Selection:
    metric: str  # "row/metric" of the validation rows, e.g. "leave_one_out/recall@1"
    score: float = -np.inf
    epoch: int | None = None  # 0-based; None until a validated epoch
    val: dict | None = None  # that epoch's validation rows
    weights: dict | None = None  # that epoch's model state dict

    def score_of(self, rows: dict) -> float:
        """The selection metric of validation ``rows``; a metric validation lacks is a one-line UserError."""
        row, _, metric = self.metric.partition("/")
        if metric not in rows[row]:
            raise UserError(f"evaluation.selection_metric {self.metric!r}: validation has no "
                            f"metric {metric!r}; it has {', '.join(k for k in rows[row] if not k.startswith('num_'))}")
        return float(rows[row][metric])

    def consider(self, epoch: int, score: float, rows: dict, model) -> bool:
        """Select ``epoch`` (keeping a copy of ``model``'s weights) if it beats the best so far."""
        if not score > self.score:
            return False
        self.score, self.epoch, self.val = score, epoch, rows
        self.weights = copy.deepcopy(model.state_dict())
        return True

    def best_checkpoint(self, config, active_learners: int) -> dict:
        """The payload of ``best.pt``."""
        return {"config": config.to_dict(), "model": self.weights, "epoch": self.epoch, "val": self.val,
                "active_learners": active_learners}

    def state(self) -> dict:
        """What ``last.pt`` keeps of the selection (the weights are in ``best.pt``)."""
        return {"score": self.score, "epoch": self.epoch, "val": self.val}

    def restore(self, state: dict) -> None:
        self.score, self.epoch, self.val = float(state["score"]), state["epoch"], state["val"]

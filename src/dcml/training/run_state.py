"""The typed schema of ``last.pt``: everything a run needs to continue exactly, as plain data.

:class:`RunState` is what the trainer saves after every epoch (and at a batch boundary when it is
stopped) and what ``--resume`` restores; :mod:`dcml.training.checkpoint` writes and reads it
(format version checked, nothing but tensors, numbers, strings, lists and dicts).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dcml.errors import UserError
from dcml.training import checkpoint as ckpt
from dcml.training.feature_bank import FeatureBank


@dataclasses.dataclass
class EpochProgress:
    """An epoch under way on this rank: what its finished batches added up to, so that a run stopped
    at a batch boundary resumes at the next batch exactly as if it had never stopped."""

    epoch: int
    record: dict  # the epoch's log line so far (re-clustering figures)
    loss_sums: np.ndarray  # float64 per learner
    learner_batches: np.ndarray  # int64 per learner
    batches: int = 0  # this rank's batches done
    images: int = 0
    data_wait: float = 0.0
    train_seconds: float = 0.0
    earlier_seconds: float = 0.0  # training time spent on this epoch before a resume
    bank: FeatureBank | None = None  # this epoch's training-pass features (reuse_training_features)
    trained: bool = False  # every batch done, validation still to come
    rng: dict | None = None  # the RNG states when the batches finished (trained only)

    @classmethod
    def start(cls, epoch: int, record: dict, learners: int) -> "EpochProgress":
        return cls(epoch, record, np.zeros(learners, dtype=np.float64), np.zeros(learners, dtype=np.int64))

    def rank_state(self) -> dict:
        """What differs between ranks (each rank sums the losses of its own batches)."""
        return {"loss_sums": torch.from_numpy(self.loss_sums.copy()), "learner_batches": torch.from_numpy(self.learner_batches.copy()),
                "images": int(self.images), "data_wait": float(self.data_wait)}

    def state(self, per_rank: list[dict], pooled_bank: FeatureBank | None) -> dict:
        return {"epoch": self.epoch, "record": self.record, "batches": self.batches, "train_seconds": self.train_seconds,
                "trained": self.trained, "rng": self.rng, "per_rank": per_rank,
                "bank": None if pooled_bank is None else pooled_bank.state()}

    @classmethod
    def from_state(cls, state: dict, rank: int) -> "EpochProgress":
        mine = state["per_rank"][rank]
        return cls(epoch=int(state["epoch"]), record=dict(state["record"]), loss_sums=mine["loss_sums"].numpy().astype(np.float64),
                   learner_batches=mine["learner_batches"].numpy().astype(np.int64), batches=int(state["batches"]),
                   images=int(mine["images"]), data_wait=float(mine["data_wait"]), train_seconds=float(state["train_seconds"]),
                   earlier_seconds=float(state["train_seconds"]), bank=FeatureBank.from_state(state["bank"]),
                   trained=bool(state["trained"]), rng=state["rng"])


@dataclasses.dataclass
class RunState:
    """``last.pt``. ``next_epoch``: epochs done; with ``epoch_progress`` the epoch of that number is under way."""

    config: dict
    dataset: dict  # see dcml.training.datasets.dataset_identity
    next_epoch: int
    model: dict
    optimizer: dict
    loss: dict
    clustering: dict | None  # assignment, usable, num_clusters of the current clustering
    active_learners: int
    feature_bank: dict | None  # FeatureBank.state() kept for the next re-clustering
    best: dict  # score, epoch (0-based) and validation rows of the selected epoch
    history: list
    timings: dict
    rng: dict
    rng_per_rank: list | None = None  # torchrun: every rank's RNG states
    epoch_progress: dict | None = None  # EpochProgress.state()

    def payload(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "RunState":
        """The state in a loaded ``last.pt``; a missing or mistyped part is a one-line UserError."""
        path = checkpoint.get("path", ckpt.LAST)
        kinds = {"config": dict, "dataset": dict, "next_epoch": int, "model": dict, "optimizer": dict, "loss": dict,
                 "clustering": (dict, type(None)), "active_learners": int, "feature_bank": (dict, type(None)), "best": dict,
                 "history": list, "timings": dict, "rng": dict, "rng_per_rank": (list, type(None)),
                 "epoch_progress": (dict, type(None))}
        values = {}
        for name, kind in kinds.items():
            if name not in checkpoint and name in ("rng_per_rank", "epoch_progress"):
                continue
            if name not in checkpoint:
                raise UserError(f"{path} is not a resumable last.pt: it has no {name}")
            if not isinstance(checkpoint[name], kind) or isinstance(checkpoint[name], bool):
                raise UserError(f"{path} is damaged: its {name} is a {type(checkpoint[name]).__name__}")
            values[name] = checkpoint[name]
        return cls(**values)


def read_selected_weights(path, epoch: int) -> dict:
    """The weights of the selected epoch from ``best.pt``, refusing a missing file or one of another run."""
    if not path.is_file():
        raise UserError(f"{path} is missing, but last.pt selected epoch {epoch + 1} and only best.pt holds its weights: "
                        "restore it, or start a new run in another --out")
    best = ckpt.load_checkpoint(path)
    if best.get("epoch") != epoch:
        shown = "no epoch" if best.get("epoch") is None else f"epoch {int(best['epoch']) + 1}"
        raise UserError(f"{path} holds {shown} but last.pt selected epoch {epoch + 1}: the two files come from "
                        "different runs; restore the run's own best.pt")
    return best["model"]

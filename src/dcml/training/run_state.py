"""The typed schema of ``last.pt``: everything a run needs to continue exactly, as plain data.

:class:`RunState` is what the trainer saves after every epoch (and at a batch boundary when it is
stopped) and what ``--resume`` restores; :mod:`dcml.training.checkpoint` writes and reads it
(format version checked, nothing but tensors, numbers, strings, lists and dicts).
:func:`write_last` and :func:`resume_run` move a live :class:`~dcml.training.trainer.Trainer`'s
state into a RunState and back.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from dcml.errors import UserError
from dcml.training import checkpoint as ckpt
from dcml.training.device import rank_seed, seed_everything
from dcml.training.distributed import Distributed
from dcml.training.datasets import check_same_dataset, dataset_identity
from dcml.training.feature_bank import FeatureBank
from dcml.training.run_files import write_log

if TYPE_CHECKING:  # the trainer imports this module, not the other way round
    from dcml.training.trainer import Trainer


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

    def gathered_state(self, dist: Distributed) -> dict:
        """:meth:`state` with every rank's share (collective under torchrun)."""
        per_rank = dist.all_gather_objects(self.rank_state())
        return self.state(per_rank, None if self.bank is None else self.bank.pooled(dist))

    def summary(self, dist: Distributed) -> dict:
        """The epoch's figures for its log record; under torchrun over every rank's batches (collective)."""
        sums, learner_batches, images = self.loss_sums, self.learner_batches, self.images
        if dist.enabled:
            shares = dist.all_gather_objects((sums, learner_batches, images))
            sums = sum(share[0] for share in shares)
            learner_batches = sum(share[1] for share in shares)
            images = sum(share[2] for share in shares)
        batches = int(learner_batches.sum())
        return {
            "loss": float(sums.sum()) / max(batches, 1),
            "batches": batches,
            "images": int(images),
            "learner_loss": [float(l / n) if n else None for l, n in zip(sums, learner_batches)],
            "data_wait_seconds": self.data_wait,
        }

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


def clustering_state(clustering) -> dict | None:
    """A :class:`~dcml.clustering.Clustering` as ``last.pt`` keeps it."""
    if clustering is None:
        return None
    return {"assignment": clustering.assignment, "usable": clustering.usable, "num_clusters": clustering.num_clusters}


def clustering_from_state(state: dict, labels: np.ndarray):
    from dcml.clustering import Clustering

    return Clustering(assignment=np.asarray(state["assignment"]), usable=np.asarray(state["usable"]),
                      num_clusters=int(state["num_clusters"]), labels=labels)


def rng_to_save(progress: EpochProgress | None, dist: Distributed) -> tuple[dict, list | None]:
    """This rank's RNG states for ``last.pt`` and, under torchrun, every rank's (collective), so a
    resumed torchrun run continues each rank's streams. An epoch whose batches are done saves the
    states of the moment they finished: a stop during its validation resumes from there."""
    rng = progress.rng if progress is not None and progress.trained else ckpt.rng_state()
    return rng, dist.all_gather_objects(rng) if dist.enabled else None


def restore_rng(state: RunState, dist: Distributed, seed: int) -> None:
    per_rank = state.rng_per_rank
    if per_rank is not None and len(per_rank) == dist.world_size:
        ckpt.restore_rng_state(per_rank[dist.rank])
    elif not dist.enabled:
        ckpt.restore_rng_state(state.rng)
    else:
        # Another number of ranks than the run was saved with: continue with fresh per-rank streams.
        if dist.is_main:
            saved = len(per_rank) if per_rank is not None else 1
            warnings.warn(f"resuming a {saved}-process run with {dist.world_size} processes: the random streams "
                          "are reseeded, so the run will not match an uninterrupted one exactly", stacklevel=4)
        seed_everything(rank_seed(seed, dist.rank) + state.next_epoch)


# ---------------------------------------------------------------------------- a live run to and from last.pt
def write_last(trainer: "Trainer", next_epoch: int, progress: EpochProgress | None = None) -> None:
    """Write the trainer's ``last.pt`` and ``log.jsonl``: after an epoch (``next_epoch`` = epochs done), or
    inside epoch ``next_epoch`` at a batch boundary (``progress``). Collective under torchrun: every rank
    hands over its RNG state and its share of an epoch in progress; rank 0 writes."""
    if trainer.out_dir is None:
        return
    dist = trainer.dist
    rng, rng_per_rank = rng_to_save(progress, dist)
    if trainer.feature_bank is not None:
        trainer.feature_bank = trainer.feature_bank.pooled(dist)  # rank 0 saves every rank's rows
    epoch_progress = None if progress is None else progress.gathered_state(dist)
    if not dist.is_main:
        return
    bank = trainer.feature_bank
    state = RunState(config=trainer.config.to_dict(), dataset=dataset_identity(trainer.dataset), next_epoch=next_epoch,
                     model=trainer.model.state_dict(), optimizer=trainer.optimizer.state_dict(), loss=trainer.loss.state_dict(),
                     clustering=clustering_state(trainer.clustering), active_learners=trainer.active_learners,
                     feature_bank=None if bank is None else bank.state(), best=trainer.selection.state(),
                     history=trainer.history, timings=trainer.timings, rng=rng, rng_per_rank=rng_per_rank,
                     epoch_progress=epoch_progress)
    ckpt.save_checkpoint(trainer.out_dir / ckpt.LAST, state.payload())
    write_log(trainer.out_dir, trainer.history)


def resume_run(trainer: "Trainer", checkpoint: dict) -> None:
    """Continue ``trainer`` from a ``last.pt`` payload: weights, optimiser, betas, clusters, RNG, history,
    and an epoch in progress. A checkpoint that does not fit this run is refused in one line."""
    path = checkpoint.get("path", ckpt.LAST)
    state = RunState.from_checkpoint(checkpoint)
    check_same_dataset(state.dataset, dataset_identity(trainer.dataset), trainer.config.data.root)
    try:
        _restore(trainer, state)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} cannot be resumed: {text} (damaged, or written for other settings)") from None


def _restore(trainer: "Trainer", state: RunState) -> None:
    dist = trainer.dist
    trainer.model.load_state_dict(state.model)
    trainer.optimizer.load_state_dict(state.optimizer)
    trainer.loss.load_state_dict(state.loss)
    if state.clustering is not None:
        trainer.clustering = clustering_from_state(state.clustering, trainer.train_labels)
    trainer.selection.restore(state.best)
    selected = trainer.selection.epoch
    if selected is not None and trainer.out_dir is not None:
        # Every rank needs the selected weights for the sharded test pass; rank 0 reads the file.
        trainer.selection.weights = dist.on_main(lambda: read_selected_weights(trainer.out_dir / ckpt.BEST, int(selected)))
    trainer.history = list(state.history)
    trainer.timings = dict(state.timings)
    trainer.start_epoch = state.next_epoch
    trainer.active_learners = state.active_learners
    trainer.feature_bank = FeatureBank.from_state(state.feature_bank)
    if state.epoch_progress is not None:
        saved_ranks = len(state.epoch_progress["per_rank"])
        if saved_ranks != dist.world_size:
            raise UserError(f"this run was stopped inside an epoch by a {saved_ranks}-process run; resume it with that "
                            f"many processes ({dist.world_size} now)")
        trainer.resumed_progress = EpochProgress.from_state(state.epoch_progress, dist.rank)
    restore_rng(state, dist, trainer.config.seed)

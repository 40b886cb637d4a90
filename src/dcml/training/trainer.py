"""The training loop: dataset records -> cluster sampler -> model -> loss, epoch by epoch.

Every epoch follows :func:`~dcml.training.schedule.plan_schedule`: re-cluster when planned
(:mod:`~dcml.training.reclustering`), draw every batch from one cluster
(:class:`~dcml.sampling.ClusterBatchSampler`), give it the loss its phase calls for
(:mod:`~dcml.training.objective`), validate on the validation classes, checkpoint
(:mod:`~dcml.training.run_state`). Model selection uses the validation split only; the test
report uses the selected epoch. This module only orchestrates those steps.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dcml.config import TrainConfig
from dcml.data.records import Dataset, Split
from dcml.atomic_files import save_json_atomically
from dcml.training import checkpoint as ckpt
from dcml.training.build import build_run, without_pretrained_weights  # noqa: F401 - the latter re-exported
from dcml.training.datasets import prepare_dataset  # noqa: F401 - re-exported
from dcml.training.device import autocast_for, effective_precision, resolve_device  # noqa: F401 - re-exported
from dcml.training.distributed import SINGLE, Distributed
from dcml.training.epoch import epoch_sampler
from dcml.training.feature_bank import FeatureBank, clustering_features, keeps_features_for
from dcml.training.reclustering import divide, kmeans_seed
from dcml.training.run_files import write_config  # noqa: F401 - re-exported
from dcml.training.run_state import EpochProgress, resume_run, write_last
from dcml.training.schedule import EpochPlan, plan_schedule
from dcml.training.selection import Selection
from dcml.training.stopping import (NonFiniteLoss, StopSignals, TrainingDiverged, TrainingStopped, divergence_message,
                                   kept_checkpoint)

METRICS_FILE = "metrics.json"


class Trainer:
    """One training run. ``shared_inputs`` lets several runs in one process reuse cached features;
    ``load_pretrained=False`` skips the backbone's ImageNet weights (a checkpoint will replace them);
    ``loggers`` (:class:`~dcml.training.logger.RunLogger`) receive every finished epoch (rank 0 only)."""

    def __init__(self, config: TrainConfig, out_dir: Path | None, *, progress: bool = True, echo=None,
                 dataset: Dataset | None = None, shared_inputs: dict | None = None, distributed: Distributed = SINGLE,
                 load_pretrained: bool = True, loggers: list | None = None):
        self.config = config
        self.dist = distributed
        self.out_dir = None if out_dir is None else Path(out_dir).expanduser()
        self.progress = progress and distributed.is_main
        echo = echo if echo is not None else (lambda message: print(message, flush=True))
        self.echo = echo if distributed.is_main else (lambda message: None)
        parts = build_run(config, distributed, progress=self.progress, dataset=dataset, shared_inputs=shared_inputs,
                          load_pretrained=load_pretrained)
        self.device, self.dataset = parts.device, parts.dataset
        self.train_split, self.val_split, self.train_labels = parts.train_split, parts.val_split, parts.train_labels
        self.model, self.loss, self.objective_of_phase = parts.model, parts.loss, parts.objective
        self.optimizer, self.base_lrs = parts.optimizer, parts.base_lrs
        self.inputs, self.embedder = parts.inputs, parts.embedder

        self.plans = plan_schedule(config)
        self.active_learners = self.plans[0].active_learners  # how the full embedding is assembled now
        self.clustering = None
        self.feature_bank: FeatureBank | None = None  # training-pass features kept for the next re-clustering
        self.stop = StopSignals()
        self.epoch_loop = parts.epoch_loop(distributed, self.stop, progress_bar=self.progress)
        self.loggers = list(loggers or []) if distributed.is_main else []
        self.start_epoch = 0
        self.resumed_progress: EpochProgress | None = None  # an epoch a resume continues in its middle
        self.selection = Selection(config.evaluation.selection_metric)
        self.history: list[dict] = []
        self.timings = {"train": 0.0, "recluster_features": 0.0, "kmeans": 0.0, "validation": 0.0, "data_wait": 0.0}

    @property
    def writes_files(self) -> bool:
        """Whether this process writes the run's files (it has an output folder and is rank 0)."""
        return self.out_dir is not None and self.dist.is_main

    # ------------------------------------------------------------------ embedding and evaluation
    def embed(self, split: Split, space: str = "embedding", indices: np.ndarray | None = None) -> np.ndarray:
        """``space="embedding"``: the full embedding (of the active learners); ``"backbone"``: pooled
        backbone features. ``indices``: only those images of the split (see :mod:`~dcml.training.split_embedder`)."""
        return self.embedder.embed(split, self.active_learners, space, indices)

    def evaluate(self, split: str | None = None, with_nmi: bool = True, space: str = "embedding") -> dict:
        """Metrics rows of the dataset's protocol (``split=None``: the test data) for the current weights.

        Under torchrun every rank embeds its shard; rank 0 computes the metrics and shares them.
        """
        from dcml.evaluation.runner import evaluate_dataset, splits_to_embed

        embeddings = {name: self.embed(self.dataset.split(name), space) for name in splits_to_embed(self.dataset, split)}
        return self.dist.on_main(lambda: evaluate_dataset(self.dataset, lambda s: embeddings[s.name], split=split,
                                                          with_nmi=with_nmi, seed=self.config.seed))

    # ------------------------------------------------------------------ clustering
    def recluster(self, plan: EpochPlan) -> None:
        """Divide the training set into ``plan.active_learners`` clusters for this epoch's batches."""
        start = time.perf_counter()
        features = self.cluster_features(plan) if plan.active_learners > 1 else None  # K = 1 needs none
        features_done = time.perf_counter()
        previous, seed = self.clustering, kmeans_seed(self.config.seed, plan.epoch)
        # One k-means (rank 0's) for the whole run: every rank then trains with the same clusters.
        self.clustering = self.dist.on_main(lambda: divide(features, self.train_labels, plan.active_learners, previous,
                                                           self.config.clustering, seed))
        if plan.active_learners > 1:  # the timings count re-clustering work; K = 1 does none
            self.timings["recluster_features"] += features_done - start
            self.timings["kmeans"] += time.perf_counter() - features_done

    def cluster_features(self, plan: EpochPlan) -> np.ndarray:
        """Features of every training image for k-means: a fresh pass, or the training pass's (reuse)."""
        bank, self.feature_bank = self.feature_bank, None  # used up by this re-clustering
        return clustering_features(bank, plan.epoch, self.config.clustering.space,
                                   lambda space, rows: self.embed(self.train_split, space, indices=rows),
                                   lambda features: self.embedder.head_embedding(features, self.active_learners), self.dist)

    # ------------------------------------------------------------------ one epoch
    def objective(self, plan: EpochPlan, raw: torch.Tensor, labels: torch.Tensor, learner: int) -> torch.Tensor:
        """The loss of one batch of cluster ``learner`` (see :mod:`dcml.training.objective`)."""
        return self.objective_of_phase(plan, raw, labels, learner)

    def train_epoch(self, plan: EpochPlan, progress: EpochProgress | None = None) -> dict:
        """Train the batches of one epoch (from ``progress.batches`` on when resumed in mid-epoch); its summary.

        A stop request (SIGTERM, Ctrl-C) is served at the next batch boundary: ``last.pt`` then
        holds ``progress`` and the run stops with :class:`TrainingStopped`.
        """
        if progress is None:
            progress = EpochProgress.start(plan.epoch, {}, plan.active_learners)
        sampler = epoch_sampler(self.config, self.train_labels, self.clustering, self.dist, plan.epoch, progress.batches)
        reuse = self.config.clustering.reuse_training_features
        if progress.bank is None and keeps_features_for(self.plans, plan.epoch, reuse):
            progress.bank = FeatureBank.empty(len(self.train_labels), self.model.backbone.feature_dim, plan.epoch)

        def save_stopped(stopped: EpochProgress, epoch_batches: int) -> str:
            self.save_last(plan.epoch, stopped)
            return (f"saved {self.out_dir}/{ckpt.LAST} after batch {stopped.batches} of {epoch_batches} in epoch "
                    f"{plan.epoch + 1}" if self.writes_files else "")

        self.epoch_loop.run(plan, sampler, progress, split=self.train_split, labels=self.train_labels, epochs=len(self.plans),
                            loss_of_batch=self.objective, save_stopped=save_stopped)
        self.feature_bank = progress.bank
        return progress.summary(self.dist)

    # ------------------------------------------------------------------ run
    def fit(self) -> dict:
        """Train every planned epoch from :attr:`start_epoch`, then test the selected one.

        SIGTERM / Ctrl-C stop it with :class:`TrainingStopped` after a resumable checkpoint; a
        non-finite loss stops it with :class:`TrainingDiverged` (a UserError), keeping the last
        good checkpoint.
        """
        with self.stop.installed():
            try:
                return self._fit()
            except NonFiniteLoss as bad:
                rates = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
                precision = effective_precision(self.config.runtime.precision, self.device)
                kept = kept_checkpoint(self.out_dir / ckpt.LAST if self.writes_files else None, len(self.history))
                raise TrainingDiverged(divergence_message(bad.epoch, bad.batch, kept, rates, precision)) from None

    def _fit(self) -> dict:
        run_start = time.perf_counter()
        if self.inputs.cached and self.start_epoch < len(self.plans):
            # One-time preparation, timed apart so it does not count as re-clustering or training.
            start = time.perf_counter()
            self.inputs.tensor(self.train_split)
            self.inputs.tensor(self.val_split)
            self.timings["cache_frozen_units"] = self.timings.get("cache_frozen_units", 0.0) + time.perf_counter() - start
        for plan in self.plans[self.start_epoch:]:
            self._run_epoch(plan)
            if self.dist.any(self.stop.requested is not None):  # asked while the epoch's files were written
                raise TrainingStopped(self.stop.requested or "SIGTERM",
                                      f"saved {self.out_dir}/{ckpt.LAST} after epoch {plan.epoch + 1}" if self.writes_files else "")
        return self.finish(time.perf_counter() - run_start)

    def _run_epoch(self, plan: EpochPlan) -> None:
        """Re-cluster if planned, train, validate, select, checkpoint, report: one epoch of the plan."""
        from dcml.training.logger import log_epoch
        from dcml.training.optim import set_learning_rates
        from dcml.training.reporting import add_throughput, epoch_line, epoch_record

        epoch_start = time.perf_counter()
        set_learning_rates(self.optimizer, self.base_lrs, plan)
        self.active_learners = plan.active_learners
        progress, self.resumed_progress = self.resumed_progress, None
        if progress is None or progress.epoch != plan.epoch:
            record = epoch_record(plan)
            if plan.recluster or self.clustering is None:
                before = self.timings["recluster_features"] + self.timings["kmeans"]
                self.recluster(plan)
                record["recluster_seconds"] = self.timings["recluster_features"] + self.timings["kmeans"] - before
                record["cluster_images"] = self.clustering.cluster_sizes().tolist()
                record["cluster_classes"] = self.clustering.classes_per_cluster().tolist()
            progress = EpochProgress.start(plan.epoch, record, plan.active_learners)
        if progress.trained:  # resumed after this epoch's batches, before its validation
            self.feature_bank = progress.bank
            summary = progress.summary(self.dist)
        else:
            summary = self.train_epoch(plan, progress)  # its summary: gathering it again would repeat a collective
        record = progress.record
        record.update(summary)
        self.timings["train"] += progress.train_seconds
        self.timings["data_wait"] += progress.data_wait
        add_throughput(record, progress.train_seconds)
        rows = self._validate(plan, progress)
        with self.stop.deferred():  # the selection, best.pt and last.pt change together
            if rows is not None:
                self._select(plan, rows, record)
            record["seconds"] = time.perf_counter() - epoch_start + progress.earlier_seconds
            self.history.append(record)
            self.save_last(plan.epoch + 1)
        self.echo(epoch_line(record, len(self.plans), self.config.evaluation.selection_metric))
        log_epoch(self.loggers, record, self.optimizer, self.loss)

    def _validate(self, plan: EpochPlan, progress: EpochProgress) -> dict | None:
        """The validation rows of an epoch that validates (every ``evaluation.every`` and the last); else None."""
        if (plan.epoch + 1) % self.config.evaluation.every != 0 and plan.epoch != len(self.plans) - 1:
            return None
        val_start = time.perf_counter()
        try:
            rows = self.evaluate("val", with_nmi=self.config.evaluation.val_nmi)
        except TrainingStopped as stopped:
            # The epoch's batches are done: keep them, validation reruns on resume.
            with self.stop.deferred():
                self.save_last(plan.epoch, progress)
            stopped.saved = (f"saved {self.out_dir}/{ckpt.LAST} after the batches of epoch {plan.epoch + 1}, "
                             "before its validation") if self.writes_files else ""
            raise
        self.timings["validation"] += time.perf_counter() - val_start
        return rows

    def _select(self, plan: EpochPlan, rows: dict, record: dict) -> None:
        """Model selection on the validation score; the best epoch's weights go to ``best.pt``."""
        score = self.selection.score_of(rows)
        record["val"] = rows
        record["score"] = score
        if self.selection.consider(plan.epoch, score, rows, self.model):
            record["best"] = True
            if self.writes_files:
                ckpt.save_checkpoint(self.out_dir / ckpt.BEST, self.selection.best_checkpoint(self.config, self.active_learners))

    def finish(self, seconds: float) -> dict:
        """Test the selected epoch's weights; write metrics.json."""
        from dcml.training.reporting import run_result

        selection = self.selection
        if selection.weights is not None:
            self.model.load_state_dict(selection.weights)
        result = run_result(dataset=self.dataset.name, config=self.config, epochs=len(self.plans), best_epoch=selection.epoch,
                            best_score=selection.score, best_val=selection.val, test=self.evaluate(None, with_nmi=True),
                            seconds=seconds, timings=self.timings)
        if self.writes_files:
            save_json_atomically(self.out_dir / METRICS_FILE, result)
        return result

    # ------------------------------------------------------------------ checkpoints
    def save_last(self, next_epoch: int, progress: EpochProgress | None = None) -> None:
        """Write ``last.pt`` and ``log.jsonl``: after an epoch (``next_epoch`` = epochs done), or inside epoch
        ``next_epoch`` at a batch boundary (``progress``). Collective under torchrun."""
        write_last(self, next_epoch, progress)

    def resume(self, checkpoint: dict) -> None:
        """Continue from a ``last.pt`` payload: weights, optimiser, betas, clusters, RNG, history, and an
        epoch in progress. A checkpoint that does not fit this run is refused in one line."""
        resume_run(self, checkpoint)

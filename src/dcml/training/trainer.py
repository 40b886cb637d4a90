"""The training loop: dataset records -> cluster sampler -> model -> loss, epoch by epoch.

Every epoch follows :func:`~dcml.training.schedule.plan_schedule`: re-cluster when planned
(:mod:`~dcml.training.reclustering`), draw every batch from one cluster
(:class:`~dcml.sampling.ClusterBatchSampler`), give it the loss its phase calls for
(:mod:`~dcml.training.objective`), validate on the validation classes, checkpoint
(:mod:`~dcml.training.run_state`). Model selection uses the validation split only; the test
report uses the selected epoch. This module only orchestrates those steps.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dcml.config import TrainConfig, validate_against_data
from dcml.data.records import Dataset, Split
from dcml.errors import UserError
from dcml.atomic_files import save_json_atomically
from dcml.training import checkpoint as ckpt
from dcml.training.datasets import check_same_dataset, dataset_identity, prepare_dataset  # noqa: F401 - prepare_dataset re-exported
from dcml.training.device import autocast_for, effective_precision, resolve_device, seed_everything  # noqa: F401 - re-exported
from dcml.training.distributed import SINGLE, Distributed
from dcml.training.feature_bank import FeatureBank
from dcml.training.reclustering import divide, kmeans_seed
from dcml.training.run_files import write_config, write_log  # noqa: F401 - write_config re-exported
from dcml.training.run_state import EpochProgress, RunState, read_selected_weights
from dcml.training.schedule import EpochPlan, plan_schedule
from dcml.training.stopping import (DivergenceWatch, NonFiniteLoss, StopSignals, TrainingDiverged, TrainingStopped,
                                   divergence_message)

METRICS_FILE = "metrics.json"
#: Under torchrun rank r draws its dropout and negative-sampling randomness from seed + r x this.
RANK_SEED_STRIDE = 1_000_003
#: Progress-bar loss refresh period in batches (reading the loss waits for the GPU); also how often
#: CUDA runs check the loss is finite and torchrun ranks agree on a stop request.
LOSS_DISPLAY_EVERY = 25


def without_pretrained_weights(config: TrainConfig) -> TrainConfig:
    """``config`` building a randomly initialised backbone (its weights are about to be replaced)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=False, weights=None))


class Trainer:
    """One training run. ``shared_inputs`` lets several runs in one process reuse cached features;
    ``load_pretrained=False`` skips the backbone's ImageNet weights (a checkpoint will replace them);
    ``loggers`` (:class:`~dcml.training.logger.RunLogger`) receive every finished epoch (rank 0 only)."""

    def __init__(self, config: TrainConfig, out_dir: Path | None, *, progress: bool = True, echo=None,
                 dataset: Dataset | None = None, shared_inputs: dict | None = None, distributed: Distributed = SINGLE,
                 load_pretrained: bool = True, loggers: list | None = None):
        from dcml.models.embedding_model import build_model
        from dcml.training import preflight
        from dcml.training.forward import ForwardForPhase, TrainForward
        from dcml.training.inputs import build_inputs
        from dcml.training.objective import Objective
        from dcml.training.optim import build_optimizer

        self.config = config
        self.dist = distributed
        preflight.check_distributed(config, distributed.enabled)
        self.out_dir = None if out_dir is None else Path(out_dir).expanduser()
        self.progress = progress and distributed.is_main
        echo = echo if echo is not None else (lambda message: print(message, flush=True))
        self.echo = echo if distributed.is_main else (lambda message: None)
        self.device = resolve_device(config.device, distributed)
        self.autocast = autocast_for(config.runtime.precision, self.device)
        seed_everything(config.seed)

        self.dataset = dataset if dataset is not None else prepare_dataset(config)
        self.train_split = self.dataset.split("train")
        self.val_split = self.dataset.split("val")
        self.class_ids, self.train_labels = np.unique(self.train_split.labels, return_inverse=True)
        self.train_labels = self.train_labels.astype(np.int64)

        self.model = build_model(config if load_pretrained else without_pretrained_weights(config)).to(self.device)
        if config.runtime.channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        validate_against_data(config, len(self.class_ids), self.model.backbone.num_units, self.dataset.evaluation.protocol.value)
        preflight.check_selection_metric(config, self.dataset)
        self.loss = preflight.create_configured_loss(config, len(self.class_ids)).to(self.device)
        self.objective_of_phase = Objective(self.model, self.loss, config.model.mask_regularization)
        self.optimizer = build_optimizer(self.model, self.loss, config)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.inputs = build_inputs(config, self.model, self.device, shared=shared_inputs, progress=self.progress,
                                   autocast=self.autocast)
        train_forward = TrainForward(self.model)
        if config.runtime.compile:
            train_forward.compile()
        self.forward = ForwardForPhase(train_forward, distributed, self.device, broadcast_buffers=not config.model.freeze_bn_stats)
        if distributed.enabled:
            # Every rank starts from rank 0's weights (DDP broadcasts them); the randomness of
            # dropout and negative sampling differs per rank.
            seed_everything(config.seed + RANK_SEED_STRIDE * distributed.rank)

        self.plans = plan_schedule(config)
        self.active_learners = self.plans[0].active_learners  # how the full embedding is assembled now
        self.clustering = None
        self.feature_bank: FeatureBank | None = None  # training-pass features kept for the next re-clustering
        self.stop = StopSignals()
        self.loggers = list(loggers or []) if distributed.is_main else []
        self.start_epoch = 0
        self.resumed_progress: EpochProgress | None = None  # an epoch a resume continues in its middle
        self.best_score = -np.inf
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.best_val: dict | None = None
        self.history: list[dict] = []
        self.timings = {"train": 0.0, "recluster_features": 0.0, "kmeans": 0.0, "validation": 0.0, "data_wait": 0.0}

    @property
    def writes_files(self) -> bool:
        """Whether this process writes the run's files (it has an output folder and is rank 0)."""
        return self.out_dir is not None and self.dist.is_main

    # ------------------------------------------------------------------ embedding and evaluation
    def embed(self, split: Split, space: str = "embedding", indices: np.ndarray | None = None) -> np.ndarray:
        """``space="embedding"``: the full embedding; ``"backbone"``: pooled backbone features.

        ``indices``: only those images of the split (in that order). Under torchrun every rank
        embeds its shard of the split and every rank gets the whole result.
        """
        if indices is None and self.dist.enabled:
            local = self._embed_local(split, space, self.dist.shard(split.num_images))
            return self.dist.gather_rows(local, split.num_images)
        return self._embed_local(split, space, indices)

    def _embed_local(self, split: Split, space: str, indices: np.ndarray | None) -> np.ndarray:
        from dcml.model_runner import run_over_batches

        model, cached, learners = self.model, self.inputs.cached, self.active_learners

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            features = model.features(inputs, cached=cached)
            if space != "embedding":
                return features
            raw = model.head(features)
            # The learners' normalisation and the concatenation in float32, outside autocast.
            with torch.autocast(device_type=self.device.type, enabled=False):
                return model.head.full_embedding(raw.float(), learners)

        width = model.head.dim if space == "embedding" else model.backbone.feature_dim
        batches = self.inputs.eval_batches(split, indices, self.config.runtime.feature_batch_size)
        return run_over_batches(batches, forward, device=self.device, model=model, autocast=self.autocast,
                                total=split.num_images if indices is None else len(indices), width=width,
                                progress=self.progress, desc=f"embed {split.name}")

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
        features = None
        if plan.active_learners > 1:
            start = time.perf_counter()
            features = self.cluster_features(plan)
            self.timings["recluster_features"] += time.perf_counter() - start
        start = time.perf_counter()
        previous, c = self.clustering, self.config.clustering
        # One k-means (rank 0's) for the whole run: every rank then trains with the same clusters.
        self.clustering = self.dist.on_main(lambda: divide(features, self.train_labels, plan.active_learners, previous, c,
                                                           kmeans_seed(self.config.seed, plan.epoch)))
        if plan.active_learners > 1:
            self.timings["kmeans"] += time.perf_counter() - start

    def cluster_features(self, plan: EpochPlan) -> np.ndarray:
        """Features of every training image for k-means: a fresh pass, or the training pass's (reuse)."""
        space = self.config.clustering.space
        bank, self.feature_bank = self.feature_bank, None
        if bank is None or bank.epoch != plan.epoch - 1:
            return self.embed(self.train_split, space)
        bank = bank.pooled(self.dist)  # under torchrun each rank holds the rows its own batches visited
        missing = bank.missing()
        features = bank.features
        if len(missing):
            features[missing] = self.embed(self.train_split, "backbone", indices=missing)
        if space == "backbone":
            return features
        head = self.model.head
        was_training = head.training
        head.eval()
        with torch.inference_mode():
            with self.autocast():
                raw = head(torch.from_numpy(features).to(self.device))
            embedding = head.full_embedding(raw.float(), self.active_learners).float().cpu().numpy()
        head.train(was_training)
        return embedding

    def _keeps_features_for(self, plan: EpochPlan) -> bool:
        """Whether this epoch's training passes should be kept for the next epoch's re-clustering."""
        if not self.config.clustering.reuse_training_features or plan.epoch + 1 >= len(self.plans):
            return False
        upcoming = self.plans[plan.epoch + 1]
        return upcoming.recluster and upcoming.active_learners > 1

    # ------------------------------------------------------------------ one epoch
    def objective(self, plan: EpochPlan, raw: torch.Tensor, labels: torch.Tensor, learner: int) -> torch.Tensor:
        """The loss of one batch of cluster ``learner`` (see :mod:`dcml.training.objective`)."""
        return self.objective_of_phase(plan, raw, labels, learner)

    def train_epoch(self, plan: EpochPlan, progress: EpochProgress | None = None) -> dict:
        """Train the batches of one epoch (from ``progress.batches`` on when resumed in mid-epoch).

        A stop request (SIGTERM, Ctrl-C) is served at the next batch boundary: ``last.pt`` then
        holds ``progress`` and the run stops with :class:`TrainingStopped`.
        """
        from tqdm import tqdm

        from dcml.sampling import ClusterBatchSampler

        if progress is None:
            progress = EpochProgress.start(plan.epoch, {}, plan.active_learners)
        s = self.config.sampler
        sampler = ClusterBatchSampler(self.train_labels, self.clustering, classes_per_batch=s.classes_per_batch,
                                      images_per_class=s.images_per_class, epoch_length=s.epoch_length, seed=self.config.seed,
                                      batches_per_epoch=s.batches_per_epoch, pass_unit=s.pass_unit,
                                      fill_small_clusters=s.fill_small_clusters,
                                      num_replicas=self.dist.world_size, rank=self.dist.rank)
        sampler.set_epoch(plan.epoch, first_batch=progress.batches)
        epoch_batches = sampler.epoch_batches()
        if self._keeps_features_for(plan) and progress.bank is None:
            progress.bank = FeatureBank.empty(len(self.train_labels), self.model.backbone.feature_dim, plan.epoch)
        self.model.train()
        loss_parameters = list(self.loss.learnable_parameters())
        # Summed on the device and read once at the end: reading a loss every step would wait for the GPU.
        learner_losses = torch.as_tensor(progress.loss_sums, dtype=torch.float64).to(self.device)
        watch = DivergenceWatch(self.device, LOSS_DISPLAY_EVERY)
        bar = tqdm(total=epoch_batches, initial=progress.batches, unit="batch",
                   desc=f"epoch {plan.epoch + 1}/{len(self.plans)} {plan.phase}", disable=not self.progress, leave=False)
        start = time.perf_counter()
        with self.objective_of_phase.phase(plan), bar, self.stop.deferred():
            forward = self.forward.current()
            batches = iter(self.inputs.train_batches(self.train_split, self.train_labels, sampler))
            while True:
                if self._stop_requested_at(progress.batches):
                    watch.check()  # nothing trained past a non-finite loss is ever saved
                    progress.train_seconds += time.perf_counter() - start
                    progress.loss_sums = learner_losses.cpu().numpy()
                    self._save_last(plan.epoch, progress)
                    raise TrainingStopped(self.stop.requested or "SIGTERM",
                                          f"saved {self.out_dir}/{ckpt.LAST} after batch {progress.batches} of "
                                          f"{epoch_batches} in epoch {plan.epoch + 1}" if self.writes_files else "")
                wait_start = time.perf_counter()
                item = next(batches, None)
                progress.data_wait += time.perf_counter() - wait_start
                if item is None:
                    break
                inputs, labels, indices, learner = item
                labels = labels.to(self.device, non_blocking=True)
                with self.autocast():
                    features, raw = forward(self._to_device(inputs), cached=self.inputs.cached)
                if progress.bank is not None:
                    progress.bank.record(indices.numpy(), features.detach().float().cpu().numpy(),
                                         progress.batches * self.dist.world_size + self.dist.rank)
                loss = self.objective(plan, raw.float(), labels, learner)
                watch.record(loss, plan.epoch, progress.batches)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.dist.average_gradients(loss_parameters)
                self.optimizer.step()
                learner_losses[learner] += loss.detach()
                progress.batches += 1
                progress.images += len(labels)
                progress.learner_batches[learner] += 1
                bar.update(1)
                if self.progress and (progress.batches % LOSS_DISPLAY_EVERY == 0 or progress.batches == epoch_batches):
                    bar.set_postfix(loss=f"{float(learner_losses.sum()) / max(int(progress.learner_batches.sum()), 1):.4f}")
            watch.check()
        progress.train_seconds += time.perf_counter() - start
        progress.loss_sums = learner_losses.cpu().numpy()
        progress.trained = True
        progress.rng = ckpt.rng_state()  # a stop during validation resumes from here
        self.feature_bank = progress.bank
        return self._epoch_summary(progress)

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """A batch on the training device; image and feature maps channels-last (faster convolutions)."""
        inputs = inputs.to(self.device, non_blocking=True)
        return inputs.contiguous(memory_format=torch.channels_last) if inputs.ndim == 4 else inputs

    def _stop_requested_at(self, batch: int) -> bool:
        """Whether to stop before this batch. Under torchrun ranks must stop together: they agree every few batches."""
        if not self.dist.enabled:
            return self.stop.requested is not None
        return batch % LOSS_DISPLAY_EVERY == 0 and batch > 0 and self.dist.any(self.stop.requested is not None)

    def _epoch_summary(self, progress: EpochProgress) -> dict:
        sums, learner_batches, images = progress.loss_sums, progress.learner_batches, progress.images
        if self.dist.enabled:  # the log reports the loss over every rank's batches
            shares = self.dist.all_gather_objects((sums, learner_batches, images))
            sums = sum(share[0] for share in shares)
            learner_batches = sum(share[1] for share in shares)
            images = sum(share[2] for share in shares)
        batches = int(learner_batches.sum())
        return {
            "loss": float(sums.sum()) / max(batches, 1),
            "batches": batches,
            "images": int(images),
            "learner_loss": [float(l / n) if n else None for l, n in zip(sums, learner_batches)],
            "data_wait_seconds": progress.data_wait,
        }

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
                raise TrainingDiverged(divergence_message(bad.epoch, bad.batch, self._kept_checkpoint(), rates, precision)) from None

    def _kept_checkpoint(self) -> str:
        if not self.writes_files:
            return "no checkpoint is written by this run"
        if not (self.out_dir / ckpt.LAST).is_file():
            return "no checkpoint had been written yet"
        return f"{self.out_dir}/{ckpt.LAST} keeps the state after epoch {len(self.history)}, before the bad step"

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
        from dcml.training.optim import set_learning_rates

        epoch_start = time.perf_counter()
        set_learning_rates(self.optimizer, self.base_lrs, plan)
        self.active_learners = plan.active_learners
        progress, self.resumed_progress = self.resumed_progress, None
        if progress is None or progress.epoch != plan.epoch:
            record: dict = {"epoch": plan.epoch, "phase": plan.phase, "learners": plan.active_learners,
                            "backbone_frozen": plan.backbone_frozen, "lr_scale": plan.lr_scale}
            if plan.recluster or self.clustering is None:
                before = self.timings["recluster_features"] + self.timings["kmeans"]
                self.recluster(plan)
                record["recluster_seconds"] = self.timings["recluster_features"] + self.timings["kmeans"] - before
                record["cluster_images"] = self.clustering.cluster_sizes().tolist()
                record["cluster_classes"] = self.clustering.classes_per_cluster().tolist()
            progress = EpochProgress.start(plan.epoch, record, plan.active_learners)
        if progress.trained:  # resumed after this epoch's batches, before its validation
            self.feature_bank = progress.bank
            summary = self._epoch_summary(progress)
        else:
            summary = self.train_epoch(plan, progress)  # its summary: gathering it again would repeat a collective
        record = progress.record
        record.update(summary)
        self.timings["train"] += progress.train_seconds
        self.timings["data_wait"] += progress.data_wait
        record["images_per_second"] = record["images"] / max(progress.train_seconds, 1e-9)
        record["data_wait_share"] = record["data_wait_seconds"] / max(progress.train_seconds, 1e-9)
        rows = None
        if (plan.epoch + 1) % self.config.evaluation.every == 0 or plan.epoch == len(self.plans) - 1:
            val_start = time.perf_counter()
            try:
                rows = self.evaluate("val", with_nmi=self.config.evaluation.val_nmi)
            except TrainingStopped as stopped:
                # The epoch's batches are done: keep them, validation reruns on resume.
                with self.stop.deferred():
                    self._save_last(plan.epoch, progress)
                stopped.saved = (f"saved {self.out_dir}/{ckpt.LAST} after the batches of epoch {plan.epoch + 1}, "
                                 "before its validation") if self.writes_files else ""
                raise
            self.timings["validation"] += time.perf_counter() - val_start
        with self.stop.deferred():  # the selection, best.pt and last.pt change together
            if rows is not None:
                self._select(plan, rows, record)
            record["seconds"] = time.perf_counter() - epoch_start + progress.earlier_seconds
            self.history.append(record)
            self._save_last(plan.epoch + 1)
        from dcml.training.reporting import epoch_line

        self.echo(epoch_line(record, len(self.plans), self.config.evaluation.selection_metric))
        if self.loggers:
            rates = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
            parameters = {name: parameter for name, parameter in self.loss.named_parameters() if parameter.requires_grad}
            for logger in self.loggers:
                logger.epoch(record, rates, parameters)

    def _select(self, plan: EpochPlan, rows: dict, record: dict) -> None:
        """Model selection on the validation score; the best epoch's weights go to ``best.pt``."""
        score = self._selection_score(rows)
        record["val"] = rows
        record["score"] = score
        if score > self.best_score:
            self.best_score, self.best_epoch, self.best_val = score, plan.epoch, rows
            self.best_state = copy.deepcopy(self.model.state_dict())
            record["best"] = True
            if self.writes_files:
                ckpt.save_checkpoint(self.out_dir / ckpt.BEST, {"config": self.config.to_dict(), "model": self.best_state,
                                                                "epoch": self.best_epoch, "val": self.best_val,
                                                                "active_learners": self.active_learners})

    def _selection_score(self, rows: dict) -> float:
        row, _, metric = self.config.evaluation.selection_metric.partition("/")
        if metric not in rows[row]:
            raise UserError(f"evaluation.selection_metric {self.config.evaluation.selection_metric!r}: validation has no "
                            f"metric {metric!r}; it has {', '.join(k for k in rows[row] if not k.startswith('num_'))}")
        return float(rows[row][metric])

    def finish(self, seconds: float) -> dict:
        """Test the selected epoch's weights; write metrics.json."""
        from dcml.training.reporting import run_result

        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        result = run_result(dataset=self.dataset.name, config=self.config, epochs=len(self.plans), best_epoch=self.best_epoch,
                            best_score=self.best_score, best_val=self.best_val, test=self.evaluate(None, with_nmi=True),
                            seconds=seconds, timings=self.timings)
        if self.writes_files:
            save_json_atomically(self.out_dir / METRICS_FILE, result)
        return result

    # ------------------------------------------------------------------ checkpoints
    def _save_last(self, next_epoch: int, progress: EpochProgress | None = None) -> None:
        """Write ``last.pt``: after an epoch (``next_epoch`` = epochs done), or inside epoch
        ``next_epoch`` at a batch boundary (``progress``). Collective under torchrun."""
        if self.out_dir is None:
            return
        # Every rank hands over its RNG state (and its share of an epoch in progress), so a resumed
        # torchrun run continues each rank's streams.
        rng = progress.rng if progress is not None and progress.trained else ckpt.rng_state()
        rng_per_rank = self.dist.all_gather_objects(rng) if self.dist.enabled else None
        if self.feature_bank is not None:
            self.feature_bank = self.feature_bank.pooled(self.dist)  # rank 0 saves every rank's rows
        epoch_progress = None
        if progress is not None:
            per_rank = self.dist.all_gather_objects(progress.rank_state())
            epoch_progress = progress.state(per_rank, None if progress.bank is None else progress.bank.pooled(self.dist))
        if not self.dist.is_main:
            return
        clustering = None
        if self.clustering is not None:
            clustering = {"assignment": self.clustering.assignment, "usable": self.clustering.usable,
                          "num_clusters": self.clustering.num_clusters}
        state = RunState(config=self.config.to_dict(), dataset=dataset_identity(self.dataset), next_epoch=next_epoch,
                         model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), loss=self.loss.state_dict(),
                         clustering=clustering, active_learners=self.active_learners,
                         feature_bank=None if self.feature_bank is None else self.feature_bank.state(),
                         best={"score": self.best_score, "epoch": self.best_epoch, "val": self.best_val},
                         history=self.history, timings=self.timings, rng=rng, rng_per_rank=rng_per_rank,
                         epoch_progress=epoch_progress)
        ckpt.save_checkpoint(self.out_dir / ckpt.LAST, state.payload())
        write_log(self.out_dir, self.history)

    def resume(self, checkpoint: dict) -> None:
        """Continue from a ``last.pt`` payload: weights, optimiser, betas, clusters, RNG, history, and an
        epoch in progress. A checkpoint that does not fit this run is refused in one line."""
        path = checkpoint.get("path", ckpt.LAST)
        state = RunState.from_checkpoint(checkpoint)
        check_same_dataset(state.dataset, dataset_identity(self.dataset), self.config.data.root)
        try:
            self._restore(state)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path} cannot be resumed: {text} (damaged, or written for other settings)") from None

    def _restore(self, state: RunState) -> None:
        from dcml.clustering import Clustering

        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.loss.load_state_dict(state.loss)
        if state.clustering is not None:
            c = state.clustering
            self.clustering = Clustering(assignment=np.asarray(c["assignment"]), usable=np.asarray(c["usable"]),
                                         num_clusters=int(c["num_clusters"]), labels=self.train_labels)
        best = state.best
        self.best_score, self.best_epoch, self.best_val = float(best["score"]), best["epoch"], best["val"]
        if self.best_epoch is not None and self.out_dir is not None:
            # Every rank needs the selected weights for the sharded test pass; rank 0 reads the file.
            self.best_state = self.dist.on_main(lambda: read_selected_weights(self.out_dir / ckpt.BEST, int(self.best_epoch)))
        self.history = list(state.history)
        self.timings = dict(state.timings)
        self.start_epoch = state.next_epoch
        self.active_learners = state.active_learners
        self.feature_bank = FeatureBank.from_state(state.feature_bank)
        if state.epoch_progress is not None:
            saved_ranks = len(state.epoch_progress["per_rank"])
            if saved_ranks != self.dist.world_size:
                raise UserError(f"this run was stopped inside an epoch by a {saved_ranks}-process run; resume it with that "
                                f"many processes ({self.dist.world_size} now)")
            self.resumed_progress = EpochProgress.from_state(state.epoch_progress, self.dist.rank)
        per_rank = state.rng_per_rank
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            ckpt.restore_rng_state(per_rank[self.dist.rank])
        elif not self.dist.enabled:
            ckpt.restore_rng_state(state.rng)
        else:
            # Another number of ranks than the run was saved with: continue with fresh per-rank streams.
            if self.dist.is_main:
                saved = len(per_rank) if per_rank is not None else 1
                warnings.warn(f"resuming a {saved}-process run with {self.dist.world_size} processes: the random streams "
                              "are reseeded, so the run will not match an uninterrupted one exactly", stacklevel=2)
            seed_everything(self.config.seed + RANK_SEED_STRIDE * self.dist.rank + state.next_epoch)

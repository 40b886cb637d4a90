"""The training loop: dataset records -> cluster sampler -> model -> loss, epoch by epoch.

Every epoch follows :func:`~dcml.training.schedule.plan_schedule`: re-cluster when planned
(features of the training set with test-time transforms, k-means, Hungarian matching to the previous
clusters), draw every batch from one cluster, apply the loss to that cluster's learner (divide) or
to the full embedding (conquer / finetune), validate on the validation classes, checkpoint.
Model selection uses the validation split only; the test report uses the selected epoch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dcml.config import TrainConfig, validate_against_data
from dcml.data.records import Dataset, Split
from dcml.errors import UserError
from dcml.io import save_json_atomically, write_atomically
from dcml.training import checkpoint as ckpt
from dcml.training.distributed import SINGLE, Distributed
from dcml.training.schedule import DIVIDE, FINETUNE, EpochPlan, plan_schedule
from dcml.training.stopping import (DivergenceWatch, NonFiniteLoss, StopSignals, TrainingDiverged, TrainingStopped,
                                   divergence_message)

LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
#: Seeds of the per-epoch k-means: run seed x this + epoch, so epochs and runs never share one.
KMEANS_SEED_STRIDE = 100_003
#: Under torchrun rank r draws its dropout and negative-sampling randomness from seed + r x this.
RANK_SEED_STRIDE = 1_000_003
#: Progress-bar loss refresh period in batches (reading the loss waits for the GPU).
LOSS_DISPLAY_EVERY = 25


def resolve_device(name: str, distributed: Distributed = SINGLE) -> torch.device:
    """``auto``: CUDA when available, else the CPU; under torchrun each rank takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available (use device=cpu)")
    if device.type == "cuda" and distributed.enabled:
        device = torch.device("cuda", distributed.local_rank)
    return device


def autocast_for(precision: str, device: torch.device):
    """A context-manager factory: bf16 autocast (CUDA; ``auto`` or ``bf16``) or nothing (the CPU, ``fp32``)."""
    if precision == "bf16" and device.type != "cuda":
        raise UserError("runtime.precision=bf16 needs a CUDA device; use auto (bf16 on CUDA, float32 on the CPU) or fp32")
    if precision in ("auto", "bf16") and device.type == "cuda":
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


class TrainForward(torch.nn.Module):
    """The differentiable part of a training step, as one module so DDP (and torch.compile) can wrap it:
    inputs -> (pooled backbone features, raw embedding)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, cached: bool = False):
        features = self.model.features(inputs, cached=cached)
        return features, self.model.head(features)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def without_pretrained_weights(config: TrainConfig) -> TrainConfig:
    """``config`` building a randomly initialised backbone (its weights are about to be replaced)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=False, weights=None))


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out ``fraction`` of the training classes (seeded) as a validation split."""
    classes = np.unique(train.labels)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(classes, size=max(2, round(fraction * len(classes))), replace=False).tolist())
    mask = np.array([label in held for label in train.labels])

    def take(name: str, keep: np.ndarray) -> Split:
        groups = None if train.groups is None else train.groups[keep]
        return Split(name, tuple(p for p, k in zip(train.paths, keep) if k), train.labels[keep], groups)

    return take("train", ~mask), take("val", mask)


def prepare_dataset(config: TrainConfig) -> Dataset:
    """The dataset with a ``train`` and a ``val`` split (carved from train when it has none), and the
    configuration's Recall@K list (``evaluation.recall_ks``) in its evaluation spec."""
    from dcml.data import load_dataset

    dataset = load_dataset(config.data.dataset, Path(config.data.root).expanduser() if config.data.root else None)
    if config.evaluation.recall_ks is not None:
        spec = dataclasses.replace(dataset.evaluation, recall_ks=tuple(config.evaluation.recall_ks))
        dataset = dataclasses.replace(dataset, evaluation=spec)
    if "val" in dataset.splits:
        return dataset
    train, val = carve_validation(dataset.split("train"), config.data.validation_fraction, config.seed)
    return dataclasses.replace(dataset, splits={**dataset.splits, "train": train, "val": val})


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
    bank: np.ndarray | None = None  # training-pass backbone features (reuse_training_features)
    bank_visits: np.ndarray | None = None  # global batch position that last wrote each row; -1: none yet
    trained: bool = False  # every batch done, validation still to come
    rng: dict | None = None  # the RNG states when the batches finished (trained only)

    @classmethod
    def start(cls, epoch: int, record: dict, learners: int) -> "EpochProgress":
        return cls(epoch, record, np.zeros(learners, dtype=np.float64), np.zeros(learners, dtype=np.int64))

    def add_time(self, seconds: float) -> None:
        self.train_seconds += seconds

    def rank_state(self) -> dict:
        """What differs between ranks (each rank sums the losses of its own batches)."""
        return {"loss_sums": torch.from_numpy(self.loss_sums.copy()), "learner_batches": torch.from_numpy(self.learner_batches.copy()),
                "images": int(self.images), "data_wait": float(self.data_wait)}

    def state(self, per_rank: list[dict], bank: np.ndarray | None, visits: np.ndarray | None) -> dict:
        return {"epoch": self.epoch, "record": self.record, "batches": self.batches, "train_seconds": self.train_seconds,
                "trained": self.trained, "rng": self.rng, "per_rank": per_rank,
                "bank": None if bank is None else torch.from_numpy(bank),
                "bank_visits": None if visits is None else torch.from_numpy(visits)}

    @classmethod
    def from_state(cls, state: dict, rank: int) -> "EpochProgress":
        mine = state["per_rank"][rank]
        bank, visits = state.get("bank"), state.get("bank_visits")
        return cls(epoch=int(state["epoch"]), record=dict(state["record"]), loss_sums=mine["loss_sums"].numpy().astype(np.float64),
                   learner_batches=mine["learner_batches"].numpy().astype(np.int64), batches=int(state["batches"]),
                   images=int(mine["images"]), data_wait=float(mine["data_wait"]), train_seconds=float(state["train_seconds"]),
                   earlier_seconds=float(state["train_seconds"]), bank=None if bank is None else bank.numpy().copy(),
                   bank_visits=None if visits is None else visits.numpy().copy(), trained=bool(state["trained"]), rng=state["rng"])


def dataset_identity(dataset: Dataset) -> dict:
    """What a resume checks against the data on disk: image counts, classes and a digest of each training
    and validation image's class folder + file name and label (stable when the dataset folder moves)."""
    identity = {"name": dataset.name}
    for name in ("train", "val"):
        split = dataset.split(name)
        digest = hashlib.sha256()
        for path, label in zip(split.paths, split.labels.tolist()):
            digest.update(f"{'/'.join(Path(path).parts[-2:])}\t{label}\n".encode("utf-8", "surrogateescape"))
        identity[name] = {"images": split.num_images, "classes": int(len(np.unique(split.labels))), "sha256": digest.hexdigest()}
    return identity


class Trainer:
    """One training run. ``shared_inputs`` lets several runs in one process reuse cached features."""

    def __init__(self, config: TrainConfig, out_dir: Path | None, *, progress: bool = True, echo=None,
                 dataset: Dataset | None = None, shared_inputs: dict | None = None, distributed: Distributed = SINGLE,
                 load_pretrained: bool = True):
        from dcml.models.embedding_model import build_model
        from dcml.training import preflight

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

        # load_pretrained=False: every weight will come from a checkpoint (resume, evaluate), so the
        # backbone's ImageNet weights are neither needed nor read.
        self.model = build_model(config if load_pretrained else without_pretrained_weights(config)).to(self.device)
        if config.runtime.channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        validate_against_data(config, len(self.class_ids), self.model.backbone.num_units, self.dataset.evaluation.protocol.value)
        preflight.check_selection_metric(config, self.val_split)
        self.loss = preflight.create_configured_loss(config, len(self.class_ids)).to(self.device)
        self.optimizer = self._build_optimizer()
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.inputs = self._build_inputs(shared_inputs)
        self.train_forward = TrainForward(self.model)
        if config.runtime.compile:
            self.train_forward.compile()
        self._ddp = None  # the DistributedDataParallel wrapper of train_forward (torchrun only)
        self._ddp_key = None
        if distributed.enabled:
            # Every rank starts from rank 0's weights (DDP broadcasts them); the randomness of
            # dropout and negative sampling differs per rank.
            seed_everything(config.seed + RANK_SEED_STRIDE * distributed.rank)

        self.plans = plan_schedule(config)
        self.active_learners = self.plans[0].active_learners  # how the full embedding is assembled now
        self.clustering = None
        self._feature_bank: np.ndarray | None = None  # training-pass features kept for re-clustering
        self._feature_bank_visits: np.ndarray | None = None  # which batch wrote each row (see _combined_bank)
        self._feature_bank_epoch: int | None = None
        self._resumed_progress: EpochProgress | None = None  # an epoch a resume continues in its middle
        self.stop = StopSignals()
        self.start_epoch = 0
        self.best_score = -np.inf
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.best_val: dict | None = None
        self.history: list[dict] = []
        self.timings = {"train": 0.0, "recluster_features": 0.0, "kmeans": 0.0, "validation": 0.0, "data_wait": 0.0}

    # ------------------------------------------------------------------ setup
    def _build_optimizer(self) -> torch.optim.Optimizer:
        o, m = self.config.optimizer, self.config.model
        head = self.model.head
        groups = [
            {"name": "backbone", "params": self.model.backbone_parameters(), "lr": o.lr_backbone, "weight_decay": o.weight_decay},
            {"name": "embedding", "params": list(head.linear.parameters()), "lr": o.lr_embedding, "weight_decay": o.weight_decay},
        ]
        if head.masks is not None:
            groups.append({"name": "masks", "params": [head.masks], "lr": o.lr_embedding * m.mask_lr_multiplier,
                           "weight_decay": o.weight_decay * o.mask_weight_decay_multiplier})
        betas = list(self.loss.learnable_parameters())
        if betas:
            groups.append({"name": "beta", "params": betas, "lr": o.lr_beta, "weight_decay": 0.0})
        groups = [g for g in groups if g["params"]]
        return torch.optim.Adam(groups)

    def input_cache_key(self) -> tuple:
        d, m = self.config.data, self.config.model
        return (d.dataset, d.root, d.image_size, m.backbone, m.pretrained, m.weights, m.trainable_blocks)

    def _build_inputs(self, shared: dict | None):
        from dcml.training.inputs import CachedInputs, ImageInputs, LoaderSettings

        d, r = self.config.data, self.config.runtime
        backbone = self.model.backbone
        test_transform = backbone.test_transform(d.image_size)
        loader = LoaderSettings(num_workers=d.num_workers, pin_memory=r.pin_memory and self.device.type == "cuda",
                                persistent_workers=r.persistent_workers, prefetch_factor=r.prefetch_factor,
                                max_image_pixels=d.max_image_pixels)
        if not d.cache_frozen_features:
            if d.train_augmentation == "none":
                train_transform = test_transform
            else:
                train_transform = backbone.train_transform(d.image_size, horizontal_flip=d.train_augmentation == "crop_flip")
            return ImageInputs(train_transform, test_transform, loader, d.eval_batch_size, self.device)
        key = self.input_cache_key()
        if shared is not None and key in shared:
            return shared[key]
        # The frozen units hold the same (pretrained) weights in every run that shares this key.
        inputs = CachedInputs(self.model, test_transform, loader, d.eval_batch_size, self.device, self.progress, self.autocast)
        if shared is not None:
            shared[key] = inputs
        return inputs

    # ------------------------------------------------------------------ embedding
    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """A batch on the training device; image and feature maps channels-last (faster convolutions)."""
        inputs = inputs.to(self.device, non_blocking=True)
        return inputs.contiguous(memory_format=torch.channels_last) if inputs.ndim == 4 else inputs

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
        from dcml.embedding import run_over_batches

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
        from dcml.clustering import cluster_training_set, split_clusters

        c = self.config.clustering
        previous = self.clustering
        if plan.active_learners == 1:
            dummy = np.zeros((len(self.train_labels), 1), dtype=np.float32)  # K = 1 needs no features
            self.clustering = cluster_training_set(dummy, self.train_labels, 1, min_classes_per_cluster=c.min_classes_per_cluster)
            return
        start = time.perf_counter()
        features = self._cluster_features(plan)
        self.timings["recluster_features"] += time.perf_counter() - start
        start = time.perf_counter()
        options = dict(unit=c.unit, backend=c.backend, iterations=c.kmeans_iterations,
                       seed=self.config.seed * KMEANS_SEED_STRIDE + plan.epoch, min_classes_per_cluster=c.min_classes_per_cluster)

        def kmeans():
            if c.hierarchical and previous is not None and plan.active_learners == 2 * previous.num_clusters:
                return split_clusters(features, self.train_labels, previous.assignment, **options)
            same_k = previous is not None and previous.num_clusters == plan.active_learners
            return cluster_training_set(features, self.train_labels, plan.active_learners,
                                        previous=previous.assignment if same_k else None, **options)

        # One k-means (rank 0's) for the whole run: every rank then trains with the same clusters.
        self.clustering = self.dist.on_main(kmeans)
        self.timings["kmeans"] += time.perf_counter() - start

    def _cluster_features(self, plan: EpochPlan) -> np.ndarray:
        """Features of every training image for k-means: a fresh pass, or the training pass's (reuse)."""
        space = self.config.clustering.space
        bank = self._feature_bank if self._feature_bank_epoch == plan.epoch - 1 else None
        visits = self._feature_bank_visits
        self._feature_bank = self._feature_bank_visits = None
        if bank is None:
            return self.embed(self.train_split, space)
        # Under torchrun each rank holds the rows of the images its own batches visited.
        bank = self._combined_bank(bank, visits)
        missing = np.flatnonzero(np.isnan(bank[:, 0]))
        if len(missing):
            bank[missing] = self.embed(self.train_split, "backbone", indices=missing)
        if space == "backbone":
            return bank
        head = self.model.head
        was_training = head.training
        head.eval()
        with torch.inference_mode():
            features = torch.from_numpy(bank).to(self.device)
            with self.autocast():
                raw = head(features)
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
    def _set_learning_rates(self, plan: EpochPlan) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * plan.lr_scale

    def _forward_module(self, plan: EpochPlan) -> torch.nn.Module:
        """train_forward, under torchrun wrapped in DDP for this epoch's set of trainable parameters.

        DDP fixes the parameters it synchronises when it is built, so a backbone freeze (or the masks
        leaving the loss after the divide phase) builds a new wrapper; the old one is dropped first.
        """
        if not self.dist.enabled:
            return self.train_forward
        key = tuple(name for name, p in self.train_forward.named_parameters() if p.requires_grad)
        if self._ddp is None or self._ddp_key != key:
            from torch.nn.parallel import DistributedDataParallel

            self._ddp = None
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.train_forward, device_ids=device_ids,
                                                broadcast_buffers=not self.config.model.freeze_bn_stats)
            self._ddp_key = key
        return self._ddp

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
        self.model.train()
        self.model.set_backbone_trainable(not plan.backbone_frozen)
        head = self.model.head
        if head.masks is not None:
            head.masks.requires_grad_(plan.phase == DIVIDE)  # the conquer/finetune loss does not use the masks
        forward = self._forward_module(plan)
        mask_weight = self.config.model.mask_regularization if head.masks is not None and plan.phase == DIVIDE else 0.0
        loss_parameters = list(self.loss.learnable_parameters())
        if self._keeps_features_for(plan) and progress.bank is None:
            progress.bank = np.full((len(self.train_labels), self.model.backbone.feature_dim), np.nan, dtype=np.float32)
            progress.bank_visits = np.full(len(self.train_labels), -1, dtype=np.int64)
        # Summed on the device and read once at the end: reading a loss every step would wait for the GPU.
        learner_losses = torch.as_tensor(progress.loss_sums, dtype=torch.float64).to(self.device)
        watch = DivergenceWatch(self.device, LOSS_DISPLAY_EVERY)
        bar = tqdm(total=epoch_batches, initial=progress.batches, unit="batch",
                   desc=f"epoch {plan.epoch + 1}/{len(self.plans)} {plan.phase}", disable=not self.progress, leave=False)
        batch_iterator = iter(self.inputs.train_batches(self.train_split, self.train_labels, sampler))
        start = time.perf_counter()
        try:
            with bar, self.stop.deferred():
                while True:
                    if self._stop_requested_at(progress.batches):
                        watch.check()  # nothing trained past a non-finite loss is ever saved
                        progress.add_time(time.perf_counter() - start)
                        start = time.perf_counter()
                        progress.loss_sums = learner_losses.cpu().numpy()
                        self._save_last(plan.epoch, progress)
                        raise TrainingStopped(self.stop.requested or "SIGTERM",
                                              f"saved {self.out_dir}/{ckpt.LAST} after batch {progress.batches} of "
                                              f"{epoch_batches} in epoch {plan.epoch + 1}" if self.writes_files else "")
                    wait_start = time.perf_counter()
                    item = next(batch_iterator, None)
                    progress.data_wait += time.perf_counter() - wait_start
                    if item is None:
                        break
                    inputs, labels, indices, learner = item
                    labels = labels.to(self.device, non_blocking=True)
                    with self.autocast():
                        features, raw = forward(self._to_device(inputs), cached=self.inputs.cached)
                    raw = raw.float()
                    if progress.bank is not None:
                        rows = indices.numpy()
                        progress.bank[rows] = features.detach().float().cpu().numpy()
                        progress.bank_visits[rows] = progress.batches * self.dist.world_size + self.dist.rank
                    loss = self.objective(plan, raw, labels, learner)
                    if mask_weight:
                        loss = loss + mask_weight * head.mask_similarity()
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
        finally:
            self.model.set_backbone_trainable(True)
            if head.masks is not None:
                head.masks.requires_grad_(True)
        progress.add_time(time.perf_counter() - start)
        progress.loss_sums = learner_losses.cpu().numpy()
        progress.trained = True
        progress.rng = ckpt.rng_state()  # a stop during validation resumes from here
        self._epoch_finished_training(plan, progress)
        return self._epoch_summary(progress)

    def objective(self, plan: EpochPlan, raw: torch.Tensor, labels: torch.Tensor, learner: int) -> torch.Tensor:
        """The loss of one batch drawn from cluster ``learner``, by phase.

        Divide: the learner's own (normalised) slice or mask, with that learner's loss parameters.
        Conquer: the full normalised embedding, still with the batch's learner's parameters (its beta):
        batches stay per cluster after the conquer epoch, as in the authors' v1 code.
        Finetune: the full embedding as one metric, with the first learner's parameters.
        """
        head = self.model.head
        if plan.phase == DIVIDE:
            embeddings = head.learner_embedding(raw, learner, plan.active_learners)
        else:
            embeddings = head.full_embedding(raw, plan.active_learners)
        return self.loss(embeddings, labels, learner=0 if plan.phase == FINETUNE else learner)

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
                raise TrainingDiverged(divergence_message(
                    bad.epoch, bad.batch, self._kept_checkpoint(),
                    {g["name"]: g["lr"] for g in self.optimizer.param_groups}, self._effective_precision())) from None

    def _kept_checkpoint(self) -> str:
        if not self.writes_files:
            return "no checkpoint is written by this run"
        if not (self.out_dir / ckpt.LAST).is_file():
            return "no checkpoint had been written yet"
        return f"{self.out_dir}/{ckpt.LAST} keeps the state after epoch {len(self.history)}, before the bad step"

    def _effective_precision(self) -> str:
        return "bf16" if self.config.runtime.precision in ("auto", "bf16") and self.device.type == "cuda" else "fp32"

    def _fit(self) -> dict:
        run_start = time.perf_counter()
        plans = self.plans
        if self.inputs.cached and self.start_epoch < len(plans):
            # One-time preparation, timed apart so it does not count as re-clustering or training.
            start = time.perf_counter()
            self.inputs.tensor(self.train_split)
            self.inputs.tensor(self.val_split)
            self.timings["cache_frozen_units"] = self.timings.get("cache_frozen_units", 0.0) + time.perf_counter() - start
        for plan in plans[self.start_epoch:]:
            epoch_start = time.perf_counter()
            self._set_learning_rates(plan)
            self.active_learners = plan.active_learners
            progress, self._resumed_progress = self._resumed_progress, None
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
            if not progress.trained:
                self.train_epoch(plan, progress)
            else:  # resumed after this epoch's batches, before its validation
                self._epoch_finished_training(plan, progress)
            record = progress.record
            record.update(self._epoch_summary(progress))
            self.timings["train"] += progress.train_seconds
            self.timings["data_wait"] += progress.data_wait
            record["images_per_second"] = record["images"] / max(progress.train_seconds, 1e-9)
            record["data_wait_share"] = record["data_wait_seconds"] / max(progress.train_seconds, 1e-9)
            is_last = plan.epoch == len(plans) - 1
            rows = None
            if (plan.epoch + 1) % self.config.evaluation.every == 0 or is_last:
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
                    score = self._selection_score(rows)
                    record["val"] = rows
                    record["score"] = score
                    if score > self.best_score:
                        self.best_score, self.best_epoch, self.best_val = score, plan.epoch, rows
                        self.best_state = copy.deepcopy(self.model.state_dict())
                        record["best"] = True
                        self._save_best()
                record["seconds"] = time.perf_counter() - epoch_start + progress.earlier_seconds
                self.history.append(record)
                self._save_last(plan.epoch + 1)
            self.echo(self._epoch_line(record))
            if self.dist.any(self.stop.requested is not None):
                raise TrainingStopped(self.stop.requested, f"saved {self.out_dir}/{ckpt.LAST} after epoch {plan.epoch + 1}"
                                      if self.writes_files else "")
        return self.finish(time.perf_counter() - run_start)

    def _epoch_finished_training(self, plan: EpochPlan, progress: EpochProgress) -> None:
        """Hand the epoch's training-pass features to the next re-clustering (see ``reuse_training_features``)."""
        if progress.bank is not None:
            self._feature_bank, self._feature_bank_visits = progress.bank, progress.bank_visits
            self._feature_bank_epoch = plan.epoch

    def _selection_score(self, rows: dict) -> float:
        row, _, metric = self.config.evaluation.selection_metric.partition("/")
        if metric not in rows[row]:
            raise UserError(f"evaluation.selection_metric {self.config.evaluation.selection_metric!r}: validation has no "
                            f"metric {metric!r}; it has {', '.join(k for k in rows[row] if not k.startswith('num_'))}")
        return float(rows[row][metric])

    def _epoch_line(self, record: dict) -> str:
        line = f"epoch {record['epoch'] + 1:>3}/{len(self.plans)}  {record['phase']:<8} K={record['learners']}  loss {record['loss']:.4f}"
        if "score" in record:
            line += f"  val {self.config.evaluation.selection_metric} {100 * record['score']:.2f}" + (" *" if record.get("best") else "")
        if "cluster_images" in record and record["learners"] > 1:
            line += f"  clusters {record['cluster_images']}"
        return line + f"  {record['seconds']:.1f} s"

    def finish(self, seconds: float) -> dict:
        """Test the selected epoch's weights; write metrics.json."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        test = self.evaluate(None, with_nmi=True)
        total_recluster = self.timings["recluster_features"] + self.timings["kmeans"]
        result = {
            "dataset": self.dataset.name,
            "selected_epoch": None if self.best_epoch is None else self.best_epoch + 1,
            "selection_metric": self.config.evaluation.selection_metric,
            "selection_score": self.best_score if self.best_epoch is not None else None,
            "val": self.best_val,
            "test": test,
            "learners": self.config.clustering.learners,
            "epochs": len(self.plans),
            "seconds": seconds,
            "timings": dict(self.timings),
            "recluster_share": total_recluster / max(sum(self.timings[k] for k in ("train", "recluster_features", "kmeans")), 1e-9),
        }
        if self.writes_files:
            save_json_atomically(self.out_dir / METRICS_FILE, result)
        return result

    @property
    def writes_files(self) -> bool:
        """Whether this process writes the run's files (it has an output folder and is rank 0)."""
        return self.out_dir is not None and self.dist.is_main

    # ------------------------------------------------------------------ checkpoints
    def _state(self, next_epoch: int) -> dict:
        clustering = None
        if self.clustering is not None:
            clustering = {"assignment": self.clustering.assignment, "usable": self.clustering.usable,
                          "num_clusters": self.clustering.num_clusters}
        return {
            "config": self.config.to_dict(),
            "dataset": dataset_identity(self.dataset),
            "next_epoch": next_epoch,
            "epoch_progress": None,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss.state_dict(),
            "clustering": clustering,
            "active_learners": self.active_learners,
            # Kept so a resumed run re-clusters on the same features as an uninterrupted one.
            "feature_bank": None if self._feature_bank is None else torch.from_numpy(self._feature_bank),
            "feature_bank_visits": None if self._feature_bank_visits is None else torch.from_numpy(self._feature_bank_visits),
            "feature_bank_epoch": self._feature_bank_epoch,
            "best": {"score": self.best_score, "epoch": self.best_epoch, "val": self.best_val},
            "history": self.history,
            "timings": self.timings,
            "rng": ckpt.rng_state(),
        }

    def _save_last(self, next_epoch: int, progress: EpochProgress | None = None) -> None:
        """Write ``last.pt``: after an epoch (``next_epoch`` = epochs done), or inside epoch
        ``next_epoch`` at a batch boundary (``progress``). Collective under torchrun."""
        if self.out_dir is None:
            return
        # Every rank hands over its RNG state (and its share of an epoch in progress), so a resumed
        # torchrun run continues each rank's streams.
        rng = progress.rng if progress is not None and progress.trained else ckpt.rng_state()
        rng_per_rank = self.dist.all_gather_objects(rng) if self.dist.enabled else None
        if self._feature_bank is not None and self.dist.enabled:  # rank 0 saves every rank's rows
            self._feature_bank = self._combined_bank(self._feature_bank, self._feature_bank_visits)
            self._feature_bank_visits = self.dist.all_reduce(self._feature_bank_visits, "max")
        epoch_progress = None
        if progress is not None:
            per_rank = self.dist.all_gather_objects(progress.rank_state())
            bank = None if progress.bank is None else self._combined_bank(progress.bank, progress.bank_visits)
            visits = None if progress.bank is None else self.dist.all_reduce(progress.bank_visits, "max")
            epoch_progress = progress.state(per_rank, bank, visits)
        if not self.dist.is_main:
            return
        state = self._state(next_epoch)
        state["epoch_progress"] = epoch_progress
        state["rng"] = rng
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
        ckpt.save_checkpoint(self.out_dir / ckpt.LAST, state)
        lines = "".join(json.dumps(record) + "\n" for record in self.history).encode()
        write_atomically({self.out_dir / LOG_FILE: lambda stream: stream.write(lines)})

    def _combined_bank(self, bank: np.ndarray, visits: np.ndarray) -> np.ndarray:
        """Under torchrun, every rank's training-pass features in one bank: each row from the rank
        whose batch visited that image last (the lowest such rank when several hold the same visit)."""
        if not self.dist.enabled:
            return bank
        latest = self.dist.all_reduce(visits, "max")
        holds = (visits == latest) & (latest >= 0)
        owner = self.dist.all_reduce(np.where(holds, self.dist.rank, self.dist.world_size).astype(np.int64), "min")
        mine = holds & (owner == self.dist.rank)
        combined = self.dist.all_reduce(np.where(mine[:, None], np.nan_to_num(bank, nan=0.0), 0.0).astype(np.float32), "sum")
        combined[latest < 0] = np.nan
        return combined

    def _save_best(self) -> None:
        if not self.writes_files:
            return
        ckpt.save_checkpoint(self.out_dir / ckpt.BEST, {"config": self.config.to_dict(), "model": self.best_state,
                                                        "epoch": self.best_epoch, "val": self.best_val,
                                                        "active_learners": self.active_learners})

    def resume(self, checkpoint: dict) -> None:
        """Continue from a ``last.pt`` payload: weights, optimiser, betas, clusters, RNG, history, and an
        epoch in progress. A checkpoint that does not fit this run is refused in one line."""
        path = checkpoint.get("path", ckpt.LAST)
        saved_data = checkpoint.get("dataset")
        if isinstance(saved_data, dict):
            check_same_dataset(saved_data, dataset_identity(self.dataset), self.config.data.root)
        try:
            self._restore(checkpoint)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path} cannot be resumed: {text} (damaged, or written for other settings)") from None

    def _restore(self, checkpoint: dict) -> None:
        from dcml.clustering import Clustering

        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.loss.load_state_dict(checkpoint["loss"])
        if checkpoint["clustering"] is not None:
            c = checkpoint["clustering"]
            self.clustering = Clustering(assignment=np.asarray(c["assignment"]), usable=np.asarray(c["usable"]),
                                         num_clusters=int(c["num_clusters"]), labels=self.train_labels)
        best = checkpoint["best"]
        self.best_score, self.best_epoch, self.best_val = float(best["score"]), best["epoch"], best["val"]
        if self.best_epoch is not None and self.out_dir is not None:
            # Every rank needs the selected weights for the sharded test pass; rank 0 reads the file.
            self.best_state = self.dist.on_main(lambda: read_selected_weights(self.out_dir / ckpt.BEST, int(self.best_epoch)))
        self.history = list(checkpoint["history"])
        self.timings = dict(checkpoint["timings"])
        self.start_epoch = int(checkpoint["next_epoch"])
        self.active_learners = int(checkpoint["active_learners"])
        if checkpoint.get("feature_bank") is not None:
            self._feature_bank = checkpoint["feature_bank"].numpy().copy()
            visits = checkpoint.get("feature_bank_visits")
            self._feature_bank_visits = (visits.numpy().copy() if visits is not None
                                         else np.where(np.isnan(self._feature_bank[:, 0]), -1, 0).astype(np.int64))
            self._feature_bank_epoch = checkpoint["feature_bank_epoch"]
        progress = checkpoint.get("epoch_progress")
        rng = checkpoint["rng"]
        per_rank = checkpoint.get("rng_per_rank")
        if progress is not None:
            if len(progress["per_rank"]) != self.dist.world_size:
                raise UserError(f"{checkpoint.get('path', ckpt.LAST)} was stopped inside an epoch by a {len(progress['per_rank'])}-process "
                                f"run; resume it with that many processes ({self.dist.world_size} now)")
            self._resumed_progress = EpochProgress.from_state(progress, self.dist.rank)
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            ckpt.restore_rng_state(per_rank[self.dist.rank])
        elif not self.dist.enabled:
            ckpt.restore_rng_state(rng)
        else:
            # Another number of ranks than the run was saved with: continue with fresh per-rank streams.
            if self.dist.is_main:
                saved = len(per_rank) if per_rank is not None else 1
                warnings.warn(f"resuming a {saved}-process run with {self.dist.world_size} processes: the random streams "
                              "are reseeded, so the run will not match an uninterrupted one exactly", stacklevel=2)
            seed_everything(self.config.seed + RANK_SEED_STRIDE * self.dist.rank + int(checkpoint["next_epoch"]))


def read_selected_weights(path: Path, epoch: int) -> dict:
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


def check_same_dataset(saved: dict, current: dict, root: str | None) -> None:
    """Refuse to resume on other data than the run trained on (a moved folder is fine: names are compared)."""
    for name in ("train", "val"):
        then, now = saved.get(name, {}), current[name]
        if then.get("sha256") != now["sha256"]:
            where = f"at {root}" if root else "in the default location"
            raise UserError(f"the dataset {where} is not the one this run trained on ({name} split: "
                            f"{then.get('images')} images of {then.get('classes')} classes then, {now['images']} of "
                            f"{now['classes']} now); point --data-root at the original data")


def write_config(out_dir: Path, config: TrainConfig) -> None:
    import yaml

    text = yaml.safe_dump(config.to_dict(), sort_keys=False).encode()
    write_atomically({Path(out_dir) / CONFIG_FILE: lambda stream: stream.write(text)})

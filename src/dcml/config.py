"""Typed training configuration, loaded from YAML presets and validated before anything runs.

Every switch of the method is a named field here (the original code hid its schedule in constants
such as ``epoch * 8/19``). A preset is a YAML file with the same nesting as :class:`TrainConfig`;
``--set section.field=value`` overrides one field (the value is parsed as YAML). Every problem is
reported as a one-line :class:`~dcml.errors.UserError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dcml.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"

#: Largest ``seed``: a non-negative C ``int``. Seeds reach numpy's default_rng (which refuses negative
#: seeds; ``np.random.seed`` needs < 2**32), faiss k-means (a C ``int``) and torch (< 2**64); this is
#: the range all of them accept. Seeds derived from it (the trainer's per-epoch k-means seeds,
#: seed x 100003 + epoch) can exceed a C int: :mod:`dcml.backends` folds those into faiss's range.
MAX_SEED = 2**31 - 1
#: Largest ``data.image_size`` (pixels per side). Activation memory grows with its square: a
#: ResNet-50 forward of one 2048 px image already takes several GB, and no benchmark here is
#: published above 256 px, so a larger value is a typo that would end in an out-of-memory crash.
MAX_IMAGE_SIZE = 2048
#: Largest ``schedule.epochs``. The trainer's k-means seeds are seed x 100003 + epoch, so runs with
#: different seeds never share one only while epochs < 100003; the schedule also holds one plan per
#: epoch in memory.
MAX_EPOCHS = 100_000
#: faiss takes k-means iterations as a C int; far fewer than this already converge.
MAX_KMEANS_ITERATIONS = 10_000
#: Images per batch of a feature pass, and DataLoader workers / prefetched batches: sizes far past
#: these exhaust memory or processes long before they help.
MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 256
MAX_PREFETCH_FACTOR = 128
#: Largest embedding width: the heads and every evaluation tile scale with it.
MAX_EMBEDDING_DIM = 65_536
#: torch.distributed's timeout: one week is longer than any evaluation a rank waits for.
MAX_TIMEOUT_MINUTES = 7 * 24 * 60


@dataclass
class DataConfig:
    dataset: str = "emoji"
    root: Optional[str] = None  # dataset folder; emoji: the cache dir (None: the default cache)
    image_size: int = 224
    # "crop_flip": RandomResizedCrop + horizontal flip (the paper); "crop": no flip; "none": test transform.
    train_augmentation: Literal["crop_flip", "crop", "none"] = "crop_flip"
    # Run the frozen lower part of the backbone once per image and train on its cached output.
    # The same computation as a full forward (up to float rounding): with train_augmentation "none" the input of the
    # frozen part never changes; needs model.trainable_blocks.
    cache_frozen_features: bool = False
    num_workers: int = 0
    eval_batch_size: int = 128
    # Datasets without a validation split: share of training classes held out for model selection.
    validation_fraction: float = 0.15
    # Larger images (width x height) are refused before decoding: a few KB of PNG can claim 15000 x 15000
    # pixels. Default: dcml.data.images.DEFAULT_MAX_IMAGE_PIXELS (Pillow's own limit, ~9459 x 9459).
    max_image_pixels: int = 89_478_485


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    pretrained: bool = True
    weights: Optional[str] = None  # a state dict file; overrides pretrained
    # Train only the last N blocks of the backbone (None: all). The rest is frozen (eval mode, no grad).
    trainable_blocks: Optional[int] = None
    embedding_dim: int = 128
    dropout: float = 0.01
    freeze_bn_stats: bool = True  # BatchNorm running statistics frozen; affine weights still train
    learner_head: Literal["slices", "masks"] = "slices"  # CVPR 2019 fixed slices / TPAMI learned masks
    mask_lr_multiplier: float = 100.0
    mask_regularization: float = 0.01  # lambda x mean pairwise cosine similarity of the ReLU'd masks


@dataclass
class ClusteringConfig:
    learners: int = 4  # K
    space: Literal["backbone", "embedding"] = "backbone"
    unit: Literal["image", "class"] = "image"
    recluster_every: int = 2  # T, in epochs
    recluster_after_conquer: bool = True  # v1 keeps re-clustering (batches stay per cluster)
    hierarchical: bool = False  # TPAMI: 1 -> 2 -> 4 -> ... -> K by 2-means splits
    kmeans_iterations: int = 100
    backend: Literal["auto", "faiss", "torch"] = "auto"
    min_classes_per_cluster: int = 2
    # Cluster on the backbone features the training forward passes of the epoch before a
    # re-clustering computed (images that epoch did not visit get a fresh pass) instead of a full
    # extra pass over the training set. Needs train_augmentation=none and frozen BN statistics,
    # so those features are the test-time ones, at most one epoch old.
    reuse_training_features: bool = False


@dataclass
class SamplerConfig:
    classes_per_batch: int = 20  # P
    images_per_class: int = 4  # M
    epoch_length: Literal["largest", "smallest"] = "largest"
    # What one pass over a cluster is: "classes" (each usable class once: ceil(classes / P) batches)
    # or "images" (the authors' code: floor(images / (P x M)) batches).
    pass_unit: Literal["classes", "images"] = "classes"
    # A cluster with fewer than P usable classes: its classes give more than M images each, so the batch
    # keeps P x M images (false: a smaller batch of M images per class).
    fill_small_clusters: bool = False
    # A fixed number of batches per epoch whatever K (overrides epoch_length): equal budgets.
    batches_per_epoch: Optional[int] = None


@dataclass
class LossConfig:
    name: Literal["margin", "triplet", "pml"] = "margin"
    alpha: float = 0.2  # margin loss
    beta: float = 1.2
    nu: float = 0.0
    beta_mode: Literal["learner", "class", "fixed"] = "learner"
    triplet_margin: float = 0.2  # triplet loss
    pml_loss: Optional[str] = None  # any pytorch-metric-learning loss, e.g. "MultiSimilarityLoss"
    pml_miner: Optional[str] = None
    pml_kwargs: dict = field(default_factory=dict)  # keyword arguments of the PML loss
    pml_miner_kwargs: dict = field(default_factory=dict)
    pml_per_learner: bool = False


@dataclass
class ScheduleConfig:
    epochs: int = 200
    # Epoch counts, so 80 means "the first 80 epochs divide; the 81st (index 80) conquers", as in v1.
    conquer_epoch: Optional[int] = 80  # epochs before the loss switches to the full embedding (None: never)
    finetune_epoch: Optional[int] = None  # epochs before the K = 1 phase on all data (None: no such phase)
    freeze_backbone_after_recluster: int = 0  # epochs the backbone stays frozen after a re-clustering


@dataclass
class OptimizerConfig:
    lr_backbone: float = 1e-5
    lr_embedding: float = 1e-5
    lr_beta: float = 5e-4
    weight_decay: float = 1e-4
    mask_weight_decay_multiplier: float = 0.0  # masks' weight decay = weight_decay x this (TPAMI v2 code: 1)
    lr_decay_every: Optional[int] = None  # step decay period in epochs (None: constant)
    lr_decay_factor: float = 0.5


@dataclass
class EvaluationConfig:
    every: int = 1  # validate every N epochs (and always after the last)
    # "<protocol row>/<metric>", e.g. "leave_one_out/recall@1" or "cross_vendor/map@r".
    selection_metric: str = "leave_one_out/recall@1"
    val_nmi: bool = False  # NMI on validation costs a k-means per epoch; the test report always has it
    # The test protocol the run expects (null: the dataset's own). A preset states it so that a
    # dataset evaluated differently is caught before training; it cannot change the protocol.
    protocol: Optional[Literal["leave_one_out", "query_gallery", "vehicleid", "cross_group"]] = None
    recall_ks: Optional[list[int]] = None  # the Recall@K list reported (null: the dataset's usual list)


@dataclass
class RuntimeConfig:
    """How fast, not what: none of these change results on the CPU (bf16 and channels-last apply on CUDA only)."""

    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, float32 elsewhere
    channels_last: bool = True  # CUDA: model weights in channels-last memory format (inputs always are)
    compile: bool = False  # torch.compile the trainable part of the model (first epoch pays the compile time)
    pin_memory: bool = True  # CUDA: page-locked host batches, copied asynchronously
    persistent_workers: bool = True  # data.num_workers > 0: keep the training loader's workers across epochs
    prefetch_factor: int = 4  # batches each worker prepares ahead
    # Batch of the feature passes without gradients (re-clustering, validation, test); null: data.eval_batch_size.
    feature_batch_size: Optional[int] = None
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"  # torchrun only; auto: nccl on CUDA, else gloo
    distributed_timeout_minutes: int = 60  # ranks wait this long for rank 0's evaluation / k-means


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- loading
def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A bundled preset by name (``emoji``), or a YAML file path."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"preset file {path} not found")
        return path
    bundled = PRESET_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        raise UserError(f"unknown preset {name_or_path!r}; choose one of: {', '.join(available_presets())} (or a YAML file)")
    return bundled


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> TrainConfig:
    """Preset (or ``base`` dict) + ``section.field=value`` overrides -> a validated TrainConfig."""
    raw: dict = {}
    if preset is not None:
        path = preset_path(preset)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"preset {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"preset {path} must be a mapping of sections, not {type(raw).__name__}")
    if base is not None:
        raw = _merge(raw, base)
    for override in overrides:
        raw = _merge(raw, parse_override(override))
    config = from_dict(TrainConfig, raw)
    validate(config)
    return config


def parse_override(text: str) -> dict:
    """``"clustering.learners=4"`` -> ``{"clustering": {"learners": 4}}`` (value parsed as YAML)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set expects section.field=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    result: Any = parsed
    for part in reversed(key.split(".")):
        result = {part: result}
    return result


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls, raw: Any, prefix: str = ""):
    """Build dataclass ``cls`` from nested dicts, checking every field's type."""
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'configuration'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(str(name), list(fields), n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known fields: {', '.join(fields)}"
        raise UserError(f"unknown setting {prefix}{name}{hint}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{where}.")
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise UserError(f"{where} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where} must be a string; got {value!r}")
        return str(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list; got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping; got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {hint} at {where}")


# ---------------------------------------------------------------------------- validation
def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _require_finite_floats(config: TrainConfig) -> None:
    """No float setting means anything as NaN or infinity (YAML .nan / .inf, or --set x=nan); range
    checks alone would let them through (every comparison with NaN is false, inf passes >= 0)."""
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for item in dataclasses.fields(value):
            number = getattr(value, item.name)
            if isinstance(number, float):
                _require(math.isfinite(number), f"{section.name}.{item.name} must be a finite number; got {number}")


def validate(config: TrainConfig) -> None:
    """Checks that need no dataset: ranges and combinations of settings."""
    d, m, c, s, lo, sc, o, e = (config.data, config.model, config.clustering, config.sampler, config.loss,
                                config.schedule, config.optimizer, config.evaluation)
    _require_finite_floats(config)
    _require(0 <= config.seed <= MAX_SEED, f"seed must be in 0..{MAX_SEED}; got {config.seed}")
    _require(16 <= d.image_size <= MAX_IMAGE_SIZE, f"data.image_size must be in 16..{MAX_IMAGE_SIZE} pixels; got {d.image_size}")
    _require(0 <= d.num_workers <= MAX_WORKERS, f"data.num_workers must be in 0..{MAX_WORKERS}; got {d.num_workers}")
    _require(1 <= d.eval_batch_size <= MAX_BATCH_SIZE, f"data.eval_batch_size must be in 1..{MAX_BATCH_SIZE}; got {d.eval_batch_size}")
    _require(0 < d.validation_fraction < 1, f"data.validation_fraction must be between 0 and 1; got {d.validation_fraction}")
    _require(d.max_image_pixels >= 1, f"data.max_image_pixels must be a positive number of pixels (width x height); got {d.max_image_pixels}")
    if d.cache_frozen_features:
        _require(d.train_augmentation == "none",
                 "data.cache_frozen_features needs data.train_augmentation=none (random crops change the frozen part's input)")
        _require(m.trainable_blocks is not None, "data.cache_frozen_features needs model.trainable_blocks (how much of the backbone trains)")
    _require(m.trainable_blocks is None or m.trainable_blocks >= 0, f"model.trainable_blocks must be >= 0 or null; got {m.trainable_blocks}")
    _require(1 <= m.embedding_dim <= MAX_EMBEDDING_DIM, f"model.embedding_dim must be in 1..{MAX_EMBEDDING_DIM}; got {m.embedding_dim}")
    _require(0 <= m.dropout < 1, f"model.dropout must be in [0, 1); got {m.dropout}")
    _require(m.mask_lr_multiplier > 0, f"model.mask_lr_multiplier must be > 0; got {m.mask_lr_multiplier}")
    _require(m.mask_regularization >= 0, f"model.mask_regularization must be >= 0; got {m.mask_regularization}")
    _require(c.learners >= 1, f"clustering.learners must be >= 1; got {c.learners}")
    if m.learner_head == "slices":
        _require(m.embedding_dim % c.learners == 0,
                 f"clustering.learners={c.learners} must divide model.embedding_dim={m.embedding_dim} for fixed slices "
                 f"(or use model.learner_head=masks)")
        _require(m.embedding_dim // c.learners >= 2, f"each learner needs at least 2 dimensions; embedding_dim {m.embedding_dim} / {c.learners} learners")
    if c.hierarchical:
        _require(c.learners & (c.learners - 1) == 0, f"clustering.hierarchical needs a power-of-two clustering.learners; got {c.learners}")
    if c.reuse_training_features:
        _require(d.train_augmentation == "none" and m.freeze_bn_stats,
                 "clustering.reuse_training_features needs data.train_augmentation=none and model.freeze_bn_stats=true "
                 "(otherwise training features are not test-time features)")
    _require(c.recluster_every >= 1, f"clustering.recluster_every must be >= 1 epoch; got {c.recluster_every}")
    _require(1 <= c.kmeans_iterations <= MAX_KMEANS_ITERATIONS,
             f"clustering.kmeans_iterations must be in 1..{MAX_KMEANS_ITERATIONS}; got {c.kmeans_iterations}")
    _require(c.min_classes_per_cluster >= 2, f"clustering.min_classes_per_cluster must be >= 2; got {c.min_classes_per_cluster}")
    _require(2 <= s.classes_per_batch <= 1024, f"sampler.classes_per_batch must be in 2..1024; got {s.classes_per_batch}")
    _require(2 <= s.images_per_class <= 64, f"sampler.images_per_class must be in 2..64; got {s.images_per_class}")
    _require(s.batches_per_epoch is None or s.batches_per_epoch >= 1, f"sampler.batches_per_epoch must be >= 1 or null; got {s.batches_per_epoch}")
    _require(s.classes_per_batch * s.images_per_class <= 4096,
             f"batch of sampler.classes_per_batch x images_per_class = {s.classes_per_batch * s.images_per_class} images is above 4096")
    _require(lo.alpha > 0 and lo.beta > 0, f"loss.alpha and loss.beta must be > 0; got {lo.alpha}, {lo.beta}")
    _require(lo.nu >= 0 and lo.triplet_margin > 0, "loss.nu must be >= 0 and loss.triplet_margin > 0")
    if lo.name == "pml":
        _require(bool(lo.pml_loss), "loss.name=pml needs loss.pml_loss, e.g. MultiSimilarityLoss")
    _require(1 <= sc.epochs <= MAX_EPOCHS, f"schedule.epochs must be in 1..{MAX_EPOCHS}; got {sc.epochs}")
    for name in ("conquer_epoch", "finetune_epoch"):
        value = getattr(sc, name)
        _require(value is None or 0 <= value <= sc.epochs,
                 f"schedule.{name}={value} does not fit schedule.epochs={sc.epochs}: "
                 f"set it too, e.g. --set schedule.{name}={int(sc.epochs * 0.7)} (or null)")
    if sc.conquer_epoch is not None and sc.finetune_epoch is not None:
        _require(sc.finetune_epoch >= sc.conquer_epoch, "schedule.finetune_epoch must not come before schedule.conquer_epoch")
    _require(0 <= sc.freeze_backbone_after_recluster <= sc.epochs,
             f"schedule.freeze_backbone_after_recluster must be in 0..schedule.epochs={sc.epochs}; got {sc.freeze_backbone_after_recluster}")
    for name in ("lr_backbone", "lr_embedding", "lr_beta"):
        _require(getattr(o, name) >= 0, f"optimizer.{name} must be >= 0; got {getattr(o, name)}")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0; got {o.weight_decay}")
    _require(o.mask_weight_decay_multiplier >= 0, f"optimizer.mask_weight_decay_multiplier must be >= 0; got {o.mask_weight_decay_multiplier}")
    _require(o.lr_decay_every is None or o.lr_decay_every >= 1, "optimizer.lr_decay_every must be >= 1 or null")
    _require(0 < o.lr_decay_factor <= 1, f"optimizer.lr_decay_factor must be in (0, 1]; got {o.lr_decay_factor}")
    _require(e.every >= 1, f"evaluation.every must be >= 1; got {e.every}")
    _require("/" in e.selection_metric, f"evaluation.selection_metric must look like leave_one_out/recall@1; got {e.selection_metric!r}")
    if e.recall_ks is not None:
        _require(len(e.recall_ks) > 0 and all(k >= 1 for k in e.recall_ks) and list(e.recall_ks) == sorted(set(e.recall_ks)),
                 f"evaluation.recall_ks must be increasing positive integers, e.g. [1, 2, 4, 8]; got {e.recall_ks}")
    r = config.runtime
    _require(1 <= r.prefetch_factor <= MAX_PREFETCH_FACTOR, f"runtime.prefetch_factor must be in 1..{MAX_PREFETCH_FACTOR}; got {r.prefetch_factor}")
    _require(r.feature_batch_size is None or 1 <= r.feature_batch_size <= MAX_BATCH_SIZE,
             f"runtime.feature_batch_size must be in 1..{MAX_BATCH_SIZE} or null; got {r.feature_batch_size}")
    _require(1 <= r.distributed_timeout_minutes <= MAX_TIMEOUT_MINUTES,
             f"runtime.distributed_timeout_minutes must be in 1..{MAX_TIMEOUT_MINUTES}; got {r.distributed_timeout_minutes}")


def validate_against_data(config: TrainConfig, num_train_classes: int, num_backbone_blocks: int | None,
                          protocol: str | None = None) -> None:
    """Checks that need the dataset and the backbone: K vs classes, blocks vs depth, the expected protocol."""
    c, s = config.clustering, config.sampler
    expected = config.evaluation.protocol
    _require(expected is None or protocol is None or expected == protocol,
             f"evaluation.protocol={expected} but dataset {config.data.dataset} is evaluated with the {protocol} protocol "
             f"(wrong preset for this dataset?)")
    needed = c.learners * c.min_classes_per_cluster
    _require(needed <= num_train_classes,
             f"clustering.learners={c.learners} is too many for {num_train_classes} training classes "
             f"(each learner needs {c.min_classes_per_cluster}); use at most {num_train_classes // c.min_classes_per_cluster}")
    _require(s.classes_per_batch <= num_train_classes,
             f"sampler.classes_per_batch={s.classes_per_batch} is more than the {num_train_classes} training classes")
    blocks = config.model.trainable_blocks
    if blocks is not None and num_backbone_blocks is not None:
        _require(blocks <= num_backbone_blocks,
                 f"model.trainable_blocks={blocks} but backbone {config.model.backbone} has {num_backbone_blocks} blocks")

"""Typed training configuration, loaded from YAML presets and validated before anything runs.

Every switch of the method is a named field here (the original code hid its schedule in constants
such as ``epoch * 8/19``). A preset is a YAML file with the same nesting as :class:`TrainConfig`;
``--set section.field=value`` overrides one field (the value is parsed as YAML). Every problem is
reported as a one-line :class:`~dcml.errors.UserError` naming the field and what is allowed.

Each section is a frozen dataclass: a field's default is its one default, the section's
``validate()`` sits right below its fields, and a loaded configuration cannot be changed
afterwards (``dataclasses.replace`` makes a changed copy). The loss section names a registered
loss and holds that loss's own settings dataclass (``loss: {name: margin, settings: {alpha: 0.2}}``),
declared beside the loss in :mod:`dcml.losses`; the allowed ``evaluation.protocol`` values are the
protocols of :mod:`dcml.evaluation.protocols`. Both are imported only when a configuration is built,
so importing this module stays light.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import yaml

from dcml.errors import UserError, require

if TYPE_CHECKING:
    from dcml.losses.base import LossSettings

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
#: Each view is a copy of the training split's frozen features in memory.
MAX_AUGMENTED_VIEWS = 64
#: A batch needs two classes (for negatives) and two images of a class (for positives); the upper
#: ends bound one batch's memory. The sampler refuses what the configuration refuses.
MIN_CLASSES_PER_BATCH, MAX_CLASSES_PER_BATCH = 2, 1024
MIN_IMAGES_PER_CLASS, MAX_IMAGES_PER_CLASS = 2, 64
MAX_BATCH_IMAGES = 4096


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "emoji"
    root: Optional[str] = None  # dataset folder; emoji: the cache dir (None: the default cache)
    image_size: int = 224
    # "crop_flip": RandomResizedCrop + horizontal flip (the paper); "crop": no flip; "none": test transform;
    # "drawing": small shifts, scalings and turns, colour, line-weight and blur changes, no flip
    # (dcml.data.augment: styles of drawing such as emoji vendors'); "drawing_style": "drawing" plus style
    # changes (flat colours, traced outlines, greyscale), for styles training never saw.
    train_augmentation: Literal["crop_flip", "crop", "none", "drawing", "drawing_style"] = "crop_flip"
    # Run the frozen lower part of the backbone once per image and train on its cached output.
    # The same computation as a full forward (up to float rounding): with train_augmentation "none" the input of the
    # frozen part never changes; needs model.trainable_blocks.
    cache_frozen_features: bool = False
    # With cache_frozen_features and a train_augmentation: cache the frozen part's output of this many
    # augmented copies of every training image (one frozen pass each, drawn from the seed); a training
    # step takes one of them or the plain image. Augmentation at the cost of a few passes, not one per step.
    augmented_views: int = 0
    num_workers: int = 0
    eval_batch_size: int = 128
    # Datasets without a validation split: share of training classes held out for model selection.
    validation_fraction: float = 0.15
    # Larger images (width x height) are refused before decoding: a few KB of PNG can claim 15000 x 15000
    # pixels. Default: dcml.data.images.DEFAULT_MAX_IMAGE_PIXELS (Pillow's own limit, ~9459 x 9459).
    max_image_pixels: int = 89_478_485
    # A group (emoji: a vendor) whose images leave the training and validation splits; the test split
    # keeps them and adds the unseen row (that group's test images query the other groups'): how
    # well the embedding generalises to a style it never saw. None: train on every group.
    held_out_group: Optional[str] = None

    def validate(self) -> None:
        require(16 <= self.image_size <= MAX_IMAGE_SIZE, f"data.image_size must be in 16..{MAX_IMAGE_SIZE} pixels; got {self.image_size}")
        require(0 <= self.num_workers <= MAX_WORKERS, f"data.num_workers must be in 0..{MAX_WORKERS}; got {self.num_workers}")
        require(1 <= self.eval_batch_size <= MAX_BATCH_SIZE,
                f"data.eval_batch_size must be in 1..{MAX_BATCH_SIZE}; got {self.eval_batch_size}")
        require(0 < self.validation_fraction < 1, f"data.validation_fraction must be between 0 and 1; got {self.validation_fraction}")
        require(self.held_out_group is None or (isinstance(self.held_out_group, str) and self.held_out_group.strip() != ""),
                f"data.held_out_group must be a group name (emoji: a vendor) or null; got {self.held_out_group!r}")
        require(self.max_image_pixels >= 1,
                f"data.max_image_pixels must be a positive number of pixels (width x height); got {self.max_image_pixels}")
        require(0 <= self.augmented_views <= MAX_AUGMENTED_VIEWS,
                f"data.augmented_views must be in 0..{MAX_AUGMENTED_VIEWS}; got {self.augmented_views}")
        if self.cache_frozen_features:
            require(self.train_augmentation == "none" or self.augmented_views > 0,
                    "data.cache_frozen_features needs data.train_augmentation=none (random crops change the frozen part's "
                    "input), or data.augmented_views >= 1 (cache that many augmented copies)")
        if self.augmented_views:
            require(self.cache_frozen_features and self.train_augmentation != "none",
                    "data.augmented_views needs data.cache_frozen_features=true and a data.train_augmentation other than none")


@dataclass(frozen=True)
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

    def validate(self) -> None:
        require(self.trainable_blocks is None or self.trainable_blocks >= 0,
                f"model.trainable_blocks must be >= 0 or null; got {self.trainable_blocks}")
        require(1 <= self.embedding_dim <= MAX_EMBEDDING_DIM,
                f"model.embedding_dim must be in 1..{MAX_EMBEDDING_DIM}; got {self.embedding_dim}")
        require(0 <= self.dropout < 1, f"model.dropout must be in [0, 1); got {self.dropout}")
        require(self.mask_lr_multiplier > 0, f"model.mask_lr_multiplier must be > 0; got {self.mask_lr_multiplier}")
        require(self.mask_regularization >= 0, f"model.mask_regularization must be >= 0; got {self.mask_regularization}")


@dataclass(frozen=True)
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

    def validate(self) -> None:
        require(self.learners >= 1, f"clustering.learners must be >= 1; got {self.learners}")
        if self.hierarchical:
            require(self.learners & (self.learners - 1) == 0,
                    f"clustering.hierarchical needs a power-of-two clustering.learners; got {self.learners}")
        require(self.recluster_every >= 1, f"clustering.recluster_every must be >= 1 epoch; got {self.recluster_every}")
        require(1 <= self.kmeans_iterations <= MAX_KMEANS_ITERATIONS,
                f"clustering.kmeans_iterations must be in 1..{MAX_KMEANS_ITERATIONS}; got {self.kmeans_iterations}")
        require(self.min_classes_per_cluster >= 2,
                f"clustering.min_classes_per_cluster must be >= 2; got {self.min_classes_per_cluster}")


@dataclass(frozen=True)
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

    def validate(self) -> None:
        p, m = self.classes_per_batch, self.images_per_class
        require(MIN_CLASSES_PER_BATCH <= p <= MAX_CLASSES_PER_BATCH,
                f"sampler.classes_per_batch must be in {MIN_CLASSES_PER_BATCH}..{MAX_CLASSES_PER_BATCH}; got {p}")
        require(MIN_IMAGES_PER_CLASS <= m <= MAX_IMAGES_PER_CLASS,
                f"sampler.images_per_class must be in {MIN_IMAGES_PER_CLASS}..{MAX_IMAGES_PER_CLASS}; got {m}")
        require(self.batches_per_epoch is None or self.batches_per_epoch >= 1,
                f"sampler.batches_per_epoch must be >= 1 or null; got {self.batches_per_epoch}")
        require(p * m <= MAX_BATCH_IMAGES,
                f"batch of sampler.classes_per_batch x images_per_class = {p * m} images is above {MAX_BATCH_IMAGES}")


@dataclass(frozen=True)
class LossConfig:
    name: str = "margin"  # a registered loss: dcml.losses.available_losses()
    # That loss's own settings: the dataclass registered with it, declared beside the loss (e.g.
    # MarginSettings in dcml/losses/margin.py). None: that loss's defaults.
    settings: Optional[LossSettings] = None

    def __post_init__(self) -> None:
        from dcml.losses import loss_spec

        kind = loss_spec(self.name).settings
        if self.settings is None:
            object.__setattr__(self, "settings", kind())
        elif not isinstance(self.settings, kind):
            raise TypeError(f"loss {self.name!r} takes {kind.__name__}, not {type(self.settings).__name__}")

    def validate(self) -> None:
        self.settings.validate()

    @classmethod
    def from_mapping(cls, raw: dict, prefix: str) -> LossConfig:
        """Read the section: its name picks the settings dataclass that reads ``settings``."""
        from dcml.losses import available_losses, loss_spec

        # A loss's own setting given beside name (the layout before loss.settings): point at its place.
        settings = {name for spec in available_losses().values() for name in _field_names(spec.settings)}
        for key in raw:
            close = [] if key in _field_names(cls) else difflib.get_close_matches(str(key), sorted(settings), n=1)
            if close:
                raise UserError(f"unknown setting {prefix}{key}; did you mean {prefix}settings.{close[0]}?")
        _refuse_unknown(cls, raw, prefix)
        name = raw.get("name", cls.name)
        kind = loss_spec(name).settings
        return cls(name=name, settings=from_dict(kind, raw.get("settings", {}), f"{prefix}settings."))


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 200
    # Epoch counts, so 80 means "the first 80 epochs divide; the 81st (index 80) conquers", as in v1.
    conquer_epoch: Optional[int] = 80  # epochs before the loss switches to the full embedding (None: never)
    finetune_epoch: Optional[int] = None  # epochs before the K = 1 phase on all data (None: no such phase)
    freeze_backbone_after_recluster: int = 0  # epochs the backbone stays frozen after a re-clustering

    def validate(self) -> None:
        require(1 <= self.epochs <= MAX_EPOCHS, f"schedule.epochs must be in 1..{MAX_EPOCHS}; got {self.epochs}")
        for name in ("conquer_epoch", "finetune_epoch"):
            value = getattr(self, name)
            require(value is None or 0 <= value <= self.epochs,
                    f"schedule.{name}={value} does not fit schedule.epochs={self.epochs}: "
                    f"set it too, e.g. --set schedule.{name}={int(self.epochs * 0.7)} (or null)")
        if self.conquer_epoch is not None and self.finetune_epoch is not None:
            require(self.finetune_epoch >= self.conquer_epoch, "schedule.finetune_epoch must not come before schedule.conquer_epoch")
        require(0 <= self.freeze_backbone_after_recluster <= self.epochs,
                f"schedule.freeze_backbone_after_recluster must be in 0..schedule.epochs={self.epochs}; "
                f"got {self.freeze_backbone_after_recluster}")


@dataclass(frozen=True)
class OptimizerConfig:
    lr_backbone: float = 1e-5
    lr_embedding: float = 1e-5
    lr_beta: float = 5e-4
    weight_decay: float = 1e-4
    mask_weight_decay_multiplier: float = 0.0  # masks' weight decay = weight_decay x this (TPAMI v2 code: 1)
    lr_decay_every: Optional[int] = None  # step decay period in epochs (None: constant)
    lr_decay_factor: float = 0.5

    def validate(self) -> None:
        for name in ("lr_backbone", "lr_embedding", "lr_beta"):
            require(getattr(self, name) >= 0, f"optimizer.{name} must be >= 0; got {getattr(self, name)}")
        require(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0; got {self.weight_decay}")
        require(self.mask_weight_decay_multiplier >= 0,
                f"optimizer.mask_weight_decay_multiplier must be >= 0; got {self.mask_weight_decay_multiplier}")
        require(self.lr_decay_every is None or self.lr_decay_every >= 1, "optimizer.lr_decay_every must be >= 1 or null")
        require(0 < self.lr_decay_factor <= 1, f"optimizer.lr_decay_factor must be in (0, 1]; got {self.lr_decay_factor}")


@dataclass(frozen=True)
class EvaluationConfig:
    every: int = 1  # validate every N epochs (and always after the last)
    # "<protocol row>/<metric>", e.g. "leave_one_out/recall@1" (row names: dcml.evaluation.protocols).
    selection_metric: str = "leave_one_out/recall@1"
    val_nmi: bool = False  # NMI on validation costs a k-means per epoch; the test report always has it
    # The test protocol the run expects (null: the dataset's own), one of dcml.evaluation.protocols.
    # A preset states it so that a dataset evaluated differently is caught before training; it
    # cannot change the protocol.
    protocol: Optional[str] = None
    recall_ks: Optional[tuple[int, ...]] = None  # the Recall@K list reported (null: the dataset's usual list)

    def validate(self) -> None:
        from dcml.evaluation.protocols import protocol_names

        require(self.every >= 1, f"evaluation.every must be >= 1; got {self.every}")
        require("/" in self.selection_metric,
                f"evaluation.selection_metric must look like leave_one_out/recall@1; got {self.selection_metric!r}")
        require(self.protocol is None or self.protocol in protocol_names(),
                f"evaluation.protocol must be one of {', '.join(protocol_names())}; got {self.protocol!r}")
        if self.recall_ks is not None:
            ks = self.recall_ks
            require(len(ks) > 0 and all(k >= 1 for k in ks) and list(ks) == sorted(set(ks)),
                    f"evaluation.recall_ks must be increasing positive integers, e.g. [1, 2, 4, 8]; got {list(ks)}")


@dataclass(frozen=True)
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

    def validate(self) -> None:
        require(1 <= self.prefetch_factor <= MAX_PREFETCH_FACTOR,
                f"runtime.prefetch_factor must be in 1..{MAX_PREFETCH_FACTOR}; got {self.prefetch_factor}")
        require(self.feature_batch_size is None or 1 <= self.feature_batch_size <= MAX_BATCH_SIZE,
                f"runtime.feature_batch_size must be in 1..{MAX_BATCH_SIZE} or null; got {self.feature_batch_size}")
        require(1 <= self.distributed_timeout_minutes <= MAX_TIMEOUT_MINUTES,
                f"runtime.distributed_timeout_minutes must be in 1..{MAX_TIMEOUT_MINUTES}; got {self.distributed_timeout_minutes}")


@dataclass(frozen=True)
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

    def validate(self) -> None:
        """Checks that need no dataset: every section's ranges, then the combinations of sections."""
        check_finite_floats(self)
        require(0 <= self.seed <= MAX_SEED, f"seed must be in 0..{MAX_SEED}; got {self.seed}")
        for item in dataclasses.fields(self):
            section = getattr(self, item.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        d, m, c = self.data, self.model, self.clustering
        if d.cache_frozen_features:
            require(m.trainable_blocks is not None,
                    "data.cache_frozen_features needs model.trainable_blocks (how much of the backbone trains)")
        if m.learner_head == "slices":
            require(m.embedding_dim % c.learners == 0,
                    f"clustering.learners={c.learners} must divide model.embedding_dim={m.embedding_dim} for fixed slices "
                    f"(or use model.learner_head=masks)")
            require(m.embedding_dim // c.learners >= 2,
                    f"each learner needs at least 2 dimensions; embedding_dim {m.embedding_dim} / {c.learners} learners")
        if c.reuse_training_features:
            require(d.train_augmentation == "none" and m.freeze_bn_stats,
                    "clustering.reuse_training_features needs data.train_augmentation=none and model.freeze_bn_stats=true "
                    "(otherwise training features are not test-time features)")

    def to_dict(self) -> dict:
        """Plain dicts, lists, strings and numbers: what YAML and ``torch.load(weights_only=True)`` read."""
        return _plain(self)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {item.name: _plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def check_finite_floats(settings, prefix: str = "") -> None:
    """No float setting means anything as NaN or infinity (YAML .nan / .inf, or --set x=nan); range
    checks alone would let them through (every comparison with NaN is false, inf passes >= 0)."""
    for item in dataclasses.fields(settings):
        value, where = getattr(settings, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            check_finite_floats(value, f"{where}.")
        elif isinstance(value, float):
            require(math.isfinite(value), f"{where} must be a finite number; got {value}")


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
    """Preset (or ``base`` dict) + ``section.field=value`` overrides -> a validated, frozen TrainConfig.

    Each layer (preset, then ``base``, then all overrides) goes over the ones before it; a layer
    that names another loss replaces the loss settings below it, which belong to the other loss.
    """
    raw: dict = {}
    if preset is not None:
        path = preset_path(preset)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"preset {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"preset {path} must be a mapping of sections, not {type(raw).__name__}")
    requested: dict = {}
    for override in overrides:
        requested = _merge(requested, parse_override(override))
    for layer in (None if base is None else upgrade_saved_config(base), requested):
        if layer:
            raw = _merge(_without_other_loss_settings(raw, layer), layer)
    config = from_dict(TrainConfig, raw)
    config.validate()
    return config


#: How configurations saved before the loss settings moved under ``loss.settings`` (run folders of
#: dcml 0.1) named each loss's settings: old key -> setting. Only for reading those files.
_FLAT_LOSS_SETTINGS = {
    "margin": {"alpha": "alpha", "beta": "beta", "nu": "nu", "beta_mode": "beta_mode"},
    "triplet": {"triplet_margin": "margin"},
    "pml": {"pml_loss": "loss_name", "pml_miner": "miner_name", "pml_per_learner": "per_learner",
            "pml_kwargs": "loss_kwargs", "pml_miner_kwargs": "miner_kwargs"},
}


def upgrade_saved_config(saved: dict) -> dict:
    """A saved configuration (``TrainConfig.to_dict()`` of a run folder) in today's layout: one
    written before ``loss.settings`` existed keeps its loss's settings, the other losses' are dropped."""
    loss = saved.get("loss")
    flat_keys = {key for keys in _FLAT_LOSS_SETTINGS.values() for key in keys}
    if not isinstance(loss, dict) or "settings" in loss or not flat_keys & set(loss):
        return saved
    name = loss.get("name", LossConfig.name)
    renamed = _FLAT_LOSS_SETTINGS.get(name, {})
    settings = {renamed[key]: value for key, value in loss.items() if key in renamed}
    return {**saved, "loss": {"name": name, "settings": settings}}


def _without_other_loss_settings(raw: dict, layer: dict) -> dict:
    """``raw`` without its loss settings when ``layer`` names another loss (the settings are that loss's)."""
    below, above = raw.get("loss"), layer.get("loss")
    if not (isinstance(below, dict) and isinstance(above, dict) and "name" in above):
        return raw
    if below.get("name", LossConfig.name) == above["name"]:
        return raw
    return {**raw, "loss": {key: value for key, value in below.items() if key != "settings"}}


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


def _field_names(cls) -> list[str]:
    return [item.name for item in dataclasses.fields(cls)]


def _refuse_unknown(cls, raw: dict, prefix: str) -> None:
    fields = _field_names(cls)
    unknown = [key for key in raw if key not in fields]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(str(name), fields, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known fields: {', '.join(fields)}"
        raise UserError(f"unknown setting {prefix}{name}{hint}")


def from_dict(cls, raw: Any, prefix: str = ""):
    """Build dataclass ``cls`` from nested dicts, checking every field's type.

    A section whose field types depend on its values (the loss: its name picks its settings'
    dataclass) reads itself with its ``from_mapping(raw, prefix)``.
    """
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'configuration'} must be a mapping, got {raw!r}")
    if hasattr(cls, "from_mapping"):
        return cls.from_mapping(raw, prefix)
    _refuse_unknown(cls, raw, prefix)
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()})


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
    if origin is tuple:  # tuple[item, ...]: a YAML list, kept as a tuple so the section stays frozen
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list; got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping; got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {hint} at {where}")


# ---------------------------------------------------------------------------- validation
def validate(config: TrainConfig) -> None:
    """Checks that need no dataset: ranges and combinations of settings (:meth:`TrainConfig.validate`)."""
    config.validate()


def validate_against_data(config: TrainConfig, num_train_classes: int, num_backbone_blocks: int | None,
                          protocol: str | None = None) -> None:
    """Checks that need the dataset and the backbone: K vs classes, blocks vs depth, the expected protocol."""
    c, s = config.clustering, config.sampler
    expected = config.evaluation.protocol
    require(expected is None or protocol is None or expected == protocol,
             f"evaluation.protocol={expected} but dataset {config.data.dataset} is evaluated with the {protocol} protocol "
             f"(wrong preset for this dataset?)")
    needed = c.learners * c.min_classes_per_cluster
    require(needed <= num_train_classes,
             f"clustering.learners={c.learners} is too many for {num_train_classes} training classes "
             f"(each learner needs {c.min_classes_per_cluster}); use at most {num_train_classes // c.min_classes_per_cluster}")
    require(s.classes_per_batch <= num_train_classes,
             f"sampler.classes_per_batch={s.classes_per_batch} is more than the {num_train_classes} training classes")
    blocks = config.model.trainable_blocks
    if blocks is not None and num_backbone_blocks is not None:
        require(blocks <= num_backbone_blocks,
                 f"model.trainable_blocks={blocks} but backbone {config.model.backbone} has {num_backbone_blocks} blocks")

"""Any pytorch-metric-learning (PML) loss, optionally with a PML miner, behind dcml's loss interface.

PML is an optional dependency: it is imported only when a :class:`PMLLoss` is built.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from dcml.errors import MissingDependencyError, UserError, require
from dcml.losses.base import SETTINGS_PATH, LossSettings, MetricLoss, require_count

# How many "did you mean" suggestions an unknown PML name gets (difflib's default).
_CLOSE_MATCH_COUNT = 3


@dataclass(frozen=True)
class PMLSettings(LossSettings):
    """``loss.settings`` of a pytorch-metric-learning loss (the names are PML's classes)."""

    loss_name: Optional[str] = None  # e.g. MultiSimilarityLoss; needed (PML has no default loss)
    miner_name: Optional[str] = None  # e.g. MultiSimilarityMiner (null: the loss sees every pair)
    per_learner: bool = False  # one loss instance per learner (its own proxies, betas)
    loss_kwargs: dict = field(default_factory=dict)  # keyword arguments of the PML loss
    miner_kwargs: dict = field(default_factory=dict)  # keyword arguments of the PML miner

    def validate(self) -> None:
        require(bool(self.loss_name), f"loss.name=pml needs {SETTINGS_PATH}loss_name, e.g. MultiSimilarityLoss")
        require(self.miner_name is not None or not self.miner_kwargs,
                f"{SETTINGS_PATH}miner_kwargs given without a {SETTINGS_PATH}miner_name")


def _import_pml():
    try:
        import pytorch_metric_learning.losses as pml_losses
        import pytorch_metric_learning.miners as pml_miners
    except ImportError as error:
        raise MissingDependencyError(
            "the 'pml' loss needs pytorch-metric-learning: pip install pytorch-metric-learning"
        ) from error
    return pml_losses, pml_miners


def _public_classes(module, base: type) -> dict[str, type]:
    """Concrete classes of a PML module deriving from ``base`` (its abstract Base* classes excluded)."""
    return {
        name: value
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, base) and not name.startswith("Base")
    }


def _lookup(kind: str, name: str, classes: dict[str, type]) -> type:
    if name in classes:
        return classes[name]
    suggestions = difflib.get_close_matches(name, classes, n=_CLOSE_MATCH_COUNT) or sorted(classes)
    raise UserError(f"unknown PML {kind} {name!r}; close matches: {', '.join(suggestions)}")


def _instantiate(kind: str, name: str, cls: type, kwargs: dict):
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise UserError(f"PML {kind} {name}: {error}") from error


class _PMLMiner:
    """Gives a PML miner the ``mine(embeddings, labels)`` method that :class:`MetricLoss` calls.

    Kept out of nn.Module so the miner is not a submodule of the loss (PML miners hold no weights).
    """

    def __init__(self, miner):
        self.miner = miner

    def mine(self, embeddings, labels):
        return self.miner(embeddings, labels)


class PMLLoss(MetricLoss):
    """Wraps ``pytorch_metric_learning.losses.<loss_name>`` and optionally ``miners.<miner_name>``.

    ``loss_kwargs`` go to the PML loss constructor and ``miner_kwargs`` to the miner's. With
    ``per_learner=True`` every learner gets its own loss instance (e.g. its own proxies), selected by
    the ``learner`` argument; otherwise one instance is shared and ``learner`` is ignored. If the PML
    loss requires ``num_classes`` and it is not in ``loss_kwargs``, ``num_classes`` is passed on.
    Parameters of the PML loss (proxies, learnable betas) are returned by ``learnable_parameters()``.
    """

    def __init__(
        self,
        loss_name: str,
        miner_name: str | None = None,
        *,
        per_learner: bool = PMLSettings.per_learner,
        num_learners: int = 1,
        num_classes: int | None = None,
        miner_kwargs: dict | None = None,
        **loss_kwargs,
    ):
        if not isinstance(loss_name, str) or not (miner_name is None or isinstance(miner_name, str)):
            raise UserError(f"pml loss: loss_name and miner_name must be names, got {loss_name!r}, {miner_name!r}")
        if not isinstance(per_learner, bool):
            raise UserError(f"pml loss: setting 'per_learner' must be true or false, got {per_learner!r}")
        pml_losses, pml_miners = _import_pml()
        loss_class = _lookup(
            "loss", loss_name, _public_classes(pml_losses, pml_losses.BaseMetricLossFunction)
        )
        wants_num_classes = inspect.signature(loss_class).parameters.get("num_classes")
        if (
            num_classes is not None
            and "num_classes" not in loss_kwargs
            and wants_num_classes is not None
            and wants_num_classes.default is inspect.Parameter.empty
        ):
            loss_kwargs["num_classes"] = num_classes

        miner = None
        if miner_name is not None:
            miner_class = _lookup("miner", miner_name, _public_classes(pml_miners, pml_miners.BaseMiner))
            miner = _PMLMiner(_instantiate("miner", miner_name, miner_class, dict(miner_kwargs or {})))
        elif miner_kwargs:
            raise UserError("pml loss: miner_kwargs given without a miner_name")
        super().__init__(miner)

        self.loss_name = loss_name
        self.per_learner = per_learner
        self.num_learners = require_count("pml loss", "num_learners", num_learners)
        num_instances = self.num_learners if self.per_learner else 1
        self.pml_losses = nn.ModuleList(
            _instantiate("loss", loss_name, loss_class, dict(loss_kwargs)) for _ in range(num_instances)
        )

    def compute_loss(self, embeddings, labels, indices_tuple, learner: int):
        if not 0 <= learner < self.num_learners:
            raise ValueError(f"learner {learner} out of range for {self.num_learners} learners")
        pml_loss = self.pml_losses[learner if self.per_learner else 0]
        stats = {}
        if indices_tuple is not None and len(indices_tuple) == 3:
            stats["num_triplets"] = float(len(indices_tuple[0]))
        elif indices_tuple is not None and len(indices_tuple) == 4:
            stats["num_positive_pairs"] = float(len(indices_tuple[0]))
            stats["num_negative_pairs"] = float(len(indices_tuple[2]))
        self.last_stats = stats
        return pml_loss(embeddings, labels, indices_tuple)

"""A registry of losses: ``create_loss("margin", num_learners=4, num_classes=100, alpha=0.2)``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from dcml.errors import UserError
from dcml.losses.base import MetricLoss
from dcml.losses.margin import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_BETA_MODE,
    DEFAULT_CUTOFF,
    DEFAULT_NU,
    DistanceWeightedMiner,
    MarginLoss,
)
from dcml.losses.pml import PMLLoss
from dcml.losses.triplet import DEFAULT_TRIPLET_MARGIN, TripletLoss

# The arguments every factory receives from the trainer rather than from the user's settings.
_CONTEXT_ARGUMENTS = ("num_learners", "num_classes")


@dataclass(frozen=True)
class LossSpec:
    name: str
    build: Callable[..., MetricLoss]
    description: str

    def settings(self) -> list[str]:
        """The user settings the factory accepts (its keyword arguments minus the trainer's)."""
        parameters = inspect.signature(self.build).parameters
        return [name for name in parameters if name not in _CONTEXT_ARGUMENTS]

    def required_settings(self) -> list[str]:
        parameters = inspect.signature(self.build).parameters
        return [
            name
            for name, parameter in parameters.items()
            if name not in _CONTEXT_ARGUMENTS and parameter.default is inspect.Parameter.empty
        ]


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, description: str):
    """Decorator: register ``fn(*, num_learners, num_classes, **settings) -> MetricLoss`` as ``name``."""

    def decorate(fn: Callable[..., MetricLoss]) -> Callable[..., MetricLoss]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        _LOSSES[name] = LossSpec(name=name, build=fn, description=description)
        return fn

    return decorate


def available_losses() -> dict[str, LossSpec]:
    return dict(sorted(_LOSSES.items()))


def create_loss(name: str, *, num_learners: int, num_classes: int, **settings) -> MetricLoss:
    """Build the loss registered as ``name`` with the user's ``settings`` (validated, UserError if bad)."""
    losses = available_losses()
    if name not in losses:
        raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(losses)}")
    spec = losses[name]
    allowed = spec.settings()
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise UserError(
            f"unknown setting(s) {', '.join(map(repr, unknown))} for loss {name!r}; allowed: {', '.join(allowed)}"
        )
    missing = [setting for setting in spec.required_settings() if setting not in settings]
    if missing:
        raise UserError(f"loss {name!r} needs the setting(s): {', '.join(missing)}")
    return spec.build(num_learners=num_learners, num_classes=num_classes, **settings)


@register_loss("margin", "margin loss with distance-weighted sampling (Wu et al. 2017), DCML's loss")
def _build_margin_loss(
    *,
    num_learners: int,
    num_classes: int,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    nu: float = DEFAULT_NU,
    beta_mode: str = DEFAULT_BETA_MODE,
    cutoff: float = DEFAULT_CUTOFF,
    nonzero_loss_cutoff: float | None = None,
) -> MetricLoss:
    # Validate alpha and beta before they are added up for the miner's default cutoff.
    loss = MarginLoss(alpha, beta, nu, beta_mode, num_learners, num_classes, miner=None)
    if nonzero_loss_cutoff is None:
        nonzero_loss_cutoff = loss.alpha + float(beta)
    loss.miner = DistanceWeightedMiner(cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff)
    return loss


@register_loss("triplet", "triplet loss with semi-hard mining (FaceNet), the baseline")
def _build_triplet_loss(*, num_learners: int, num_classes: int, margin: float = DEFAULT_TRIPLET_MARGIN) -> MetricLoss:
    return TripletLoss(margin)


@register_loss("pml", "any pytorch-metric-learning loss (optional dependency), optionally with a PML miner")
def _build_pml_loss(
    *,
    num_learners: int,
    num_classes: int,
    loss_name: str,
    miner_name: str | None = None,
    per_learner: bool = False,
    loss_kwargs: dict | None = None,
    miner_kwargs: dict | None = None,
) -> MetricLoss:
    for setting, value in (("loss_kwargs", loss_kwargs), ("miner_kwargs", miner_kwargs)):
        if value is not None and not isinstance(value, dict):
            raise UserError(f"pml loss: setting {setting!r} must be a mapping, got {value!r}")
    return PMLLoss(
        loss_name,
        miner_name,
        per_learner=per_learner,
        num_learners=num_learners,
        num_classes=num_classes,
        miner_kwargs=miner_kwargs,
        **(loss_kwargs or {}),
    )

"""A registry of losses: each is a builder and the settings dataclass it takes, under one name.

Adding a loss is one module: its :class:`~dcml.losses.base.LossSettings` dataclass next to its code,
and a builder registered with both::

    @dataclass(frozen=True)
    class MySettings(LossSettings):
        scale: float = 1.0

        def validate(self) -> None:
            require(self.scale > 0, f"{SETTINGS_PATH}scale must be > 0; got {self.scale}")

    @register_loss("mine", "what it is", MySettings)
    def _build(settings: MySettings, *, num_learners: int, num_classes: int) -> MetricLoss: ...

The configuration then accepts ``loss: {name: mine, settings: {scale: 2.0}}`` (and ``--set
loss.settings.scale=2``) and reads, type-checks and validates the settings through the dataclass.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from dcml.errors import UserError
from dcml.losses.base import SETTINGS_PATH, LossSettings, MetricLoss
from dcml.losses.margin import DistanceWeightedMiner, MarginLoss, MarginSettings
from dcml.losses.pml import PMLLoss, PMLSettings
from dcml.losses.triplet import TripletLoss, TripletSettings

Builder = Callable[..., MetricLoss]  # builder(settings, *, num_learners, num_classes)


@dataclass(frozen=True)
class LossSpec:
    name: str
    build: Builder
    settings: type[LossSettings]
    description: str


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, description: str, settings: type[LossSettings]):
    """Decorator: register ``fn(settings, *, num_learners, num_classes) -> MetricLoss`` as ``name``,
    with ``settings`` the frozen dataclass of its options (``loss.settings``)."""

    def decorate(fn: Builder) -> Builder:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        _LOSSES[name] = LossSpec(name=name, build=fn, settings=settings, description=description)
        return fn

    return decorate


def available_losses() -> dict[str, LossSpec]:
    return dict(sorted(_LOSSES.items()))


def loss_spec(name) -> LossSpec:
    """The loss registered as ``name``; a one-line UserError naming ``loss.name`` otherwise."""
    losses = available_losses()
    if isinstance(name, str) and name in losses:
        return losses[name]
    close = difflib.get_close_matches(str(name), list(losses), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"loss.name must be one of {', '.join(losses)}; got {name!r}{hint}")


def build_loss(name: str, settings: LossSettings, *, num_learners: int, num_classes: int) -> MetricLoss:
    """Build the loss registered as ``name`` from its validated ``settings`` dataclass."""
    spec = loss_spec(name)
    if not isinstance(settings, spec.settings):
        raise TypeError(f"loss {name!r} takes {spec.settings.__name__}, not {type(settings).__name__}")
    settings.validate()
    return spec.build(settings, num_learners=num_learners, num_classes=num_classes)


def create_loss(name: str, *, num_learners: int, num_classes: int, **settings) -> MetricLoss:
    """Build the loss registered as ``name`` from keyword settings, read and checked as
    ``loss.settings`` of a configuration is (unknown names with a did-you-mean, types, ranges)."""
    from dcml.config import check_finite_floats, from_dict

    spec = loss_spec(name)
    typed = from_dict(spec.settings, settings, SETTINGS_PATH)
    check_finite_floats(typed, SETTINGS_PATH)
    return build_loss(name, typed, num_learners=num_learners, num_classes=num_classes)


@register_loss("margin", "margin loss with distance-weighted sampling (Wu et al. 2017), DCML's loss", MarginSettings)
def _build_margin_loss(settings: MarginSettings, *, num_learners: int, num_classes: int) -> MetricLoss:
    miner = DistanceWeightedMiner(cutoff=settings.cutoff, nonzero_loss_cutoff=settings.miner_cutoff())
    return MarginLoss(settings.alpha, settings.beta, settings.nu, settings.beta_mode, num_learners, num_classes,
                      miner=miner)


@register_loss("triplet", "triplet loss with semi-hard mining (FaceNet), the baseline", TripletSettings)
def _build_triplet_loss(settings: TripletSettings, *, num_learners: int, num_classes: int) -> MetricLoss:
    return TripletLoss(settings.margin)


@register_loss("pml", "any pytorch-metric-learning loss (optional dependency), optionally with a PML miner", PMLSettings)
def _build_pml_loss(settings: PMLSettings, *, num_learners: int, num_classes: int) -> MetricLoss:
    return PMLLoss(
        settings.loss_name,
        settings.miner_name,
        per_learner=settings.per_learner,
        num_learners=num_learners,
        num_classes=num_classes,
        miner_kwargs=settings.miner_kwargs,
        **settings.loss_kwargs,
    )

"""The loss registry: names, settings dataclasses and their validation, beta parameters and their shapes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dcml.errors import UserError
from dcml.losses import (
    LossSettings,
    MarginLoss,
    MarginSettings,
    MetricLoss,
    PMLLoss,
    TripletLoss,
    TripletSettings,
    available_losses,
    build_loss,
    create_loss,
)

CONTEXT = {"num_learners": 4, "num_classes": 7}


def test_registry_lists_the_builtin_losses_with_their_settings():
    assert list(available_losses()) == ["margin", "pml", "triplet"]
    for spec in available_losses().values():
        assert spec.description
        assert issubclass(spec.settings, LossSettings) and spec.settings.__dataclass_params__.frozen


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("contrastive", "loss.name must be one of margin, pml, triplet; got 'contrastive'$"),
        ("marign", "loss.name must be one of margin, pml, triplet; got 'marign' [(]did you mean margin[?][)]$"),
    ],
)
def test_unknown_loss_name_lists_the_choices(name, message):
    with pytest.raises(UserError, match=message):
        create_loss(name, **CONTEXT)


def test_unknown_setting_suggests_a_close_name_or_lists_the_settings():
    with pytest.raises(UserError, match=r"unknown setting loss\.settings\.alpah; did you mean loss\.settings\.alpha\?"):
        create_loss("margin", alpah=1.0, **CONTEXT)
    with pytest.raises(UserError, match="unknown setting loss.settings.gamma; known fields: alpha, beta, nu, beta_mode, cutoff"):
        create_loss("margin", gamma=1.0, **CONTEXT)
    with pytest.raises(UserError, match="unknown setting loss.settings.alpha; known fields: margin$"):
        create_loss("triplet", alpha=0.2, **CONTEXT)


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("margin", {"beta_mode": "global"}, "loss.settings.beta_mode must be one of learner, class, fixed; got 'global'"),
        ("margin", {"alpha": -0.1}, "loss.settings.alpha must be > 0; got -0.1"),
        ("margin", {"alpha": 0}, "loss.settings.alpha must be > 0; got 0.0"),
        ("margin", {"beta": "1.2x"}, "loss.settings.beta must be a number; got '1.2x'"),
        ("margin", {"beta": 0}, "loss.settings.beta must be > 0; got 0.0"),
        ("margin", {"nu": math.nan}, "loss.settings.nu must be a finite number; got nan"),
        ("margin", {"cutoff": 1.5}, "loss.settings.nonzero_loss_cutoff must be > loss.settings.cutoff=1.5; got 1.4 (null: beta + alpha)"),
        ("margin", {"nonzero_loss_cutoff": 0.4}, "loss.settings.nonzero_loss_cutoff must be > loss.settings.cutoff=0.5; got 0.4"),
        ("margin", {"beta": 0.1}, "loss.settings.nonzero_loss_cutoff must be > loss.settings.cutoff=0.5; got 0.3"),
        ("triplet", {"margin": 0.0}, "loss.settings.margin must be > 0; got 0.0"),
        ("pml", {}, "loss.name=pml needs loss.settings.loss_name, e.g. MultiSimilarityLoss"),
        ("pml", {"loss_name": "ContrastiveLoss", "loss_kwargs": [1]}, "loss.settings.loss_kwargs must be a mapping"),
        ("pml", {"loss_name": "ContrastiveLoss", "per_learner": "yes"}, "loss.settings.per_learner must be true or false"),
        ("pml", {"loss_name": "ContrastiveLoss", "miner_kwargs": {"margin": 0.1}},
         "loss.settings.miner_kwargs given without a loss.settings.miner_name"),
    ],
)
def test_invalid_settings_are_one_line_user_errors_naming_the_setting(name, settings, message):
    with pytest.raises(UserError) as info:
        create_loss(name, **settings, **CONTEXT)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("build", "settings", "accepted"),
    [
        (lambda value: MarginLoss(alpha=value), lambda value: MarginSettings(alpha=value), 1e-3),
        (lambda value: MarginLoss(beta=value), lambda value: MarginSettings(beta=value), 0.5),
        (lambda value: TripletLoss(margin=value), lambda value: TripletSettings(margin=value), 1e-3),
    ],
)
def test_constructors_refuse_what_the_settings_refuse(build, settings, accepted):
    """The classes keep their own checks, with the settings' bounds: 0 and below are refused by
    both, a positive value is accepted by both."""
    for value in (0.0, -1.0):
        with pytest.raises(UserError):
            settings(value).validate()
        with pytest.raises(UserError):
            build(value)
    settings(accepted).validate()
    build(accepted)


def test_invalid_context_is_a_user_error():
    with pytest.raises(UserError, match="'num_learners' must be an integer >= 1"):
        create_loss("margin", num_learners=0, num_classes=3)
    with pytest.raises(UserError, match="beta_mode 'class' needs num_classes"):
        create_loss("margin", num_learners=1, num_classes=None, beta_mode="class")


@pytest.mark.parametrize(("beta_mode", "shape"), [("learner", (4,)), ("class", (7,)), ("fixed", None)])
def test_beta_parameters_per_mode(beta_mode, shape):
    loss = create_loss("margin", beta_mode=beta_mode, beta=1.1, **CONTEXT)
    assert isinstance(loss, MarginLoss) and isinstance(loss, MetricLoss)
    parameters = loss.learnable_parameters()
    if shape is None:
        assert parameters == []
        assert loss.beta.item() == pytest.approx(1.1)
    else:
        assert len(parameters) == 1 and parameters[0] is loss.beta
        assert parameters[0].shape == shape and torch.all(parameters[0] == torch.tensor(1.1))


def test_margin_settings_reach_the_loss_and_the_miner():
    loss = create_loss("margin", alpha=0.1, beta=1.0, nu=0.01, **CONTEXT)
    assert (loss.alpha, loss.nu) == (0.1, 0.01)
    assert loss.miner.nonzero_loss_cutoff == pytest.approx(1.1)  # beta + alpha by default
    loss = create_loss("margin", cutoff=0.3, nonzero_loss_cutoff=1.6, **CONTEXT)
    assert (loss.miner.cutoff, loss.miner.nonzero_loss_cutoff) == (0.3, 1.6)


def test_build_loss_takes_the_settings_dataclass_of_that_loss():
    loss = build_loss("triplet", TripletSettings(margin=0.3), **CONTEXT)
    assert isinstance(loss, TripletLoss) and loss.margin == 0.3
    with pytest.raises(TypeError, match="takes TripletSettings, not MarginSettings"):
        build_loss("triplet", MarginSettings(), **CONTEXT)
    with pytest.raises(UserError, match="loss.settings.margin must be > 0"):
        build_loss("triplet", TripletSettings(margin=-1.0), **CONTEXT)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MarginSettings().alpha = 0.5


def test_other_losses_build():
    assert isinstance(create_loss("triplet", margin=0.1, **CONTEXT), TripletLoss)
    assert isinstance(create_loss("pml", loss_name="ContrastiveLoss", **CONTEXT), PMLLoss)

"""create_loss: names, settings validation, beta parameters and their shapes."""

from __future__ import annotations

import math

import pytest
import torch

from dcml.errors import UserError
from dcml.losses import MarginLoss, MetricLoss, PMLLoss, TripletLoss, available_losses, create_loss

CONTEXT = {"num_learners": 4, "num_classes": 7}


def test_registry_lists_the_builtin_losses():
    assert list(available_losses()) == ["margin", "pml", "triplet"]
    assert all(spec.description for spec in available_losses().values())


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(UserError, match="unknown loss 'contrastive'; choose one of: margin, pml, triplet"):
        create_loss("contrastive", **CONTEXT)


def test_unknown_setting_lists_the_allowed_ones():
    with pytest.raises(UserError, match="unknown setting.*'gamma'.*'margin'.*allowed: alpha, beta, nu, beta_mode"):
        create_loss("margin", gamma=1.0, **CONTEXT)
    with pytest.raises(UserError, match="unknown setting.*'alpha'.*'triplet'.*allowed: margin"):
        create_loss("triplet", alpha=0.2, **CONTEXT)


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("margin", {"beta_mode": "global"}, "unknown beta_mode 'global'; choose one of: learner, class, fixed"),
        ("margin", {"alpha": -0.1}, "'alpha' must be >= 0"),
        ("margin", {"beta": "1.2"}, "'beta' must be a finite number"),
        ("margin", {"beta": 0}, "'beta' must be > 0"),
        ("margin", {"nu": math.nan}, "'nu' must be a finite number"),
        ("margin", {"cutoff": 1.5}, "'nonzero_loss_cutoff' must be > 1.5"),
        ("triplet", {"margin": 0.0}, "'margin' must be > 0"),
        ("pml", {}, "loss 'pml' needs the setting.*loss_name"),
        ("pml", {"loss_name": "ContrastiveLoss", "loss_kwargs": [1]}, "'loss_kwargs' must be a mapping"),
        ("pml", {"loss_name": "ContrastiveLoss", "per_learner": "yes"}, "'per_learner' must be true or false"),
    ],
)
def test_invalid_settings_are_one_line_user_errors(name, settings, message):
    with pytest.raises(UserError, match=message) as info:
        create_loss(name, **settings, **CONTEXT)
    assert "\n" not in str(info.value)


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


def test_margin_settings_reach_the_miner():
    loss = create_loss("margin", alpha=0.1, beta=1.0, **CONTEXT)
    assert loss.miner.nonzero_loss_cutoff == pytest.approx(1.1)  # beta + alpha by default
    loss = create_loss("margin", cutoff=0.3, nonzero_loss_cutoff=1.6, **CONTEXT)
    assert (loss.miner.cutoff, loss.miner.nonzero_loss_cutoff) == (0.3, 1.6)


def test_other_losses_build():
    assert isinstance(create_loss("triplet", margin=0.1, **CONTEXT), TripletLoss)
    assert isinstance(create_loss("pml", loss_name="ContrastiveLoss", **CONTEXT), PMLLoss)

"""What every registered loss promises, checked for each one (a new loss gets these tests for free).

Built from its settings dataclass's defaults, a loss takes a tiny batch, gives a finite scalar,
passes gradients to the embeddings and to its own parameters, and its state dict survives a
``torch.save`` / ``torch.load(weights_only=True)`` round trip; its settings read back from the
configuration (YAML, ``--set``, a saved run's ``config.to_dict()``) unchanged.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F
import yaml

from dcml.config import load_config
from dcml.errors import UserError
from dcml.losses import LossSettings, MetricLoss, available_losses, build_loss

#: Settings a loss has no default for (the user must name them), with a value for these tests.
REQUIRED = {"pml": {"loss_name": "ContrastiveLoss"}}
LOSSES = sorted(available_losses())
NUM_CLASSES, PER_CLASS, DIM, NUM_LEARNERS = 4, 3, 8, 2


def settings_of(name: str) -> LossSettings:
    return available_losses()[name].settings(**REQUIRED.get(name, {}))


def built(name: str) -> MetricLoss:
    return build_loss(name, settings_of(name), num_learners=NUM_LEARNERS, num_classes=NUM_CLASSES)


def tiny_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(NUM_CLASSES * PER_CLASS, DIM, generator=generator), dim=1)
    return embeddings.requires_grad_(), torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)


def test_every_loss_is_covered():
    assert set(REQUIRED) <= set(LOSSES) and {"margin", "triplet", "pml"} <= set(LOSSES)


@pytest.mark.parametrize("name", LOSSES)
def test_settings_are_a_frozen_dataclass_whose_defaults_validate(name):
    kind = available_losses()[name].settings
    assert issubclass(kind, LossSettings) and kind.__dataclass_params__.frozen
    defaults = kind()  # every field has a default
    if name in REQUIRED:  # ... or the loss names the missing setting in one line
        with pytest.raises(UserError, match="|".join(f"loss[.]settings[.]{key}" for key in REQUIRED[name])):
            defaults.validate()
    else:
        defaults.validate()
    settings_of(name).validate()


@pytest.mark.parametrize("name", LOSSES)
def test_forward_and_backward_on_a_tiny_batch(name):
    loss = built(name)
    for learner in range(NUM_LEARNERS):
        embeddings, labels = tiny_batch(seed=learner)
        torch.manual_seed(learner)  # the miners draw from torch's generator
        value = loss(embeddings, labels, learner=learner)
        assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
        loss.zero_grad()
        value.backward()
        assert torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0
        for parameter in loss.learnable_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert all(isinstance(key, str) for key in loss.last_stats)


@pytest.mark.parametrize("name", LOSSES)
def test_state_dict_round_trips_through_a_weights_only_load(name):
    trained = built(name)
    with torch.no_grad():  # move the loss's own parameters (betas) away from their initial values
        for parameter in trained.learnable_parameters():
            parameter.add_(0.125)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    restored = built(name)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for key, tensor in trained.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], tensor, rtol=0, atol=0)
    embeddings, labels = tiny_batch()
    values = []
    for loss in (trained, restored):
        torch.manual_seed(0)
        values.append(loss(embeddings, labels, learner=1))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", LOSSES)
def test_settings_read_back_from_the_configuration_unchanged(name):
    overrides = [f"loss.name={name}", *(f"loss.settings.{key}={value}" for key, value in REQUIRED.get(name, {}).items())]
    config = load_config("emoji", overrides)
    assert config.loss.settings == settings_of(name)
    saved = config.to_dict()
    assert yaml.safe_load(yaml.safe_dump(saved)) == saved
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    reloaded = load_config(None, [], base=torch.load(buffer, weights_only=True))
    assert reloaded.loss == config.loss and reloaded == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.loss.settings = settings_of(name)

"""Cached augmented views (data.augmented_views): augmentation for the price of a few frozen passes."""

import numpy as np
import pytest
import torch

from dcml.config import load_config
from dcml.errors import UserError
from dcml.training import checkpoint as ckpt
from dcml.training.trainer import Trainer

from .test_trainer import _config, _killed_then_resumed, _train

VIEWS = ("model.trainable_blocks=2", "data.cache_frozen_features=true", "data.train_augmentation=drawing",
         "data.augmented_views=2", "clustering.reuse_training_features=false", "schedule.epochs=3")


def test_views_hold_the_plain_input_first_then_distinct_augmented_copies(tiny_folder):
    trainer = Trainer(_config(tiny_folder, *VIEWS), None, progress=False, echo=lambda _: None)
    split = trainer.train_split
    versions = trainer.inputs._views_tensor(split, seed=0)
    assert versions.shape[0] == 3 and versions.shape[1] == split.num_images
    assert torch.equal(versions[0], trainer.inputs.tensor(split))  # view 0: what evaluation sees
    assert not torch.equal(versions[1], versions[0]) and not torch.equal(versions[2], versions[1])
    again = Trainer(_config(tiny_folder, *VIEWS), None, progress=False, echo=lambda _: None)
    assert torch.equal(again.inputs._views_tensor(again.train_split, seed=0), versions)  # drawn from the seed
    assert not torch.equal(again.inputs._views_tensor(again.train_split, seed=1)[1], versions[1])


def test_training_draws_from_every_version(tiny_folder, monkeypatch):
    trainer = Trainer(_config(tiny_folder, *VIEWS), None, progress=False, echo=lambda _: None)
    versions = trainer.inputs._views_tensor(trainer.train_split, seed=trainer.config.seed)
    seen = set()
    original = trainer.inputs.train_batches

    def spy(split, labels, sampler):
        for inputs, batch_labels, indices, learner in original(split, labels, sampler):
            for row, index in zip(inputs, indices.tolist()):
                seen.add(next(v for v in range(3) if torch.equal(versions[v, index], row)))
            yield inputs, batch_labels, indices, learner

    monkeypatch.setattr(trainer.inputs, "train_batches", spy)
    trainer.fit()
    assert seen == {0, 1, 2}


def test_a_resumed_run_with_views_ends_exactly_like_an_uninterrupted_one(tiny_folder, tmp_path, monkeypatch):
    config = _config(tiny_folder, *VIEWS)
    _, uninterrupted = _train(config, tmp_path / "full")
    result = _killed_then_resumed(config, tmp_path / "cut", monkeypatch, after_epochs=1).fit()
    for key in ("selected_epoch", "selection_score", "test", "val"):
        assert result[key] == uninterrupted[key], key
    full = ckpt.load_checkpoint(tmp_path / "full" / ckpt.LAST)["model"]
    cut = ckpt.load_checkpoint(tmp_path / "cut" / ckpt.LAST)["model"]
    assert all(torch.equal(tensor, cut[name]) for name, tensor in full.items())


def test_views_change_the_run_and_need_a_cache_and_an_augmentation(tiny_folder):
    plain, _ = _train(_config(tiny_folder, *VIEWS[:2], "data.train_augmentation=none", "schedule.epochs=3"), None)
    viewed, _ = _train(_config(tiny_folder, *VIEWS), None)
    weights = [dict(t.model.named_parameters()) for t in (plain, viewed)]
    assert any(not torch.equal(tensor, weights[1][name]) for name, tensor in weights[0].items())
    with pytest.raises(UserError, match="data.augmented_views needs data.cache_frozen_features=true"):
        load_config("emoji", ["data.augmented_views=2", "data.cache_frozen_features=false", "data.train_augmentation=drawing",
                              "clustering.reuse_training_features=false"])
    with pytest.raises(UserError, match="data.augmented_views must be in 0..64"):
        load_config("emoji", ["data.augmented_views=-1"])

"""End-to-end training on a tiny dataset: outputs, model selection, exact resume, atomic checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dcml.config import load_config
from dcml.training import checkpoint as ckpt
from dcml.training.trainer import Trainer

from .conftest import tiny_overrides


def _config(root, *extra):
    return load_config("emoji", [*tiny_overrides(root), *extra])


def _train(config, out):
    trainer = Trainer(config, out, progress=False, echo=lambda _: None)
    return trainer, trainer.fit()


class Killed(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


def _killed_then_resumed(config, out, monkeypatch, *, after_epochs: int) -> Trainer:
    """Train until ``after_epochs`` epochs are checkpointed, die, then resume in a new (unfitted) Trainer."""
    original = Trainer.save_last

    def save_then_die(self, next_epoch):
        original(self, next_epoch)
        if next_epoch == after_epochs:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_last", save_then_die)
        with pytest.raises(Killed):
            _train(config, out)
    resumed = Trainer(config, out, progress=False, echo=lambda _: None)
    resumed.resume(ckpt.load_checkpoint(out / ckpt.LAST))
    assert resumed.start_epoch == after_epochs
    return resumed


def test_training_writes_log_checkpoints_and_test_metrics(tiny_folder, tmp_path):
    trainer, result = _train(_config(tiny_folder), tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1, 2, 3]
    assert [record["phase"] for record in log] == ["divide", "divide", "divide", "conquer"]
    assert all(record["learners"] == 2 for record in log)
    # Every epoch re-clusters (T = 1); both clusters hold images.
    assert all(len(record["cluster_images"]) == 2 and min(record["cluster_images"]) > 0 for record in log)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    # The selected epoch is the best validation score, never a test score.
    scores = [record["score"] for record in log]
    assert metrics["selected_epoch"] == int(np.argmax(scores)) + 1
    assert metrics["selection_score"] == max(scores)
    assert set(metrics["test"]) == {"leave_one_out"} and "nmi" in metrics["test"]["leave_one_out"]
    for name in (ckpt.LAST, ckpt.BEST):
        assert (tmp_path / "run" / name).is_file()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_test_metrics_come_from_the_selected_epoch(tiny_folder, tmp_path):
    trainer, result = _train(_config(tiny_folder), tmp_path / "run")
    best = ckpt.load_checkpoint(tmp_path / "run" / ckpt.BEST)
    assert best["epoch"] + 1 == result["selected_epoch"]
    trainer.model.load_state_dict(best["model"])
    assert trainer.evaluate(None) == result["test"]


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tiny_folder, tmp_path, monkeypatch):
    config = _config(tiny_folder)
    _, uninterrupted = _train(config, tmp_path / "full")

    result = _killed_then_resumed(config, tmp_path / "cut", monkeypatch, after_epochs=2).fit()
    for key in ("selected_epoch", "selection_score", "test", "val"):
        assert result[key] == uninterrupted[key], key
    full_last = ckpt.load_checkpoint(tmp_path / "full" / ckpt.LAST)["model"]
    cut_last = ckpt.load_checkpoint(tmp_path / "cut" / ckpt.LAST)["model"]
    for name, tensor in full_last.items():
        assert torch.equal(tensor, cut_last[name]), name


def test_a_kill_while_saving_keeps_the_previous_checkpoint(tiny_folder, tmp_path, monkeypatch):
    trainer, _ = _train(_config(tiny_folder, "schedule.epochs=1", "schedule.conquer_epoch=null"), tmp_path / "run")
    before = (tmp_path / "run" / ckpt.LAST).read_bytes()

    def dying_save(obj, stream, *args, **kwargs):
        stream.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_last(1)
    assert (tmp_path / "run" / ckpt.LAST).read_bytes() == before
    assert [p.name for p in (tmp_path / "run").iterdir() if "tmp" in p.name] == []


def test_single_learner_is_the_same_code_path_with_one_cluster(tiny_folder, tmp_path):
    trainer, _ = _train(_config(tiny_folder, "clustering.learners=1"), None)
    assert trainer.clustering.num_clusters == 1
    assert all(record["learners"] == 1 for record in trainer.history)
    assert trainer.timings["kmeans"] == 0.0  # K = 1 never runs k-means


def test_cached_frozen_units_give_the_same_run_as_running_them(tiny_folder, tmp_path):
    extra = ("model.trainable_blocks=2", "schedule.epochs=2", "schedule.conquer_epoch=null")
    _, plain = _train(_config(tiny_folder, *extra), None)
    _, cached = _train(_config(tiny_folder, *extra, "data.cache_frozen_features=true"), None)
    for protocol, metrics in plain["test"].items():
        for key, value in metrics.items():
            assert cached["test"][protocol][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize(
    "extra",
    [
        ("model.learner_head=masks", "clustering.hierarchical=true", "schedule.freeze_backbone_after_recluster=1"),
        ("clustering.unit=class", "clustering.space=embedding", "sampler.epoch_length=smallest"),
        ("loss.name=triplet", "schedule.finetune_epoch=3", "optimizer.lr_decay_every=2"),
        ("loss.settings.beta_mode=class", "data.train_augmentation=crop", "clustering.reuse_training_features=false"),
        ("loss.name=pml", "loss.settings.loss_name=ContrastiveLoss", "loss.settings.miner_name=MultiSimilarityMiner",
         "loss.settings.loss_kwargs={pos_margin: 0.0, neg_margin: 1.0}", "loss.settings.per_learner=true"),
    ],
)
def test_every_variant_trains(tiny_folder, tmp_path, extra):
    trainer, result = _train(_config(tiny_folder, *extra), None)
    assert np.isfinite([record["loss"] for record in trainer.history]).all()
    assert 0.0 <= result["test"]["leave_one_out"]["recall@1"] <= 1.0


def test_hierarchical_division_doubles_the_learners(tiny_folder):
    trainer, _ = _train(_config(tiny_folder, "clustering.hierarchical=true", "clustering.learners=4",
                                "model.embedding_dim=16", "schedule.epochs=4", "schedule.conquer_epoch=null"), None)
    assert [record["learners"] for record in trainer.history] == [1, 2, 4, 4]


def test_backbone_freeze_after_reclustering_keeps_backbone_weights(tiny_folder):
    config = _config(tiny_folder, "schedule.freeze_backbone_after_recluster=1", "schedule.epochs=1", "schedule.conquer_epoch=null")
    trainer = Trainer(config, None, progress=False, echo=lambda _: None)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head_before = trainer.model.head.linear.weight.clone()
    trainer.fit()
    for key, value in trainer.model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(trainer.model.head.linear.weight, head_before)


def test_reused_training_features_equal_a_fresh_pass_when_weights_do_not_move(tiny_folder):
    config = _config(tiny_folder, "clustering.reuse_training_features=true", "clustering.recluster_every=2",
                     "optimizer.lr_backbone=0", "optimizer.lr_embedding=0", "optimizer.lr_beta=0", "schedule.epochs=3")
    trainer = Trainer(config, None, progress=False, echo=lambda _: None)
    for plan in trainer.plans[:2]:
        if plan.recluster:
            trainer.recluster(plan)
        trainer.train_epoch(plan)
    bank = trainer.feature_bank.features.copy()
    assert trainer.feature_bank.epoch == 1 and np.isnan(bank[:, 0]).any()  # P x M sampling skips some images
    reused = trainer.cluster_features(trainer.plans[2])
    fresh = trainer.embed(trainer.train_split, "backbone")
    np.testing.assert_allclose(reused, fresh, atol=1e-5)
    visited = ~np.isnan(bank[:, 0])
    np.testing.assert_allclose(bank[visited], fresh[visited], atol=1e-5)


def test_resume_is_exact_with_reused_training_features(tiny_folder, tmp_path, monkeypatch):
    config = _config(tiny_folder, "clustering.reuse_training_features=true", "clustering.recluster_every=2",
                     "schedule.epochs=4")
    _, uninterrupted = _train(config, tmp_path / "full")
    # Epoch 2 comes before a re-clustering: its training-pass features must be in the checkpoint.
    resumed = _killed_then_resumed(config, tmp_path / "cut", monkeypatch, after_epochs=2)
    assert resumed.feature_bank.epoch == 1 and not np.isnan(resumed.feature_bank.features).all()
    assert resumed.fit()["test"] == uninterrupted["test"]


@pytest.mark.parametrize("multiplier", [0.0, 1.0])
def test_mask_weight_decay_follows_its_multiplier(tiny_folder, multiplier):
    overrides = tiny_overrides(tiny_folder) + ["model.learner_head=masks", "optimizer.weight_decay=0.01",
                                               f"optimizer.mask_weight_decay_multiplier={multiplier}"]
    trainer = Trainer(load_config("emoji", overrides), None, progress=False)
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert groups["masks"]["weight_decay"] == pytest.approx(0.01 * multiplier)
    assert groups["embedding"]["weight_decay"] == pytest.approx(0.01)

"""A run stopped inside an epoch, or during its validation, resumes exactly as if it had never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcml.config import load_config
from dcml.training import checkpoint as ckpt
from dcml.training.stopping import TrainingStopped
from dcml.training.trainer import Trainer

from .conftest import tiny_overrides


def _config(root, *extra):
    return load_config("emoji", [*tiny_overrides(root), *extra])


def _fit(config, out):
    trainer = Trainer(config, out, progress=False, echo=lambda _: None)
    return trainer, trainer.fit()


def _stop_at(monkeypatch, batch_counter, epoch: int, batch: int):
    """Ask for a stop (as SIGTERM does) while batch ``batch`` of epoch ``epoch`` trains."""
    original = Trainer.objective

    def objective(self, plan, raw, labels, learner):
        if plan.epoch == epoch and batch_counter() == batch:
            self.stop.request("SIGTERM")
        return original(self, plan, raw, labels, learner)

    monkeypatch.setattr(Trainer, "objective", objective)


def _same_run(full_dir: Path, cut_dir: Path, full: dict, cut: dict) -> None:
    for key in ("selected_epoch", "selection_score", "test", "val"):
        assert cut[key] == full[key], key
    full_last = ckpt.load_checkpoint(full_dir / ckpt.LAST)["model"]
    cut_last = ckpt.load_checkpoint(cut_dir / ckpt.LAST)["model"]
    for name, tensor in full_last.items():
        assert torch.equal(tensor, cut_last[name]), name
    full_log = [json.loads(line) for line in (full_dir / "log.jsonl").read_text().splitlines()]
    cut_log = [json.loads(line) for line in (cut_dir / "log.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["batches"], r["learner_loss"]) for r in cut_log] == [(r["loss"], r["batches"], r["learner_loss"]) for r in full_log]


@pytest.mark.parametrize("reuse", [False, True])
def test_a_stop_mid_epoch_resumes_at_that_batch_exactly(tiny_folder, tmp_path, monkeypatch, batch_counter, reuse):
    config = _config(tiny_folder, f"clustering.reuse_training_features={str(reuse).lower()}")
    _, full = _fit(config, tmp_path / "full")
    with monkeypatch.context() as patch:
        _stop_at(patch, batch_counter, epoch=1, batch=2)
        with pytest.raises(TrainingStopped) as stopped:
            _fit(config, tmp_path / "cut")
    assert "after batch 3 of 4 in epoch 2" in stopped.value.saved  # the batch under way when the stop came is finished
    saved = ckpt.load_checkpoint(tmp_path / "cut" / ckpt.LAST, resumable=True)
    assert saved["next_epoch"] == 1 and saved["epoch_progress"]["batches"] == 3
    resumed = Trainer(config, tmp_path / "cut", progress=False, echo=lambda _: None, load_pretrained=False)
    resumed.resume(ckpt.load_checkpoint(tmp_path / "cut" / ckpt.LAST))
    _same_run(tmp_path / "full", tmp_path / "cut", full, resumed.fit())


def test_a_stop_during_validation_keeps_the_epochs_batches(tiny_folder, tmp_path, monkeypatch):
    config = _config(tiny_folder)
    _, full = _fit(config, tmp_path / "full")
    original = Trainer.evaluate
    calls = {"val": 0}

    def evaluate(self, split=None, **kwargs):
        if split == "val":
            calls["val"] += 1
            if calls["val"] == 2:
                raise TrainingStopped("SIGTERM")
        return original(self, split, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "evaluate", evaluate)
        with pytest.raises(TrainingStopped) as stopped:
            _fit(config, tmp_path / "cut")
    assert "before its validation" in stopped.value.saved
    saved = ckpt.load_checkpoint(tmp_path / "cut" / ckpt.LAST, resumable=True)
    assert saved["epoch_progress"]["trained"] and saved["next_epoch"] == 1
    resumed = Trainer(config, tmp_path / "cut", progress=False, echo=lambda _: None)
    resumed.resume(saved)
    _same_run(tmp_path / "full", tmp_path / "cut", full, resumed.fit())

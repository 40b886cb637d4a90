"""The speed settings (runtime section, loader workers) never change a CPU run's results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcml.config import load_config
from dcml.errors import UserError
from dcml.training.inputs import SeededEpoch
from dcml.training.trainer import Trainer, autocast_for

from .conftest import tiny_overrides

PLAIN = ["data.num_workers=0", "runtime.precision=fp32", "runtime.channels_last=false", "runtime.pin_memory=false",
         "runtime.persistent_workers=false", "runtime.prefetch_factor=1", "runtime.feature_batch_size=null"]
FAST = ["data.num_workers=2", "runtime.precision=auto", "runtime.channels_last=true", "runtime.pin_memory=true",
        "runtime.persistent_workers=true", "runtime.prefetch_factor=4", "runtime.feature_batch_size=null"]


def _run(root, extra):
    # Random crops and flips: the augmentation must not depend on which worker draws an image.
    overrides = tiny_overrides(root) + ["data.train_augmentation=crop_flip", "clustering.reuse_training_features=false",
                                        "schedule.epochs=3", "schedule.conquer_epoch=2"] + extra
    trainer = Trainer(load_config("emoji", overrides), None, progress=False, echo=lambda message: None)
    result = trainer.fit()
    return trainer, result


def test_workers_persistence_and_cuda_only_settings_leave_cpu_results_unchanged(tiny_folder):
    plain, plain_result = _run(tiny_folder, PLAIN)
    fast, fast_result = _run(tiny_folder, FAST)
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, fast.model.state_dict()[key]), key
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in fast.history]
    assert plain_result["test"] == fast_result["test"]


def test_augmentation_depends_on_the_seed_only(tiny_folder):
    # Same sampler state, two fresh wrappers: the same (index, learner, seed) items.
    class Sampler:
        seed, epoch, num_replicas, rank, first_batch = 3, 5, 1, 0, 0

        def __iter__(self):
            return iter([[(0, 0), (1, 0)], [(2, 1), (3, 1)]])

        def __len__(self):
            return 2

    first, second = SeededEpoch(), SeededEpoch()
    first.sampler = second.sampler = Sampler()
    items = list(first)
    assert items == list(second)
    assert len({seed for batch in items for _, _, seed in batch}) == 4  # every item its own seed
    Sampler.epoch = 6
    assert list(first) != items


def test_bf16_needs_cuda():
    with pytest.raises(UserError, match="runtime.precision=bf16 needs a CUDA device"):
        autocast_for("bf16", torch.device("cpu"))


def test_the_bf16_autocast_path_trains(tiny_folder, monkeypatch):
    # CUDA's bf16 autocast, exercised on the CPU: the loss and the normalisation must get float32.
    import dcml.training.build as build_module  # where the trainer's parts, the autocast among them, are built

    monkeypatch.setattr(build_module, "autocast_for", lambda precision, device: (lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    trainer, result = _run(tiny_folder, PLAIN)
    assert all(np.isfinite(record["loss"]) for record in trainer.history)
    assert 0 <= result["test"]["leave_one_out"]["recall@1"] <= 1

"""A tiny random backbone and a tiny image-folder dataset, so training runs end to end in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

from dcml.models.backbones import Backbone, available_backbones, register_backbone

TINY = "tiny_test_cnn"


class _Pool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def _tiny_units(trunk: nn.Module) -> list[nn.Module]:
    return list(trunk[:-1])  # everything but the pooling


if TINY not in available_backbones():

    @register_backbone(TINY, "a three-block CNN with BatchNorm, for tests")
    def _tiny(pretrained: bool) -> Backbone:  # noqa: ARG001 - random weights either way
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        trunk = nn.Sequential(block(3, 8), block(8, 16), block(16, 32), _Pool())
        return Backbone(trunk, name=TINY, feature_dim=32, input_size=32, units=_tiny_units)


def write_folder_dataset(root: Path, classes_per_split: dict[str, int], images_per_class: int = 4, size: int = 24, seed: int = 0) -> Path:
    """ROOT/{train,val,test}/<class>/*.png: each class a colour, each image that colour plus noise."""
    rng = np.random.default_rng(seed)
    offset = 0
    for split, count in classes_per_split.items():
        for c in range(count):
            colour = rng.integers(0, 256, size=3)
            folder = root / split / f"class{offset + c:03d}"
            folder.mkdir(parents=True)
            for i in range(images_per_class):
                noise = rng.integers(-40, 40, size=(size, size, 3))
                pixels = np.clip(colour[None, None, :] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
        offset += count
    return root


#: The demo's settings on the tiny backbone (tests of the demo's files and of ``dcml demo``).
TINY_DEMO = [f"model.backbone={TINY}", "model.pretrained=false", "model.trainable_blocks=2", "model.embedding_dim=16",
             "sampler.classes_per_batch=2", "sampler.images_per_class=2", "data.image_size=16", "device=cpu",
             "clustering.kmeans_iterations=5", "sampler.batches_per_epoch=4"]  # file shapes need no long training


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("tiny_folder"), {"train": 12, "val": 4, "test": 6})


@pytest.fixture
def batch_counter(monkeypatch):
    """``batch_counter()``: the index of the batch under way in its epoch, for hooks patched into
    ``Trainer.objective`` (which runs once per batch); it restarts with every ``train_epoch``."""
    from dcml.training.trainer import Trainer

    original = Trainer.train_epoch
    count = {"next": 0}

    def train_epoch(self, plan, progress=None):
        count["next"] = 0 if progress is None else progress.batches
        return original(self, plan, progress)

    def counter() -> int:
        value = count["next"]
        count["next"] += 1
        return value

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    return counter


def tiny_overrides(root: Path) -> list[str]:
    """A complete tiny recipe on the folder dataset (every setting a real preset would hold)."""
    return [
        "data.dataset=folder",
        f"data.root={root}",
        "data.image_size=16",
        "data.train_augmentation=none",
        "data.cache_frozen_features=false",
        "model.trainable_blocks=null",
        "data.eval_batch_size=32",
        f"model.backbone={TINY}",
        "model.pretrained=false",
        "model.embedding_dim=16",
        "clustering.learners=2",
        "clustering.recluster_every=1",
        "clustering.kmeans_iterations=5",
        "sampler.classes_per_batch=4",
        "sampler.images_per_class=2",
        "sampler.batches_per_epoch=null",
        "schedule.epochs=4",
        "schedule.conquer_epoch=3",
        "schedule.finetune_epoch=null",
        "schedule.freeze_backbone_after_recluster=0",
        "clustering.recluster_after_conquer=true",
        "clustering.hierarchical=false",
        "clustering.space=backbone",
        "clustering.unit=image",
        "model.learner_head=slices",
        "model.freeze_bn_stats=true",
        "sampler.epoch_length=largest",
        "sampler.pass_unit=classes",
        "sampler.fill_small_clusters=false",
        "optimizer.lr_decay_every=null",
        "evaluation.every=1",
        "optimizer.lr_backbone=1e-3",
        "optimizer.lr_embedding=1e-3",
        "evaluation.selection_metric=leave_one_out/recall@1",
        "device=cpu",
    ]

"""The paper presets: every value sourced, and the recipe values of each paper."""

from __future__ import annotations

import re

import pytest

from dcml.config import PRESET_DIR, load_config

DATASETS = ("cub200", "cars196", "sop", "inshop", "vehicleid")
CVPR_PRESETS = DATASETS
TPAMI_PRESETS = tuple(f"{name}-tpami" for name in DATASETS)
PAPER_PRESETS = CVPR_PRESETS + TPAMI_PRESETS

# The key recipe values per preset: dataset, K, d, P x M, epochs, conquer / finetune epoch counts,
# protocol and Recall@K list (the rest is common to each paper's presets, checked below).
RECIPES = {
    "cub200": ("cub200", 4, 128, (20, 4), 200, 80, 190, "leave_one_out", (1, 2, 4, 8)),
    "cars196": ("cars196", 4, 128, (20, 4), 200, 80, 190, "leave_one_out", (1, 2, 4, 8)),
    "sop": ("sop", 8, 128, (20, 4), 200, 80, 190, "leave_one_out", (1, 10, 100, 1000)),
    "inshop": ("inshop", 8, 128, (20, 4), 200, 80, 190, "query_gallery", (1, 10, 20, 30, 40, 50)),
    "vehicleid": ("vehicleid", 8, 128, (20, 4), 200, 80, 190, "vehicleid", (1, 5)),
    "cub200-tpami": ("cub200", 4, 512, (40, 2), 180, 80, None, "leave_one_out", (1, 2, 4, 8)),
    "cars196-tpami": ("cars196", 4, 512, (40, 2), 180, 80, None, "leave_one_out", (1, 2, 4, 8)),
    "sop-tpami": ("sop", 32, 512, (40, 2), 180, 80, None, "leave_one_out", (1, 10, 100, 1000)),
    "inshop-tpami": ("inshop", 8, 512, (40, 2), 180, 80, None, "query_gallery", (1, 10, 20, 30, 40, 50)),
    "vehicleid-tpami": ("vehicleid", 8, 512, (40, 2), 180, 80, None, "vehicleid", (1, 5)),
}


def leaf_settings(settings: dict, prefix: str = "") -> list[str]:
    """``section.field`` of every value of a saved configuration (``loss.settings.alpha``; a
    mapping-valued setting such as ``loss.settings.loss_kwargs`` is one value)."""
    names = []
    for key, value in settings.items():
        if isinstance(value, dict) and not key.endswith("kwargs"):
            names += leaf_settings(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_every_value_line_names_its_source(preset):
    text = (PRESET_DIR / f"{preset}.yaml").read_text()
    value_lines = [line for line in text.splitlines() if re.match(r"^\s*[\w]+:\s*[^\s#]", line)]
    # One line per field of every section, and of the preset's loss's own settings (loss.settings).
    assert len(value_lines) == len(leaf_settings(load_config(preset).to_dict()))
    missing = [line for line in value_lines if not re.search(r"\s#\s*\S", line)]
    assert not missing, f"{preset}: values without a '# source' comment: {missing}"


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_recipe_values(preset):
    dataset, learners, dim, (p, m), epochs, conquer, finetune, protocol, ks = RECIPES[preset]
    c = load_config(preset)
    assert c.data.dataset == dataset and c.data.root is None
    assert (c.clustering.learners, c.model.embedding_dim) == (learners, dim)
    assert (c.sampler.classes_per_batch, c.sampler.images_per_class) == (p, m)
    assert (c.schedule.epochs, c.schedule.conquer_epoch, c.schedule.finetune_epoch) == (epochs, conquer, finetune)
    assert (c.evaluation.protocol, c.evaluation.recall_ks) == (protocol, ks)
    # Common to both papers.
    assert (c.model.backbone, c.model.pretrained, c.model.weights, c.model.trainable_blocks) == ("resnet50", True, None, None)
    assert (c.model.dropout, c.model.freeze_bn_stats) == (0.01, True)
    assert (c.data.image_size, c.data.train_augmentation, c.data.cache_frozen_features) == (224, "crop_flip", False)
    assert c.data.validation_fraction == 0.15
    assert c.loss.name == "margin"
    s = c.loss.settings
    assert (s.alpha, s.beta, s.nu, s.beta_mode, s.cutoff, s.nonzero_loss_cutoff) == (0.2, 1.2, 0.0, "learner", 0.5, None)
    assert (c.optimizer.lr_backbone, c.optimizer.lr_embedding, c.optimizer.weight_decay) == (1e-5, 1e-5, 1e-4)
    assert c.optimizer.lr_decay_every is None
    assert (c.clustering.recluster_every, c.clustering.space, c.clustering.unit) == (2, "backbone", "image")
    assert c.clustering.recluster_after_conquer and not c.clustering.reuse_training_features
    assert (c.sampler.epoch_length, c.sampler.pass_unit, c.sampler.batches_per_epoch) == ("largest", "images", None)
    assert c.evaluation.selection_metric == "leave_one_out/recall@1"
    if preset.endswith("-tpami"):
        assert (c.model.learner_head, c.model.mask_lr_multiplier, c.model.mask_regularization) == ("masks", 100.0, 0.01)
        assert c.clustering.hierarchical and learners & (learners - 1) == 0
        assert c.schedule.freeze_backbone_after_recluster == 1
    else:
        assert c.model.learner_head == "slices" and not c.clustering.hierarchical
        assert c.schedule.freeze_backbone_after_recluster == 0

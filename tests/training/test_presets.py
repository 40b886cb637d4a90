"""The paper presets: every value sourced, the recipe values, and `dcml train --dry-run` on a
miniature replica of each dataset's layout (90 training + 10 test classes x 2 images of 8x8 px)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from dcml.cli import main
from dcml.config import PRESET_DIR, load_config
from dcml.errors import MissingDependencyError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # tests/data/replicas.py
from replicas import make_replica  # noqa: E402

from .conftest import TINY  # noqa: E402

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


@pytest.fixture(scope="session")
def replicas(tmp_path_factory) -> dict[str, Path]:
    """One replica per benchmark, built once: enough classes for every paper preset."""
    base = tmp_path_factory.mktemp("replicas")
    return {name: make_replica(name, base / name) for name in DATASETS}


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


def _dry_run(preset: str, root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", preset, "--data-root", str(root), "--out", str(out), "--dry-run", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dcml: error:")]
    assert len(errors) == 1, err
    return errors[0]


# ---------------------------------------------------------------------------- the preset files
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


# ---------------------------------------------------------------------------- dry runs
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_preset_passes_dry_run_on_its_layout(preset, replicas, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    assert main(_dry_run(preset, replicas[RECIPES[preset][0]], out)) == 0
    printed = capsys.readouterr().out
    assert f"dataset: {RECIPES[preset][0]}" in printed  # the resolved configuration
    assert "conquer (full embedding) from epoch 81 (schedule.conquer_epoch=80)" in printed
    assert "re-clustering (k-means) before epochs" in printed and "# schedule" in printed
    assert re.search(r"^(weights: ImageNet resnet50 available offline|warning: training would stop here: .*--weights PATH)",
                     printed, re.MULTILINE)
    assert "check" in printed.splitlines()[-1]
    assert list(out.iterdir()) == []  # --dry-run writes nothing


def test_dry_run_names_the_conquer_and_reclustering_epochs(replicas, tmp_path, capsys):
    assert main(_dry_run("cub200", replicas["cub200"], tmp_path / "a")) == 0
    printed = capsys.readouterr().out
    assert "protocol: leave_one_out on test; Recall@K for K = 1, 2, 4, 8" in printed
    assert "learners: K = 4, fixed slices of 32 dims (d = 128)" in printed
    assert "batch: P x M = 20 classes x 4 images = 80 images" in printed and "images: 224 px" in printed
    assert "an epoch runs until the largest cluster's pass over its images is done" in printed
    assert ("schedule: 200 epochs; divide in epochs 1-80; conquer (full embedding) from epoch 81 "
            "(schedule.conquer_epoch=80); K = 1 fine-tuning from epoch 191") in printed
    assert "re-clustering (k-means) before epochs 1, 3, ..., 189 (every 2): 95 passes" in printed

    assert main(_dry_run("sop-tpami", replicas["sop"], tmp_path / "b")) == 0
    printed = capsys.readouterr().out
    assert "re-clustering (k-means) before epochs 3, 5, ..., 179 (every 2): 89 passes" in printed
    assert "K = 1 from epoch 1, K = 2 from epoch 3" in printed and "K = 32 from epoch 11" in printed
    assert "backbone frozen in epochs 1, 3, ..., 179 (every 2)" in printed
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_wrong_layout_or_dataset_is_one_line_exit_2(replicas, tmp_path, capsys):
    assert main(_dry_run("cub200", replicas["sop"], tmp_path / "run")) == 2
    assert "cub200: expected the folder images/" in _one_line_error(capsys)
    # The In-shop preset pointed at SOP: the protocol it states does not match the dataset's.
    assert main(_dry_run("inshop", replicas["sop"], tmp_path / "run", "--set", "data.dataset=sop")) == 2
    assert "evaluation.protocol=query_gallery but dataset sop" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset, train_classes, needed", [("sop", 12, 8), ("sop-tpami", 40, 32)])
def test_too_few_classes_for_the_learners(preset, train_classes, needed, tmp_path, capsys):
    root = make_replica("sop", tmp_path / "small", train_classes=train_classes, test_classes=4)
    assert main(_dry_run(preset, root, tmp_path / "run")) == 2
    assert f"clustering.learners={needed} is too many for" in _one_line_error(capsys)


def test_missing_pretrained_weights_warn_with_the_fix(replicas, tmp_path, capsys, monkeypatch):
    from dcml.models import backbones

    def not_cached(name):
        raise MissingDependencyError(f"the ImageNet weights for {name} are not available offline; pass --weights PATH")

    monkeypatch.setattr(backbones, "cached_torchvision_weights", not_cached)
    assert main(_dry_run("cars196", replicas["cars196"], tmp_path / "run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "warning: training would stop here: the ImageNet weights for resnet50 are not available offline; pass --weights PATH" in lines
    assert "training would stop when it loads the backbone's weights" in lines[-1]

    monkeypatch.setattr(backbones, "cached_torchvision_weights", lambda name: Path(f"/hub/{name}.pth"))
    assert main(_dry_run("cars196", replicas["cars196"], tmp_path / "run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "weights: ImageNet resnet50 available offline (/hub/resnet50.pth)" in lines
    assert lines[-1].startswith("# all checks passed")


def test_weights_file_is_checked(replicas, tmp_path, capsys):
    assert main(_dry_run("cub200", replicas["cub200"], tmp_path / "run", "--weights", str(tmp_path / "none.pth"))) == 2
    assert "weights file" in _one_line_error(capsys)

    from dcml.models.backbones import create_backbone

    tiny = tmp_path / "tiny.pth"
    torch.save(create_backbone(TINY, pretrained=False).trunk.state_dict(), tiny)
    assert main(_dry_run("cub200", replicas["cub200"], tmp_path / "run", "--weights", str(tiny), "--set", f"model.backbone={TINY}")) == 0
    assert f"weights: {tiny} (fits {TINY})" in capsys.readouterr().out
    assert main(_dry_run("cub200", replicas["cub200"], tmp_path / "run", "--weights", str(tiny))) == 2
    assert "does not fit backbone 'resnet50'" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_runtime_checks_training_would_run(replicas, tmp_path, capsys, monkeypatch):
    root = replicas["inshop"]
    assert main(_dry_run("inshop", root, tmp_path / "run", "--set", "device=cpu", "--set", "runtime.precision=bf16")) == 2
    assert "runtime.precision=bf16 needs a CUDA device" in _one_line_error(capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun --nproc_per_node 2
    reuse = ("--set", "data.train_augmentation=none", "--set", "clustering.reuse_training_features=true")
    assert main(_dry_run("inshop", root, tmp_path / "run", *reuse)) == 0  # the ranks pool their features
    capsys.readouterr()
    assert main(_dry_run("inshop", root, tmp_path / "run")) == 0
    assert "processes: 2 torchrun ranks" in capsys.readouterr().out

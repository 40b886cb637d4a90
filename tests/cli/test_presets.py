"""`dcml train --dry-run` with each paper preset on a miniature replica of its dataset's layout
(90 training + 10 test classes x 2 images of 8x8 px). The preset files' own values are checked in
tests/training/test_preset_values.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from dcml.cli import main
from dcml.errors import MissingDependencyError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # tests/data/replicas.py
from replicas import make_replica  # noqa: E402

from training.conftest import TINY  # noqa: E402

DATASETS = ("cub200", "cars196", "sop", "inshop", "vehicleid")
CVPR_PRESETS = DATASETS
TPAMI_PRESETS = tuple(f"{name}-tpami" for name in DATASETS)
PAPER_PRESETS = CVPR_PRESETS + TPAMI_PRESETS

DATASET_OF = {preset: preset.removesuffix("-tpami") for preset in PAPER_PRESETS}  # cub200-tpami trains on cub200


@pytest.fixture(scope="session")
def replicas(tmp_path_factory) -> dict[str, Path]:
    """One replica per benchmark, built once: enough classes for every paper preset."""
    base = tmp_path_factory.mktemp("replicas")
    return {name: make_replica(name, base / name) for name in DATASETS}


def _dry_run(preset: str, root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", preset, "--data-root", str(root), "--out", str(out), "--dry-run", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dcml: error:")]
    assert len(errors) == 1, err
    return errors[0]


# ---------------------------------------------------------------------------- dry runs
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_preset_passes_dry_run_on_its_layout(preset, replicas, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    assert main(_dry_run(preset, replicas[DATASET_OF[preset]], out)) == 0
    printed = capsys.readouterr().out
    assert f"dataset: {DATASET_OF[preset]}" in printed  # the resolved configuration
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

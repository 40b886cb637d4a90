"""Embedding extraction and `dcml embed`, on tiny generated images with small random backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcml.cli import main
from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split
from dcml.data.registry import _READERS, DatasetReader
from dcml.model_runner import extract_embeddings
from dcml.errors import DatasetError
from dcml.models.backbones import create_backbone


def _write_images(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    paths = _write_images(tmp_path_factory.mktemp("images"), 7)
    return Split("test", paths, labels=[3, 3, 1, 1, 0, 2, 2], groups=[0, 1, 0, 1, 0, 1, 0])


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return create_backbone("resnet18", pretrained=False)


def test_shapes_dtypes_and_labels(tiny_split, small_model):
    transform = small_model.test_transform(32)
    embeddings, labels = extract_embeddings(small_model, tiny_split, transform, batch_size=3, progress=False)
    assert embeddings.shape == (7, 512) and embeddings.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist() == [3, 3, 1, 1, 0, 2, 2]
    assert np.isfinite(embeddings).all()


def test_order_follows_the_split_and_is_deterministic(tiny_split, small_model):
    transform = small_model.test_transform(32)
    first, _ = extract_embeddings(small_model, tiny_split, transform, batch_size=2, progress=False)
    again, _ = extract_embeddings(small_model, tiny_split, transform, batch_size=2, progress=False)
    np.testing.assert_array_equal(first, again)
    order = [6, 2, 0, 5, 1, 4, 3]
    shuffled = Split("test", [tiny_split.paths[i] for i in order], tiny_split.labels[order])
    permuted, labels = extract_embeddings(small_model, shuffled, transform, batch_size=4, progress=False)
    np.testing.assert_allclose(permuted, first[order], rtol=1e-4, atol=1e-5)
    assert labels.tolist() == tiny_split.labels[order].tolist()
    assert not np.allclose(first[0], first[1])  # different images, different embeddings


def test_model_mode_is_restored_and_batchnorm_is_frozen(tiny_split, small_model):
    small_model.train()
    before = small_model.trunk.bn1.running_mean.clone()
    extract_embeddings(small_model, tiny_split, small_model.test_transform(32), progress=False)
    assert small_model.training
    assert torch.equal(before, small_model.trunk.bn1.running_mean)
    small_model.eval()


def test_efficientnet_lite0_at_small_size(tiny_split):
    backbone = create_backbone("efficientnet_lite0")
    embeddings, _ = extract_embeddings(backbone, tiny_split, backbone.test_transform(32), progress=False)
    assert embeddings.shape == (7, 1280) and np.isfinite(embeddings).all()


def test_unreadable_image_is_a_one_line_dataset_error(tmp_path, small_model):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    split = Split("test", [bad], labels=[0])
    for workers in (0, 1):
        with pytest.raises(DatasetError, match="^cannot read image .*bad.png") as info:
            extract_embeddings(small_model, split, small_model.test_transform(32), num_workers=workers, progress=False)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- the CLI
@pytest.fixture()
def tiny_dataset(tmp_path, monkeypatch, tiny_split):
    """Register a throwaway dataset "tiny" whose test split is ``tiny_split``."""
    def load(root):  # noqa: ARG001
        return Dataset(
            name="tiny",
            root=tmp_path,
            splits={"test": tiny_split, "train": Split("train", tiny_split.paths[:2], [0, 1])},
            evaluation=EvaluationSpec(Protocol.CROSS_GROUP, (1,), ("test",)),
        )

    from dcml.data.registry import available_datasets

    available_datasets()  # import the built-in readers first, so the patch is not overwritten
    monkeypatch.setitem(_READERS, "tiny", DatasetReader("tiny", load, "test data", needs_root=False))
    return tiny_split


def _embed(*args):
    return main(["embed", "--dataset", "tiny", "--split", "test", "--no-progress", *map(str, args)])


def test_cli_writes_normalised_embeddings_labels_and_groups(tmp_path, tiny_dataset, capsys):
    out, labels_out, groups_out = tmp_path / "e.npy", tmp_path / "l.npy", tmp_path / "g.npy"
    code = _embed("--out", out, "--labels-out", labels_out, "--groups-out", groups_out,
                  "--backbone", "efficientnet_lite0", "--image-size", "32", "--batch-size", "4")
    assert code == 0
    embeddings = np.load(out)
    assert embeddings.shape == (7, 1280) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert np.load(labels_out).tolist() == tiny_dataset.labels.tolist()
    assert np.load(groups_out).tolist() == tiny_dataset.groups.tolist()
    assert "7 images" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_cli_no_normalize_and_weights(tmp_path, tiny_dataset, small_model):
    weights = tmp_path / "r18.pth"
    torch.save(small_model.trunk.state_dict(), weights)
    out = tmp_path / "raw.npy"
    assert _embed("--out", out, "--backbone", "resnet18", "--weights", weights, "--image-size", "32", "--no-normalize") == 0
    expected, _ = extract_embeddings(small_model, tiny_dataset, small_model.test_transform(32), progress=False)
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backbone", "nonet"], "unknown backbone 'nonet'"),
        (["--weights", "/nonexistent/w.pth", "--backbone", "resnet18"], "w.pth not found"),
        (["--split", "val"], "has no split 'val'"),
        (["--out", "/nonexistent-dir/e.npy"], "does not exist"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path, tiny_dataset, capsys, extra, message):
    args = ["--out", tmp_path / "e.npy", "--image-size", "32", *extra]
    # later options win in argparse, so "--split val" / "--out ..." in `extra` override the defaults
    assert _embed(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e.npy").exists()


def test_cli_groups_out_needs_groups(tmp_path, tiny_dataset, capsys):
    code = main(["embed", "--dataset", "tiny", "--split", "train", "--out", str(tmp_path / "e.npy"),
                 "--groups-out", str(tmp_path / "g.npy"), "--no-progress"])
    assert code == 2 and "no group ids" in capsys.readouterr().err


def test_cli_failure_leaves_no_partial_files(tmp_path, tiny_dataset, monkeypatch):
    out = tmp_path / "e.npy"
    out.write_bytes(b"previous")
    original_save = np.save
    calls = []

    def failing_save(file, array, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the labels file: interrupt after the embeddings temp file was written
            raise KeyboardInterrupt
        return original_save(file, array, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    code = _embed("--out", out, "--labels-out", tmp_path / "l.npy", "--image-size", "32", "--backbone", "resnet18",
                  "--weights", _resnet_weights(tmp_path), "--overwrite")
    assert code == 130
    assert out.read_bytes() == b"previous"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "r18.pth"]


def _resnet_weights(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(create_backbone("resnet18", pretrained=False).trunk.state_dict(), path)
    return path


def test_cli_on_a_folder_dataset(tmp_path):
    root = tmp_path / "shop"
    for split, classes in (("train", ("a", "b")), ("test", ("c", "d"))):
        for k, name in enumerate(classes):
            _write_images(root / split / name, 2, seed=k + 10 * len(split))
    out = tmp_path / "e.npy"
    labels_out = tmp_path / "l.npy"
    code = main(["embed", "--dataset", "folder", "--root", str(root), "--split", "test", "--out", str(out),
                 "--labels-out", str(labels_out), "--image-size", "32", "--no-progress"])
    assert code == 0
    assert np.load(out).shape == (4, 1280)
    assert len(set(np.load(labels_out).tolist())) == 2


def test_embed_help_mentions_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    text = capsys.readouterr().out
    for option in ("--dataset", "--split", "--out", "--labels-out", "--groups-out", "--backbone", "--weights",
                   "--image-size", "--batch-size", "--workers", "--no-normalize"):
        assert option in text

"""load_model and `dcml embed --model`: the trained embedding, from the checkpoint alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dcml
from dcml.cli import main
from dcml.model_runner import l2_normalize
from dcml.errors import UserError


def test_load_model_scores_exactly_what_metrics_json_reports(tiny_run):
    from dcml.evaluation.runner import evaluate_dataset
    from dcml.training.trainer import prepare_dataset

    model = dcml.load_model(tiny_run)
    assert not model.model.training and model.image_size == 16
    rows = evaluate_dataset(prepare_dataset(model.config), model.embed_split, seed=model.config.seed)
    assert rows == json.loads((tiny_run / "metrics.json").read_text())["test"]


def test_needs_no_pretrained_weights(tiny_run, monkeypatch):
    import dcml.models.backbones as backbones

    def refuse(*args, **kwargs):
        raise AssertionError("load_model must not read pretrained weights")

    monkeypatch.setattr(backbones.Backbone, "load_weights", refuse)
    model = dcml.load_model(tiny_run / "best.pt")
    assert model.dimension == 16


def test_every_input_kind_gives_the_same_rows(tiny_run, search_folder):
    model = dcml.load_model(tiny_run, batch_size=3)
    paths = sorted((search_folder / "test").rglob("*.png"))[:5]
    from_paths = model.embed(paths)
    assert from_paths.shape == (5, 16) and from_paths.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1.0, rtol=1e-5)
    from_pil = model.embed([Image.open(p) for p in paths])
    np.testing.assert_allclose(from_pil, from_paths, atol=1e-6)
    np.testing.assert_allclose(model.embed(paths[2]), from_paths[2:3], atol=1e-6)
    folder = model.embed(search_folder / "test")
    assert folder.shape == (24, 16)
    assert not np.allclose(from_paths[0], from_paths[4])


def test_embed_restores_train_mode(tiny_run, search_folder):
    model = dcml.load_model(tiny_run)
    model.model.train()
    model.embed(sorted((search_folder / "test").rglob("*.png"))[:2])
    assert model.model.training


def test_not_a_checkpoint_is_one_line(tmp_path):
    state = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, state)
    for source in (state, tmp_path / "missing", tmp_path):
        with pytest.raises(UserError) as info:
            dcml.load_model(source)
        assert "\n" not in str(info.value)


def test_embed_cli_model_equals_the_evaluated_embeddings(tiny_run, tmp_path, capsys):
    out = tmp_path / "e.npy"
    assert main(["embed", "--model", str(tiny_run), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    model = dcml.load_model(tiny_run)
    expected, _ = model.embed_dataset(split="test")
    # What evaluation ranks: the model's rows, L2-normalised again by evaluate_dataset.
    np.testing.assert_array_equal(np.load(out), l2_normalize(expected))
    # Existing outputs are kept unless --overwrite.
    assert main(["embed", "--model", str(tiny_run), "--split", "test", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_embed_cli_images_folder(tiny_run, search_folder, tmp_path):
    out, listing = tmp_path / "e.npy", tmp_path / "paths.txt"
    folder = search_folder / "val"
    assert main(["embed", "--model", str(tiny_run), "--images", str(folder), "--out", str(out),
                 "--paths-out", str(listing), "--no-progress"]) == 0
    paths = listing.read_text().splitlines()
    assert len(paths) == 16 and paths == sorted(paths)
    np.testing.assert_allclose(np.load(out), dcml.load_model(tiny_run).embed(paths), atol=1e-6)


def test_embed_cli_refuses_a_dcml_checkpoint_as_weights(tiny_run, tmp_path, capsys):
    code = main(["embed", "--dataset", "folder", "--root", str(tmp_path), "--split", "test", "--out",
                 str(tmp_path / "e.npy"), "--weights", str(tiny_run / "best.pt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--model" in err and err.count("\n") == 1


def test_embed_cli_bounds_the_image_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["embed", "--dataset", "emoji", "--split", "test", "--out", str(tmp_path / "e.npy"), "--image-size", "100000"])
    assert info.value.code == 2
    assert "an image size in 16..2048 pixels" in capsys.readouterr().err

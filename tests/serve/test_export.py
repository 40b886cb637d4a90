"""dcml export: the graph embeds as load_model does, from resized images alone, with a free batch axis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcml.cli import main


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_embed():
    """The README's "onnxruntime, Pillow and numpy alone" function, run as printed there."""
    text = README.read_text()
    block = text.split("<!-- onnx-example -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = block.split("\nvectors = embed(", 1)[0]  # the definition, without the example call on made-up files
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - this repository's own README
    return namespace["embed"]


def _resized_batch(model, paths) -> np.ndarray:
    """What the README's function feeds the graph: Pillow resize + centre crop, [0, 1], N x 3 x S x S."""
    size = model.image_size
    short = round(size * 256 / 224)
    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        width, height = image.size
        new = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        image = image.resize(new, Image.Resampling.BILINEAR)
        left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
        rows.append(pixels.transpose(2, 0, 1))
    return np.stack(rows)


def test_onnx_export_matches_load_model_through_onnxruntime(serve_run, serve_folder, model, tmp_path, capsys):
    import onnx
    import onnxruntime

    out = tmp_path / "model.onnx"
    assert main(["export", str(serve_run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |export - load_model|" in printed
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    assert graph_input.shape[1:] == [3, model.image_size, model.image_size] and isinstance(graph_input.shape[0], str)
    paths = sorted((serve_folder / "test").rglob("*.png"))[:5]  # a batch size the export never saw
    got = session.run([graph_output.name], {graph_input.name: _resized_batch(model, paths)})[0]
    expected = model.embed(paths)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["image_size"] == str(model.image_size) and metadata["dcml_checkpoint_sha256"] == model.sha256
    onnx.checker.check_model(onnx.load(str(out)))
    # The README's code, Pillow and onnxruntime alone, gives load_model's embedding of real files.
    odd = Image.open(paths[0]).resize((37, 29))  # not square, not the crop size: resize and crop really run
    odd.save(tmp_path / "odd.png")
    from_readme = _readme_embed()([*paths, tmp_path / "odd.png"], str(out))
    assert np.abs(from_readme - model.embed([*paths, tmp_path / "odd.png"])).max() < 1e-4
    # An existing file is never replaced unasked.
    assert main(["export", str(serve_run), "--format", "onnx", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_load_model(serve_run, serve_folder, model, tmp_path, capsys):
    import torch

    out = tmp_path / "model.pt"
    assert main(["export", str(serve_run), "--format", "torchscript", "--out", str(out)]) == 0
    traced = torch.jit.load(str(out))  # our own file, just written: TorchScript runs code by design
    paths = sorted((serve_folder / "test").rglob("*.png"))[-4:]
    with torch.no_grad():
        got = traced(torch.from_numpy(_resized_batch(model, paths))).numpy()
    assert np.abs(got - model.embed(paths)).max() < 1e-4


def test_an_export_that_drifts_is_refused_and_nothing_is_written(serve_run, tmp_path, monkeypatch, capsys):
    import dcml.export as export

    original = export.ExportedEmbedding.forward
    monkeypatch.setattr(export.ExportedEmbedding, "forward", lambda self, images: original(self, images) * 1.01)
    out = tmp_path / "drift.pt"
    assert main(["export", str(serve_run), "--format", "torchscript", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "differs from load_model" in error and "nothing was written" in error and len(error.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["onnx"])
def test_export_help_says_what_the_input_is(fmt, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "float32 in [0, 1]" in " ".join(capsys.readouterr().out.split())

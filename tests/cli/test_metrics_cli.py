import json

import numpy as np
import pytest

from dcml.cli import main


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    x = (np.eye(10)[labels] * 3 + rng.standard_normal((50, 10))).astype(np.float32)
    paths = {}
    for name, value in {
        "e": x,
        "l": labels,
        "q": rng.random(50) < 0.5,
        "g": rng.integers(0, 3, 50),
        "nan": np.full((50, 10), np.nan, np.float32),
        "short": labels[:40],
        "flt": labels.astype(np.float32),
    }.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], value)
    return paths


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_documented_keys(arrays, capsys):
    code, out, _ = run(capsys, "metrics", "--embeddings", arrays["e"], "--labels", arrays["l"], "--ks", "1,10", "--json")
    assert code == 0
    result = json.loads(out)
    assert {"recall@1", "recall@10", "nmi", "map@r", "r_precision", "precision@1", "num_queries"} <= set(result)
    assert result["num_queries"] == 50 and 0 < result["recall@1"] <= 1


def test_query_mask_and_groups(arrays, capsys):
    code, out, _ = run(
        capsys, "metrics", "--embeddings", arrays["e"], "--labels", arrays["l"], "--query-mask", arrays["q"], "--groups", arrays["g"], "--json", "--no-nmi"
    )
    assert code == 0
    result = json.loads(out)
    assert "nmi" not in result and result["num_queries"] + result["num_excluded_queries"] == int(np.load(arrays["q"]).sum())


def test_text_output(arrays, capsys):
    code, out, _ = run(capsys, "metrics", "--embeddings", arrays["e"], "--labels", arrays["l"])
    assert code == 0 and "recall@1" in out and "leave-one-out" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--embeddings", "nan", "--labels", "l"], "NaN"),
        (["--embeddings", "e", "--labels", "short"], "one entry per"),
        (["--embeddings", "e", "--labels", "flt"], "integers"),
        (["--embeddings", "e", "--labels", "l", "--ks", "1,50"], "larger than the reference set"),
        (["--embeddings", "e", "--labels", "l", "--ks", "one"], "--ks"),
        (["--embeddings", "missing", "--labels", "l"], "not found"),
        (["--embeddings", "e", "--labels", "l", "--query-mask", "g"], "boolean"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(arrays, capsys, tmp_path, extra, message):
    files = {**arrays, "missing": tmp_path / "missing.npy"}
    argv = ["metrics"] + [str(files.get(a, a)) for a in extra]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_not_an_npy_file(arrays, capsys, tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_text("hello")
    code, _, err = run(capsys, "metrics", "--embeddings", bad, "--labels", arrays["l"])
    assert code == 2 and "cannot read" in err


def test_plot_writes_a_png(arrays, capsys, tmp_path):
    out = tmp_path / "plots" / "recall.png"
    code, _, _ = run(capsys, "metrics", "--embeddings", arrays["e"], "--labels", arrays["l"], "--ks", "1,10,40", "--plot", out, "--no-nmi")
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["recall.png"]  # no temporaries left


def test_plot_needs_png_or_pdf(arrays, capsys, tmp_path):
    code, _, err = run(capsys, "metrics", "--embeddings", arrays["e"], "--labels", arrays["l"], "--plot", tmp_path / "r.gif")
    assert code == 2 and ".png or .pdf" in err

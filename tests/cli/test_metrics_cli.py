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


def _metrics_subprocess(tmp_path, embeddings, labels, *extra):
    """`dcml metrics` in its own process: these inputs used to kill it with a signal (SIGFPE, abort)."""
    import os
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", embeddings)
    np.save(tmp_path / "y.npy", labels)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the dcml this test imports
    return subprocess.run([sys.executable, "-m", "dcml", "metrics", "--embeddings", str(tmp_path / "x.npy"),
                           "--labels", str(tmp_path / "y.npy"), *extra], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("extra", [[], ["--no-nmi"]], ids=["nmi", "no-nmi"])
def test_zero_width_embeddings_are_one_line_not_a_signal(tmp_path, extra):
    done = _metrics_subprocess(tmp_path, np.zeros((10, 0), np.float32), np.repeat(np.arange(5), 2), "--ks", "1", *extra)
    assert done.returncode == 2 and done.stderr.startswith("dcml: error:") and done.stderr.count("\n") == 1
    assert "at least one dimension" in done.stderr


def test_values_near_float32_max_give_the_unit_scale_metrics(tmp_path, arrays):
    x, labels = np.load(arrays["e"]), np.load(arrays["l"])
    huge = np.ldexp(x, 128 - int(np.frexp(np.abs(x).max())[1]))  # exact; the largest |value| is in [1.7e38, 3.4e38)
    assert np.isfinite(huge).all() and np.abs(huge).max() > 1.7e38
    done = _metrics_subprocess(tmp_path, huge, labels, "--json")
    assert done.returncode == 0, done.stderr
    expected = _metrics_subprocess(tmp_path, x, labels, "--json")
    assert json.loads(done.stdout) == json.loads(expected.stdout)


@pytest.mark.parametrize("what", ["unique-labels", "one-group"])
def test_no_query_with_a_positive_is_one_line(arrays, capsys, tmp_path, what):
    extra = []
    labels = arrays["l"]
    if what == "unique-labels":
        labels = tmp_path / "unique.npy"
        np.save(labels, np.arange(50))
    else:
        np.save(tmp_path / "one.npy", np.zeros(50, np.int64))
        extra = ["--groups", tmp_path / "one.npy"]
    for flags in (["--json"], ["--no-nmi"]):
        code, out, err = run(capsys, "metrics", "--embeddings", arrays["e"], "--labels", labels, *extra, *flags)
        assert code == 2 and out == "" and err.count("\n") == 1 and "no query has a positive reference" in err


def test_a_query_mask_without_gallery_rows(arrays, capsys, tmp_path):
    np.save(tmp_path / "all.npy", np.ones(50, bool))
    code, _, err = run(capsys, "metrics", "--embeddings", arrays["e"], "--labels", arrays["l"], "--query-mask", tmp_path / "all.npy")
    assert code == 2 and "leaves no gallery" in err


def test_excluded_queries_are_mentioned(arrays, capsys, tmp_path):
    labels = np.load(arrays["l"]).copy()
    labels[0] = 99  # one row alone in its class
    np.save(tmp_path / "lonely.npy", labels)
    code, out, _ = run(capsys, "metrics", "--embeddings", arrays["e"], "--labels", tmp_path / "lonely.npy", "--no-nmi")
    assert code == 0 and "1 queries without a positive reference are left out" in out


def test_plot_never_replaces_a_file_unasked(tmp_path, capsys):
    from dcml.cli import main

    np.save(tmp_path / "E.npy", np.random.default_rng(0).random((20, 4)).astype(np.float32))
    np.save(tmp_path / "L.npy", np.repeat(np.arange(5), 4))
    (tmp_path / "plot.png").write_text("mine")
    args = ["metrics", "--embeddings", str(tmp_path / "E.npy"), "--labels", str(tmp_path / "L.npy"), "--no-nmi",
            "--plot", str(tmp_path / "plot.png")]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "plot.png").read_text() == "mine"
    assert main([*args, "--overwrite"]) == 0
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"

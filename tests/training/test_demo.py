"""`dcml demo` end to end on a fake emoji benchmark (fake npm packages) with the tiny backbone."""

from __future__ import annotations

import json

from dcml.cli import main
from dcml.demo import run_demo

from .conftest import TINY

TINY_DEMO = [f"model.backbone={TINY}", "model.pretrained=false", "model.trainable_blocks=2", "model.embedding_dim=16",
             "sampler.classes_per_batch=2", "sampler.images_per_class=2", "data.image_size=16", "device=cpu",
             "clustering.kmeans_iterations=5"]


def test_demo_writes_the_documented_results(fake_npm, tmp_path, monkeypatch):
    monkeypatch.setenv("DCML_CACHE_DIR", str(tmp_path / "cache"))
    payload = run_demo(tmp_path / "demo", quick=True, learners=2, overrides=TINY_DEMO, progress=False, echo=lambda _: None)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert {"zero_shot", "baseline", "dnc", "learners", "seconds"} <= set(saved)
    assert saved["learners"] == 2 and saved["seconds"] > 0
    for row in ("zero_shot", "baseline", "dnc"):
        assert set(saved[row]) == {"leave_one_out", "cross_vendor"}
        for metrics in saved[row].values():
            assert {"recall@1", "map@r", "r_precision", "precision@1", "nmi", "num_queries"} <= set(metrics)
    assert saved["runs"]["baseline"]["selected_epoch"] >= 1
    markdown = (tmp_path / "demo" / "results.md").read_text()
    assert "divide & conquer (K = 2)" in markdown and "| single metric (K = 1) |" in markdown
    for run in ("baseline", "dnc"):
        assert (tmp_path / "demo" / run / "metrics.json").is_file()
    assert (tmp_path / "demo" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_cli_prints_the_table(fake_npm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DCML_CACHE_DIR", str(tmp_path / "cache"))
    args = ["demo", "--quick", "--learners", "2", "--out", str(tmp_path / "demo"), "--no-progress"]
    for override in TINY_DEMO:
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "**cross-vendor**" in out and "zero-shot" in out and "results.json" in out

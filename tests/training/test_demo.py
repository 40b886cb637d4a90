"""The demo end to end on a fake emoji benchmark (fake npm packages) with the tiny backbone (its CLI: tests/cli/test_demo_cli.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dcml.demo import compare_models, results_markdown, run_demo
from dcml.evaluation.paired import QueryScores

from .conftest import TINY_DEMO

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
    # D&C minus K = 1 with its interval, per protocol, computed from the same numbers as the table.
    for protocol in ("cross_vendor", "leave_one_out"):
        comparison = saved["dnc_minus_baseline"][protocol]
        for metric in ("recall@1", "map@r"):
            difference = comparison[metric]
            assert difference["low"] <= difference["difference"] <= difference["high"]
            assert difference["level"] == 0.95 and difference["resamples"] == 2000
            assert difference["queries"] == saved["dnc"][protocol]["num_queries"]
            assert difference["difference"] == pytest.approx(saved["dnc"][protocol][metric] - saved["baseline"][protocol][metric],
                                                             abs=1e-12)
        assert "distinguishable from zero" in comparison["summary"] and comparison["summary"] in markdown
    assert all(saved["runs"][run]["per_query_matches_table"] for run in ("baseline", "dnc"))
    assert markdown.count("D&C minus K = 1") == 2
    # --quick says it is a smoke test before anything else.
    assert "smoke test" in saved["note"].lower() and "not a verdict" in saved["note"] and "make demo" in saved["note"]
    assert markdown.startswith("**Smoke test (--quick)") and "seed 0" in markdown and "not across machines" in markdown


def _scores(hits: np.ndarray, classes: np.ndarray) -> QueryScores:
    return QueryScores(rows=np.arange(len(hits)), classes=classes, scores={"recall@1": hits, "map@r": hits / 2})


def test_comparison_says_whether_the_difference_is_distinguishable_from_zero():
    classes = np.repeat(np.arange(40), 3)
    rng = np.random.default_rng(0)
    baseline = rng.random(len(classes)) < 0.5
    better = {p: _scores(np.ones(len(classes)), classes) for p in ("cross_vendor", "leave_one_out")}
    worse = {p: _scores(np.zeros(len(classes)), classes) for p in ("cross_vendor", "leave_one_out")}
    noisy = {p: _scores(baseline.astype(float), classes) for p in ("cross_vendor", "leave_one_out")}
    flipped = {p: _scores(np.roll(baseline, 3).astype(float), classes) for p in ("cross_vendor", "leave_one_out")}
    ahead = compare_models(better, noisy)["cross_vendor"]
    assert ahead["recall@1"]["distinguishable"] and ahead["recall@1"]["difference"] > 0
    assert "R@1 +" in ahead["summary"] and "distinguishable from zero (D&C ahead)" in ahead["summary"]
    assert "distinguishable from zero (D&C behind)" in compare_models(worse, noisy)["leave_one_out"]["summary"]
    unclear = compare_models(flipped, noisy)["cross_vendor"]
    assert not unclear["recall@1"]["distinguishable"] and unclear["recall@1"]["low"] < 0 < unclear["recall@1"]["high"]
    assert unclear["summary"].count("not distinguishable from zero with one seed") == 2


def test_a_full_demo_s_table_does_not_call_itself_a_smoke_test():
    classes = np.repeat(np.arange(10), 2)
    scores = {p: _scores(np.ones(len(classes)), classes) for p in ("cross_vendor", "leave_one_out")}
    row = {p: {"recall@1": 1.0, "map@r": 0.5, "num_queries": 20} for p in ("cross_vendor", "leave_one_out")}
    run = {"selected_epoch": 3, "selection_metric": "cross_vendor/recall@1", "train_images": 10, "seconds": 1.0}
    payload = {"zero_shot": row, "baseline": row, "dnc": row, "learners": 4, "seconds": 1.0, "quick": False, "image_size": 96,
               "backbone": "b", "runs": {"baseline": run, "dnc": run}, "seed": 3,
               "machine": {"cpu": "Some CPU", "cores": 2, "device": "cpu"},
               "dnc_minus_baseline": compare_models(scores, scores), "interval": {"resamples": 2000}, "note": None}
    markdown = results_markdown(payload)
    assert "smoke" not in markdown.lower() and "not a verdict" not in markdown
    assert "One run, seed 3, on Some CPU (2 cores, device cpu)" in markdown
    assert markdown.count("R@1 +0.00 [+0.00, +0.00], not distinguishable from zero with one seed") == 2

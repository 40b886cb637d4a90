"""`dcml demo` on a fake emoji benchmark (fake npm packages) with the tiny backbone prints its table."""

from __future__ import annotations

from dcml.cli import main

from training.conftest import TINY_DEMO


def test_demo_cli_prints_the_table(fake_npm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DCML_CACHE_DIR", str(tmp_path / "cache"))
    args = ["demo", "--quick", "--learners", "2", "--out", str(tmp_path / "demo"), "--no-progress"]
    for override in TINY_DEMO:
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "**cross-vendor**" in out and "zero-shot" in out and "results.json" in out
    assert out.count("Smoke test (--quick)") >= 2  # when it starts, and atop the table
    assert "not a verdict" in out and "D&C minus K = 1" in out

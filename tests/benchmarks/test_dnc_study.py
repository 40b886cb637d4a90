"""The study's statistics and summary, on synthetic runs (no training): pairing, intervals, tables."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("dnc_study", ROOT / "benchmarks" / "dnc_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dnc_study"] = module
    spec.loader.exec_module(module)
    return module


def scores(rng, classes, rate):
    """Per-query hit@1 / AP@R for every protocol row: ``classes`` test classes of three queries each."""
    labels = np.repeat(np.arange(classes), 3)
    out = {}
    for row in ("cross_vendor", "leave_one_out", "unseen_vendor"):
        hits = (rng.random(len(labels)) < rate).astype(np.float64)
        out.update({f"{row}/rows": np.arange(len(labels)), f"{row}/classes": labels,
                    f"{row}/recall@1": hits, f"{row}/map@r": hits * 0.8})
    return out


HISTORY = [{"epoch": e, "images": 100, "score": 0.1 * e, "phase": "divide"} for e in range(3)]


def save_run(study, out, variant, setting, seed, per_query, **extra):
    """A finished study run with these per-query scores (its test metrics are their means)."""
    test = {row: {"recall@1": per_query[f"{row}/recall@1"].mean(), "map@r": per_query[f"{row}/map@r"].mean()}
            for row in study.PROTOCOLS}
    record = {"variant": variant, "setting": setting, "seed": seed, "test": test, "history": HISTORY, "seconds": 1.0, **extra}
    study._save(out, study.run_name(variant, setting, seed), record, per_query)


def test_the_two_level_bootstrap_covers_the_mean_of_per_seed_differences(study):
    rng = np.random.default_rng(0)
    pairs = [(scores(rng, 200, 0.6), scores(rng, 200, 0.5)) for _ in range(5)]
    result = study.paired_seed_bootstrap(pairs, "cross_vendor", "recall@1", np.random.default_rng(1))
    per_seed = [a["cross_vendor/recall@1"].mean() - b["cross_vendor/recall@1"].mean() for a, b in pairs]
    assert result["difference"] == pytest.approx(np.mean(per_seed))
    assert result["low"] < result["difference"] < result["high"]
    assert result["low"] > 0  # a 10-point gap over 3,000 queries is clear
    same = study.paired_seed_bootstrap([(a, a) for a, _ in pairs], "cross_vendor", "recall@1", np.random.default_rng(1))
    assert same["difference"] == same["low"] == same["high"] == 0.0


def test_runs_scored_on_other_queries_are_not_paired(study):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="different queries"):
        study.paired_seed_bootstrap([(scores(rng, 20, 0.5), scores(rng, 21, 0.5))], "cross_vendor", "recall@1", rng)


def test_summary_pairs_by_seed_and_writes_its_files(study, tmp_path):
    rng = np.random.default_rng(2)
    for seed in (0, 1):
        for variant, rate in (("K1", 0.5), ("K4", 0.55)):
            for setting in study.SETTINGS:
                save_run(study, tmp_path, variant, setting, seed, scores(rng, 30, rate))
    summary = study.summarize(tmp_path)
    k4 = summary["variants"]["K4"]
    assert k4["cross_vendor"]["seeds"] == [0, 1]
    assert set(k4["cross_vendor"]["minus_reference"]) == {"recall@1", "map@r"}
    assert "minus_reference" not in summary["variants"]["K1"]["cross_vendor"]
    assert k4["unseen_vendor"]["by_vendor"].keys() == {"google", "twitter"}  # seeds 0 and 1 hold out these two
    assert (tmp_path / "study.png").stat().st_size > 0
    assert "| K4 | 2 |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["reference"] == "K1"


def test_a_recipe_is_paired_with_the_one_it_changes_and_validation_scores_are_summarised(study, tmp_path):
    # No K1 at all: the style recipe is still compared with the plain augmentation of the same K.
    rng = np.random.default_rng(3)
    for seed in (0, 1, 2):
        for variant, rate, validation in (("K4-drawing-aug", 0.4, 0.5), ("K4-drawing-style", 0.6, 0.7)):
            save_run(study, tmp_path, variant, "unseen", seed, scores(rng, 40, rate),
                     validation_unseen={"recall@1": validation + 0.01 * seed, "map@r": validation / 2})
    summary = study.summarize(tmp_path)
    style = summary["variants"]["K4-drawing-style"]["unseen_vendor"]
    assert style["minus_other_recipe"]["reference"] == "K4-drawing-aug"
    assert style["minus_other_recipe"]["recall@1"]["low"] > 0  # a 20-point gap on 360 queries
    assert style["validation_unseen"]["recall@1"]["mean"] == pytest.approx(0.71)
    assert "minus_other_recipe" not in summary["variants"]["K4-drawing-aug"]["unseen_vendor"]
    assert summary["variants"]["K4-drawing-aug"]["convergence"]["seeds"] == [0, 1, 2]
    text = (tmp_path / "summary.md").read_text()
    assert "K4-drawing-style minus K4-drawing-aug, recall@1: unseen_vendor +" in text
    assert "validation classes" in text


def test_an_interval_does_not_move_when_other_variants_join_the_study(study, tmp_path):
    rng = np.random.default_rng(4)

    def write(variant, rate):
        for seed in (0, 1):
            save_run(study, tmp_path, variant, "unseen", seed, scores(rng, 30, rate))

    write("K1", 0.5)
    write("K4", 0.6)
    before = study.summarize(tmp_path, with_plot=False)["variants"]["K4"]["unseen_vendor"]["minus_reference"]
    write("K2", 0.55)  # "K2" sorts before "K4" in VARIANTS, so a shared stream would hand K4 other draws
    variants = study.summarize(tmp_path, with_plot=False)["variants"]
    assert variants["K4"]["unseen_vendor"]["minus_reference"] == before
    assert "minus_reference" in variants["K2"]["unseen_vendor"]


@pytest.mark.parametrize("setting", ["all", "unseen"])
def test_every_variant_is_a_valid_emoji_config(study, setting):
    from dcml.config import load_config

    for variant in study.VARIANTS:
        for seed in range(len(study.VENDORS)):
            config = load_config("emoji", study.run_overrides(variant, setting, seed, []))
            assert config.seed == seed
            if setting == "unseen":
                assert config.data.held_out_group == study.held_out_vendor(seed)


def test_every_same_k_pair_names_two_variants_of_one_k(study):
    for variant, other in study.SAME_K_OTHER_RECIPE.items():
        assert variant in study.VARIANTS and other in study.VARIANTS
        assert variant.split("-")[0] == other.split("-")[0], "a same-K pair must share K"


def test_the_emoji_styles_preset_is_the_studys_unseen_vendor_recipe(study):
    # The preset users train with must be the recipe the README's unseen-vendor figures measured.
    from dcml.config import load_config

    preset = load_config("emoji-styles").to_dict()
    measured = load_config("emoji", study.VARIANTS["K4-drawing-style-blocks9"]).to_dict()
    assert preset == measured
    assert preset != load_config("emoji").to_dict()

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


def kept(study, per_query):
    """A run's per-class scores, as its JSON keeps them."""
    return study.per_class_scores(per_query, study.PROTOCOLS)


def test_the_two_level_bootstrap_covers_the_mean_of_per_seed_differences(study):
    rng = np.random.default_rng(0)
    queries = [(scores(rng, 200, 0.6), scores(rng, 200, 0.5)) for _ in range(5)]
    pairs = [(kept(study, a), kept(study, b)) for a, b in queries]
    result = study.paired_seed_bootstrap(pairs, "cross_vendor", "recall@1", np.random.default_rng(1))
    per_seed = [a["cross_vendor/recall@1"].mean() - b["cross_vendor/recall@1"].mean() for a, b in queries]
    assert result["difference"] == pytest.approx(np.mean(per_seed))
    assert result["low"] < result["difference"] < result["high"]
    assert result["low"] > 0  # a 10-point gap over 3,000 queries is clear
    same = study.paired_seed_bootstrap([(a, a) for a, _ in pairs], "cross_vendor", "recall@1", np.random.default_rng(1))
    assert same["difference"] == same["low"] == same["high"] == 0.0


def test_runs_scored_on_other_queries_are_not_paired(study):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="different queries"):
        study.paired_seed_bootstrap([(kept(study, scores(rng, 20, 0.5)), kept(study, scores(rng, 21, 0.5)))],
                                    "cross_vendor", "recall@1", rng)


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


def test_per_class_scores_keep_what_the_bootstrap_needs(study):
    classes = np.array([7, 3, 7, 3, 3, 9])
    per_query = {"unseen_vendor/classes": classes, "unseen_vendor/recall@1": np.array([1.0, 0, 0, 1, 1, 1]),
                 "unseen_vendor/map@r": np.array([0.5, 0, 0.25, 1, 0.5, 0.125])}
    assert study.per_class_scores(per_query, ["unseen_vendor", "cross_vendor"]) == {"unseen_vendor": {
        "classes": [3, 7, 9], "queries": [3, 2, 1], "recall@1": [2.0, 1.0, 1.0], "map@r": [1.5, 0.75, 0.125]}}


def summary_numbers(summary):
    """Every comparison's numbers in a summary, by (variant, row, comparison, metric)."""
    return {(variant, row, kind, metric): entry[row][kind][metric]
            for variant, entry in summary["variants"].items() for row in ("cross_vendor", "leave_one_out", "unseen_vendor")
            if row in entry for kind in ("minus_reference", "minus_zero_shot") if kind in entry[row]
            for metric in ("recall@1", "map@r")}


def write_study(study, folder, seed_rates, zero_shot_rate=0.3):
    rng = np.random.default_rng(5)
    for seed, rates in seed_rates.items():
        for variant, rate in rates.items():
            save_run(study, folder, variant, "unseen", seed, scores(rng, 40, rate))
    for vendor in study.VENDORS:
        per_query = scores(rng, 40, zero_shot_rate)
        test = {row: {"recall@1": per_query[f"{row}/recall@1"].mean(), "map@r": per_query[f"{row}/map@r"].mean()}
                for row in study.PROTOCOLS}
        study._save(folder, f"zero-shot-unseen-{vendor}",
                    {"variant": "zero-shot", "setting": "unseen", "held_out_vendor": vendor, "test": test}, per_query)


def test_a_published_study_summarises_from_its_json_alone(study, tmp_path):
    # The committed layout keeps no .npz: the intervals must come out the same from the JSON's per-class scores.
    runs = tmp_path / "runs"
    runs.mkdir()
    write_study(study, runs, {0: {"K1": 0.5, "K4": 0.6}, 1: {"K1": 0.5, "K4": 0.55}})
    from_npz = study.summarize(runs, with_plot=False)
    published = tmp_path / "published"
    study.publish(runs, published, with_plot=False)
    assert not list((published / "per_run").glob("*.npz"))
    record = json.loads((published / "per_run" / "K4-unseen-seed0.json").read_text())
    assert set(record["per_class"]) == {"unseen_vendor"}  # only the rows its setting is summarised on
    again = study.summarize(published, with_plot=False)
    assert summary_numbers(again) == summary_numbers(from_npz)
    assert summary_numbers(again)  # (not two empty summaries)
    assert again["variants"]["K4"]["unseen_vendor"]["minus_zero_shot"]["recall@1"]["interval"] == "seeds and classes"
    assert (published / "summary.md").exists()
    # Publishing again changes nothing; a different result under a published name is refused.
    before = (published / "per_run" / "K4-unseen-seed0.json").read_bytes()
    study.publish(runs, published, with_plot=False)
    assert (published / "per_run" / "K4-unseen-seed0.json").read_bytes() == before
    rng = np.random.default_rng(9)
    save_run(study, runs, "K4", "unseen", 0, scores(rng, 40, 0.9))
    with pytest.raises(ValueError, match="K4-unseen-seed0.json holds another result"):
        study.publish(runs, published, with_plot=False)
    assert (published / "per_run" / "K4-unseen-seed0.json").read_bytes() == before


def test_runs_without_per_class_scores_get_an_interval_over_seeds_alone(study, tmp_path):
    # Runs published before per-class scores were kept: JSON with means only.
    write_study(study, tmp_path, {0: {"K1": 0.5, "K4": 0.6}, 1: {"K1": 0.5, "K4": 0.55}, 2: {"K1": 0.4, "K4": 0.5}})
    for path in tmp_path.glob("*.npz"):
        path.unlink()
    for path in tmp_path.glob("K*-seed[01].json"):  # seed 2 keeps its scores: one old seed is enough to fall back
        record = json.loads(path.read_text())
        del record["per_class"]
        path.write_text(json.dumps(record))
    summary = study.summarize(tmp_path, with_plot=False)
    difference = summary["variants"]["K4"]["unseen_vendor"]["minus_reference"]["recall@1"]
    assert difference["interval"] == "seeds"
    records = {s: {v: json.loads((tmp_path / f"{v}-unseen-seed{s}.json").read_text()) for v in ("K1", "K4")} for s in range(3)}
    per_seed = [records[s]["K4"]["test"]["unseen_vendor"]["recall@1"] - records[s]["K1"]["test"]["unseen_vendor"]["recall@1"]
                for s in range(3)]
    assert difference["per_seed"] == pytest.approx(per_seed)
    half = 4.302652729911275 * np.std(per_seed, ddof=1) / np.sqrt(3)  # Student t, 2 degrees of freedom, 97.5%
    assert (difference["low"], difference["high"]) == pytest.approx((np.mean(per_seed) - half, np.mean(per_seed) + half))
    text = (tmp_path / "summary.md").read_text()
    assert f"]{study.SEEDS_ONLY_MARK} |" in text and "an interval over seeds alone" in text
    # Zero-shot kept its scores, but the K4 runs of seeds 0-1 did not: the comparison falls back too.
    assert summary["variants"]["K4"]["unseen_vendor"]["minus_zero_shot"]["map@r"]["interval"] == "seeds"


def test_a_single_seed_without_per_class_scores_has_no_interval(study, tmp_path):
    result = study.seeds_only_interval([0.05])
    assert result["low"] is None and result["high"] is None and result["difference"] == pytest.approx(0.05)
    assert study._cell(result) == "+5.00 (one seed, no interval)"


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
    measured = load_config("emoji", study.VARIANTS["K4-drawing-style-blocks12"]).to_dict()
    assert preset == measured
    assert preset != load_config("emoji").to_dict()


def test_runs_are_kept_to_their_threads_and_idle_threads_sleep(study):
    environ = {"OMP_NUM_THREADS": "3"}  # the user's own setting wins
    study.limit_threads(1, environ)
    assert environ == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

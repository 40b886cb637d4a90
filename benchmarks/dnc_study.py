"""Where divide and conquer helps: variants against the single metric (K = 1) on emoji, paired by seed.

    python benchmarks/dnc_study.py                                  # the CPU grid (see CPU_GRID), seeds 0-4
    python benchmarks/dnc_study.py --variants K1 K4 --seeds 0 1 --jobs 2
    python benchmarks/dnc_study.py --summarize                      # tables + plot from the runs already done

Every variant trains with the emoji preset (the demo's budget: 20 epochs x 80 batches of 20
classes x 3 images, epoch selected on the validation classes) and differs only in its settings
(VARIANTS). Each (variant, seed) trains twice:

- ``all``: on every vendor; tested on the test classes cross-vendor and leave-one-out;
- ``unseen``: without one vendor's images (``data.held_out_group``; train *and* validation, so the
  selected epoch never saw that vendor either); tested with that vendor's test images querying the
  other vendors' test images. The held-out vendor rotates with the seed (seed s holds out
  VENDORS[s % 3]), so five seeds cover every vendor at least once.

The zero-shot row (pretrained features, no training) is evaluated once per protocol and vendor.

Each variant is compared with K = 1 *of the same seed* (same seed, same held-out vendor): the
difference of the means of per-query scores (hit@1, AP@R). The 95% interval is a two-level
percentile bootstrap: seeds are resampled with replacement, and within each drawn seed the test
classes are resampled (a class's queries move together, the same draw for both models). It covers
both the training seed's luck and the test classes'; with five seeds it is still coarse.

Runs are stored one file per run under ``--out`` (JSON + per-query scores); a run already there is
not trained again, so an interrupted study resumes, and ``--jobs`` workers (or several processes
with disjoint ``--seeds``) share the folder. ``--summarize`` writes ``summary.json``,
``summary.md`` and ``study.png`` there.

Each run's JSON also keeps what the intervals need of its per-query scores: per test class, the
number of queries and the sum of each metric (``per_class``). ``--publish DIR`` copies the runs to
``DIR/per_run/`` (the layout under ``benchmarks/results/``) and summarises them there, so a committed
study can be summarised again from a fresh clone, with new runs added to it. Runs published before
``per_class`` existed have only their means: a comparison that involves one of them gets an interval
over seeds alone (Student t on the per-seed differences), marked as such.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

#: Settings of each variant, on top of the emoji preset. "K1" is the reference every other is compared with.
#: Section 2's recipe: the drawing augmentation through 4 cached augmented views per image (the
#: frozen units then run 5 times per image in all, not once per step: a CPU can afford it), and a
#: fresh feature pass for re-clustering (augmented training features are not test-time ones).
AUGMENTED = ["data.train_augmentation=drawing", "data.cache_frozen_features=true", "data.augmented_views=4",
             "clustering.reuse_training_features=false"]
AUGMENTED_SUFFIX = "-drawing-aug"
#: The same with the style steps too (flat colours, traced outlines, greyscale: dcml.data.augment).
STYLE_AUGMENTED = ["data.train_augmentation=drawing_style", *AUGMENTED[1:]]
STYLE_SUFFIX = "-drawing-style"
#: One strong pytorch-metric-learning loss as the per-learner loss (its own miner, PML's defaults).
MULTI_SIMILARITY = ["loss.name=pml", "loss.settings.loss_name=MultiSimilarityLoss",
                    "loss.settings.miner_name=MultiSimilarityMiner"]
VARIANTS: dict[str, list[str]] = {
    "K1": ["clustering.learners=1"],
    "K2": ["clustering.learners=2"],
    "K4": ["clustering.learners=4"],
    "K8": ["clustering.learners=8"],
    "K4-masks": ["clustering.learners=4", "model.learner_head=masks"],
    "K4-hierarchical": ["clustering.learners=4", "clustering.hierarchical=true"],
    "K4-class": ["clustering.learners=4", "clustering.unit=class"],
    "K4-embedding-space": ["clustering.learners=4", "clustering.space=embedding"],
    "K4-fresh-pass": ["clustering.learners=4", "clustering.reuse_training_features=false"],
    "K1-d512": ["clustering.learners=1", "model.embedding_dim=512"],
    "K4-d512": ["clustering.learners=4", "model.embedding_dim=512"],
    "K1-triplet": ["clustering.learners=1", "loss.name=triplet"],
    "K4-triplet": ["clustering.learners=4", "loss.name=triplet"],
    "K1-multisimilarity": ["clustering.learners=1", *MULTI_SIMILARITY],
    "K4-multisimilarity": ["clustering.learners=4", *MULTI_SIMILARITY],
    f"K1{AUGMENTED_SUFFIX}": ["clustering.learners=1", *AUGMENTED],
    f"K4{AUGMENTED_SUFFIX}": ["clustering.learners=4", *AUGMENTED],
    f"K1{STYLE_SUFFIX}": ["clustering.learners=1", *STYLE_AUGMENTED],
    f"K4{STYLE_SUFFIX}": ["clustering.learners=4", *STYLE_AUGMENTED],
    # Section 2's next steps on the style recipe: more trained units (stage 5 too), a longer schedule
    # (the selected epoch was among the last three of 20 in every style run; conquer at the same 70%).
    f"K1{STYLE_SUFFIX}-blocks9": ["clustering.learners=1", *STYLE_AUGMENTED, "model.trainable_blocks=9"],
    f"K4{STYLE_SUFFIX}-blocks9": ["clustering.learners=4", *STYLE_AUGMENTED, "model.trainable_blocks=9"],
    f"K4{STYLE_SUFFIX}-epochs30": ["clustering.learners=4", *STYLE_AUGMENTED, "schedule.epochs=30",
                                   "schedule.conquer_epoch=21"],
    # Trained units went 1 -> 2 -> 6 -> 9 with unseen-vendor R@1 rising at each step: stage 4 too.
    f"K1{STYLE_SUFFIX}-blocks12": ["clustering.learners=1", *STYLE_AUGMENTED, "model.trainable_blocks=12"],
    f"K4{STYLE_SUFFIX}-blocks12": ["clustering.learners=4", *STYLE_AUGMENTED, "model.trainable_blocks=12"],
    # The number of learners on the final recipe (its K = 1 and K = 4 are the two above).
    f"K2{STYLE_SUFFIX}-blocks12": ["clustering.learners=2", *STYLE_AUGMENTED, "model.trainable_blocks=12"],
    f"K8{STYLE_SUFFIX}-blocks12": ["clustering.learners=8", *STYLE_AUGMENTED, "model.trainable_blocks=12"],
}
#: Besides K = 1: a variant against the one it changes one thing of (paired by seed as well).
SAME_K_OTHER_RECIPE = {
    f"K1{STYLE_SUFFIX}": f"K1{AUGMENTED_SUFFIX}",
    f"K4{STYLE_SUFFIX}": f"K4{AUGMENTED_SUFFIX}",
    f"K1{STYLE_SUFFIX}-blocks9": f"K1{STYLE_SUFFIX}",
    f"K4{STYLE_SUFFIX}-blocks9": f"K4{STYLE_SUFFIX}",
    f"K4{STYLE_SUFFIX}-epochs30": f"K4{STYLE_SUFFIX}",
    f"K1{STYLE_SUFFIX}-blocks12": f"K1{STYLE_SUFFIX}-blocks9",
    f"K4{STYLE_SUFFIX}-blocks12": f"K4{STYLE_SUFFIX}-blocks9",
}
#: What two CPU cores can run in about an hour (documented in the README with its results).
CPU_GRID = ("K1", "K4", f"K1{AUGMENTED_SUFFIX}", f"K4{AUGMENTED_SUFFIX}", "K2", "K8")
REFERENCE = "K1"
SETTINGS = ("all", "unseen")
VENDORS = ("google", "twitter", "openmoji")
PROTOCOLS = {"cross_vendor": "all", "leave_one_out": "all", "unseen_vendor": "unseen"}  # row -> setting it comes from
METRICS = ("recall@1", "map@r")
#: Issue 13's target: trained models beat zero-shot by this much unseen-vendor Recall@1.
UNSEEN_TARGET_OVER_ZERO_SHOT = 0.10
LEVEL = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def held_out_vendor(seed: int) -> str:
    return VENDORS[seed % len(VENDORS)]


def run_name(variant: str, setting: str, seed: int) -> str:
    return f"{variant}-{setting}-seed{seed}"


def run_overrides(variant: str, setting: str, seed: int, extra: list[str]) -> list[str]:
    overrides = [*extra, *VARIANTS[variant], f"seed={seed}"]
    if setting == "unseen":
        overrides.append(f"data.held_out_group={held_out_vendor(seed)}")
    return overrides


def _scores_of(embeddings, split, unseen_group):
    from dcml.evaluation.paired import protocol_query_scores
    from dcml.model_runner import l2_normalize

    scores = protocol_query_scores(l2_normalize(embeddings), split.labels, split.groups, unseen_group=unseen_group)
    return {f"{row}/{key}": value for row, s in scores.items()
            for key, value in (("rows", s.rows), ("classes", s.classes), *((m, s.scores[m]) for m in METRICS))}


def _validation_unseen(trainer, config, dataset, space: str = "embedding") -> dict | None:
    """The unseen-vendor protocol on the *validation* classes: the held-out vendor's validation images
    query the other vendors' validation images (R@1, MAP@R). Training and epoch selection never saw
    these images; unlike the test classes they may choose between recipes (section 2's honest
    selection: validation classes only, never the test images)."""
    if dataset.evaluation.unseen_group is None:
        return None
    import dataclasses

    from dcml.training.trainer import prepare_dataset

    every_vendor = prepare_dataset(dataclasses.replace(config, data=dataclasses.replace(config.data, held_out_group=None)))
    val = every_vendor.split("val")
    scores = _scores_of(trainer.embed(val, space=space), val, dataset.evaluation.unseen_group)
    return {metric: float(scores[f"unseen_vendor/{metric}"].mean()) for metric in METRICS}


#: One worker process's cached frozen-unit outputs, shared by the runs it trains (keyed by the images).
_SHARED_INPUTS: dict = {}


def train_one(job: tuple) -> str:
    """Train one (variant, setting, seed), store its metrics and per-query test scores; returns its name."""
    variant, setting, seed, extra, out, threads = job
    import torch

    torch.set_num_threads(threads)
    from dcml.config import load_config
    from dcml.training.trainer import Trainer, prepare_dataset

    name = run_name(variant, setting, seed)
    config = load_config("emoji", run_overrides(variant, setting, seed, extra))
    dataset = prepare_dataset(config)
    start = time.perf_counter()
    # One line per epoch, named, so that an hour-long run shows where it is (runs share one log).
    trainer = Trainer(config, None, progress=False, echo=lambda line: print(f"{name}: {line}", flush=True),
                      dataset=dataset, shared_inputs=_SHARED_INPUTS)
    result = trainer.fit()
    test = dataset.split(dataset.evaluation.splits[0])
    scores = _scores_of(trainer.embed(test), test, dataset.evaluation.unseen_group)
    validation = _validation_unseen(trainer, config, dataset)
    record = {
        "variant": variant, "setting": setting, "seed": seed, "overrides": run_overrides(variant, setting, seed, extra),
        "held_out_vendor": held_out_vendor(seed) if setting == "unseen" else None,
        "test": result["test"], "selected_epoch": result["selected_epoch"], "val_score": result["selection_score"],
        "history": [{"epoch": r["epoch"], "images": r["images"], "score": r.get("score"), "phase": r.get("phase")}
                    for r in trainer.history],
        "seconds": time.perf_counter() - start, "threads": threads,
        **({"validation_unseen": validation} if validation is not None else {}),
    }
    _save(out, name, record, scores)
    return name


def zero_shot(out: Path, extra: list[str]) -> None:
    """The pretrained backbone's features, for every protocol and held-out vendor (no training)."""
    from dcml.config import load_config
    from dcml.training.trainer import Trainer, prepare_dataset

    for setting, vendor in [("all", None), *(("unseen", v) for v in VENDORS)]:
        name = f"zero-shot-{setting}" + (f"-{vendor}" if vendor else "")
        if (out / f"{name}.json").exists():
            continue
        config = load_config("emoji", [*extra, *([f"data.held_out_group={vendor}"] if vendor else [])])
        dataset = prepare_dataset(config)
        trainer = Trainer(config, None, progress=False, echo=lambda _: None, dataset=dataset, shared_inputs=_SHARED_INPUTS)
        test = dataset.split(dataset.evaluation.splits[0])
        rows = trainer.evaluate(None, with_nmi=False, space="backbone")
        scores = _scores_of(trainer.embed(test, space="backbone"), test, dataset.evaluation.unseen_group)
        validation = _validation_unseen(trainer, config, dataset, space="backbone")
        _save(out, name, {"variant": "zero-shot", "setting": setting, "held_out_vendor": vendor, "test": rows,
                          **({"validation_unseen": validation} if validation is not None else {})}, scores)


def rows_of(setting: str) -> list[str]:
    """The protocol rows a run of this setting is summarised on."""
    return [row for row, st in PROTOCOLS.items() if st == setting]


def per_class_scores(scores: dict, rows) -> dict:
    """What the summary needs of per-query scores, small enough to keep in the run's JSON: per test
    class (sorted), its number of queries and the sum of each metric over them, for each row."""
    kept = {}
    for row in rows:
        if f"{row}/classes" not in scores:
            continue
        names, inverse = np.unique(scores[f"{row}/classes"], return_inverse=True)
        kept[row] = {"classes": names.tolist(), "queries": np.bincount(inverse).tolist(),
                     **{m: np.bincount(inverse, weights=scores[f"{row}/{m}"], minlength=len(names)).tolist()
                        for m in METRICS}}
    return kept


def _save(out: Path, name: str, record: dict, scores: dict) -> None:
    from dcml.atomic_files import json_text, write_atomically

    def npz(stream):
        np.savez(stream, **scores)

    record = {**record, "per_class": per_class_scores(scores, rows_of(record["setting"]))}
    text = json_text(record, indent=1).encode()
    # The scores first: a run counts as done when its JSON exists.
    write_atomically({out / f"{name}.npz": npz})
    write_atomically({out / f"{name}.json": lambda s: s.write(text)})


# ---------------------------------------------------------------------------- the summary
def runs_folder(out: Path) -> Path:
    """Where a study's run files are: ``out/per_run`` in a published study, else ``out`` itself."""
    return out / "per_run" if (out / "per_run").is_dir() else out


def _load(runs: Path, name: str) -> tuple[dict, dict | None]:
    """A run's record and its per-class scores: from the JSON, else from the per-query .npz beside
    it, else None (a run published before per-class scores were kept)."""
    record = json.loads((runs / f"{name}.json").read_text())
    per_class = record.get("per_class")
    if per_class is None and (runs / f"{name}.npz").exists():
        with np.load(runs / f"{name}.npz", allow_pickle=False) as data:
            per_class = per_class_scores({key: data[key] for key in data.files}, rows_of(record["setting"]))
    return record, per_class


def _per_class(per_class: dict, row: str, metric: str):
    """Per test class: (class, sum of the metric over its queries, number of queries), classes sorted."""
    kept = per_class[row]
    return (np.asarray(kept["classes"]), np.asarray(kept[metric], dtype=np.float64),
            np.asarray(kept["queries"], dtype=np.float64))


def seeds_only_interval(differences) -> dict:
    """mean of per-seed differences with a Student-t interval over seeds; no test-class level. For
    comparisons with a run whose per-class scores were not kept (one seed: no interval)."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    low = high = None
    if len(d) > 1:
        half = stats.t.ppf((1 + LEVEL) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        low, high = float(d.mean() - half), float(d.mean() + half)
    return {"difference": float(d.mean()), "low": low, "high": high, "per_seed": d.tolist(), "seeds": len(d),
            "interval": "seeds"}


def paired_difference(runs: list[tuple[tuple[dict, dict | None], tuple[dict, dict | None]]], row: str, metric: str,
                      rng) -> dict:
    """A minus B paired by seed, from ``((record_a, per_class_a), (record_b, per_class_b))`` per seed:
    the two-level bootstrap where every run kept its per-class scores, else an interval over seeds."""
    if all(a[1] is not None and b[1] is not None for a, b in runs):
        return paired_seed_bootstrap([(a[1], b[1]) for a, b in runs], row, metric, rng)
    return seeds_only_interval([a[0]["test"][row][metric] - b[0]["test"][row][metric] for a, b in runs])


def paired_seed_bootstrap(pairs: list[tuple[dict, dict]], row: str, metric: str, rng) -> dict:
    """mean over seeds of mean(A) - mean(B), and its two-level bootstrap interval (seeds, then classes),
    from each run's per-class scores (``per_class_scores``)."""
    per_seed = []
    for a, b in pairs:
        names_a, sum_a, count_a = _per_class(a, row, metric)
        names_b, sum_b, count_b = _per_class(b, row, metric)
        if not (np.array_equal(names_a, names_b) and np.array_equal(count_a, count_b)):
            raise ValueError(f"{row}: the two runs scored different queries")
        per_seed.append((sum_a, sum_b, count_a))
    differences = np.array([s_a.sum() / n.sum() - s_b.sum() / n.sum() for s_a, s_b, n in per_seed])
    draws = np.empty(RESAMPLES)
    seed_draws = rng.integers(0, len(per_seed), size=(RESAMPLES, len(per_seed)))
    for b in range(RESAMPLES):
        total = 0.0
        for s in seed_draws[b]:
            s_a, s_b, n = per_seed[s]
            idx = rng.integers(0, len(n), size=len(n))
            total += (s_a[idx].sum() - s_b[idx].sum()) / n[idx].sum()
        draws[b] = total / len(per_seed)
    low, high = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"difference": float(differences.mean()), "low": float(low), "high": float(high),
            "per_seed": differences.tolist(), "seeds": len(per_seed), "interval": "seeds and classes"}


def comparison_rng(*names: str) -> np.random.Generator:
    """The bootstrap's random stream for one comparison, named e.g. ("K4", "K1", "unseen_vendor", "recall@1").

    Each comparison draws from its own stream, so that its interval does not move when other variants
    or runs are added to the study (one shared stream would hand every later comparison other draws).
    """
    key = zlib.crc32("\x1f".join(names).encode())  # stable across processes, unlike hash()
    return np.random.default_rng([BOOTSTRAP_SEED, key])


def _mean_sd(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(out: Path, with_plot: bool = True) -> dict:
    """Tables, intervals and plot of the runs in ``out`` (or ``out/per_run``), written to ``out``."""
    runs_dir = runs_folder(out)
    done = {}
    for path in runs_dir.glob("*.json"):
        stem = path.stem
        if stem == "summary" or stem.startswith("zero-shot"):
            continue
        record = json.loads(path.read_text())
        done[(record["variant"], record["setting"], record["seed"])] = stem
    variants = [v for v in VARIANTS if any(key[0] == v for key in done)]
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = _load(runs_dir, name)
        return cache[name]

    summary: dict = {"level": LEVEL, "resamples": RESAMPLES, "variants": {}, "reference": REFERENCE,
                     "held_out_vendor_rule": "seed s holds out VENDORS[s % 3] = " + ", ".join(VENDORS)}
    # One setting for every variant's convergence curve, so that the curves are comparable.
    convergence_setting = next((st for st in SETTINGS if all(any(v == variant and s_ == st for (v, s_, _) in done)
                                                            for variant in variants)), None)
    for variant in variants:
        entry: dict = {}
        for row, setting in PROTOCOLS.items():
            seeds = sorted(s for (v, st, s) in done if v == variant and st == setting)
            if not seeds:
                continue
            metrics = {m: _mean_sd([get(done[(variant, setting, s)])[0]["test"][row][m] for s in seeds]) for m in METRICS}
            item = {"seeds": seeds, "absolute": metrics}
            def minus(other: str) -> dict | None:
                """This variant minus ``other`` on the seeds both ran (None: no common seed)."""
                common = [s for s in seeds if (other, setting, s) in done]
                if other == variant or not common:
                    return None
                runs = [(get(done[(variant, setting, s)]), get(done[(other, setting, s)])) for s in common]
                return {m: paired_difference(runs, row, m, comparison_rng(variant, other, row, m)) for m in METRICS}

            if (difference := minus(REFERENCE)) is not None:
                item["minus_reference"] = difference
            # D&C against K = 1 trained the same way (e.g. both with the augmentation).
            same_recipe = REFERENCE + variant[len(variant.split("-")[0]):]  # "K4-drawing-aug" -> "K1-drawing-aug"
            if same_recipe != REFERENCE and (difference := minus(same_recipe)) is not None:
                item["minus_same_recipe_k1"] = {"reference": same_recipe, **difference}
            other = SAME_K_OTHER_RECIPE.get(variant)
            if other is not None and (difference := minus(other)) is not None:
                item["minus_other_recipe"] = {"reference": other, **difference}
            zero_names = [f"zero-shot-all" if setting == "all" else f"zero-shot-unseen-{held_out_vendor(s)}" for s in seeds]
            if all((runs_dir / f"{z}.json").exists() for z in zero_names):
                runs = [(get(done[(variant, setting, s)]), get(z)) for s, z in zip(seeds, zero_names)]
                item["minus_zero_shot"] = {m: paired_difference(runs, row, m, comparison_rng(variant, "zero-shot", row, m))
                                           for m in METRICS}
            if setting == "unseen":
                validation = [get(done[(variant, setting, s)])[0].get("validation_unseen") for s in seeds]
                if all(validation):  # runs from before this score was recorded have none
                    item["validation_unseen"] = {m: _mean_sd([v[m] for v in validation]) for m in METRICS}
                item["by_vendor"] = {v: _mean_sd([get(done[(variant, setting, s)])[0]["test"][row]["recall@1"]
                                                  for s in seeds if held_out_vendor(s) == v])
                                     for v in VENDORS if any(held_out_vendor(s) == v for s in seeds)}
            entry[row] = item
        runs = [get(name)[0] for (v, _, _), name in sorted(done.items()) if v == variant]
        entry["seconds_per_run"] = float(np.mean([r["seconds"] for r in runs]))
        entry["threads_per_run"] = sorted({r.get("threads") for r in runs}, key=str)
        # The convergence curves come from the all-vendor runs; a study without them (the CPU's reduced
        # grid) uses the unseen-vendor runs, whose validation classes lack the held-out vendor.
        # Only seeds the reference has too, so that K1's and a variant's curves average the same seeds.
        for setting in ([convergence_setting] if convergence_setting else SETTINGS):
            # (A study without the reference, e.g. two recipes of one K, takes each variant's own seeds.)
            with_reference = any(v == REFERENCE and st == setting for (v, st, _) in done)
            seeds = sorted(s for (v, st, s) in done if v == variant and st == setting
                           and ((REFERENCE, setting, s) in done or not with_reference))
            records = [get(done[(variant, setting, s)])[0] for s in seeds]
            if records:
                entry["convergence"] = {"setting": setting, "seeds": seeds, **_convergence(records)}
                break
        summary["variants"][variant] = entry
    summary["zero_shot"] = {}
    for row, setting in PROTOCOLS.items():
        names = ["zero-shot-all"] if setting == "all" else [f"zero-shot-unseen-{v}" for v in VENDORS]
        values = {n: get(n)[0]["test"][row]["recall@1"] for n in names if (runs_dir / f"{n}.json").exists()}
        if values:
            summary["zero_shot"][row] = values
    validation = {v: get(f"zero-shot-unseen-{v}")[0].get("validation_unseen") for v in VENDORS
                  if (runs_dir / f"zero-shot-unseen-{v}.json").exists()}
    if validation and all(validation.values()):
        summary["zero_shot"]["validation_unseen"] = {v: s["recall@1"] for v, s in validation.items()}
    from dcml.atomic_files import json_text, write_atomically

    markdown = summary_markdown(summary).encode()
    text = json_text(summary, indent=1).encode()
    write_atomically({out / "summary.json": lambda s: s.write(text), out / "summary.md": lambda s: s.write(markdown)})
    if with_plot:  # matplotlib is most of a summary's time
        plot(summary, out / "study.png")
    print(markdown.decode())
    return summary


def _convergence(records: list[dict]) -> dict:
    """Validation Recall@1 (cross-vendor) after each epoch against training images seen, mean over seeds."""
    epochs = min(len(r["history"]) for r in records)
    images = np.cumsum([records[0]["history"][e]["images"] for e in range(epochs)])
    scores = np.array([[r["history"][e]["score"] for e in range(epochs)] for r in records], dtype=np.float64)
    return {"images": images.tolist(), "mean": scores.mean(0).tolist(), "sd": scores.std(0).tolist()}


#: Marks an interval over seeds alone (some run's per-class scores were not kept).
SEEDS_ONLY_MARK = "†"


def _cell(d: dict) -> str:
    if d["low"] is None:
        return f"{100 * d['difference']:+.2f} (one seed, no interval)"
    mark = SEEDS_ONLY_MARK if d.get("interval") == "seeds" else ""
    return f"{100 * d['difference']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]{mark}"


def _any_seeds_only(node) -> bool:
    """Whether any comparison in (part of) a summary has an interval over seeds alone."""
    if isinstance(node, dict):
        return node.get("interval") == "seeds" or any(_any_seeds_only(v) for v in node.values())
    return isinstance(node, list) and any(_any_seeds_only(v) for v in node)


def summary_markdown(summary: dict) -> str:
    lines = [f"Emoji test classes, Recall@1 in % (mean ± sd over seeds), and the difference from {REFERENCE} of the "
             f"same seed with a {100 * summary['level']:.0f}% two-level bootstrap interval (seeds, then test classes). "
             f"Unseen vendor: {summary['held_out_vendor_rule']}.", ""]
    header = ["variant", "seeds"]
    for row in PROTOCOLS:
        header += [f"{row} R@1", f"minus {REFERENCE}"]
    header += ["unseen minus zero-shot", "s/run (all runs)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|---:|" + "---:|" * (len(header) - 2))
    for variant, entry in summary["variants"].items():
        seeds = sorted({s for row in PROTOCOLS if row in entry for s in entry[row]["seeds"]})
        cells = [variant, str(len(seeds))]
        for row in PROTOCOLS:
            item = entry.get(row)
            if item is None:
                cells += ["-", "-"]
                continue
            a = item["absolute"]["recall@1"]
            cells.append(f"{100 * a['mean']:.2f} ± {100 * a['sd']:.2f}")
            cells.append(_cell(item["minus_reference"]["recall@1"]) if "minus_reference" in item else "-")
        unseen = entry.get("unseen_vendor", {})
        cells.append(_cell(unseen["minus_zero_shot"]["recall@1"]) if "minus_zero_shot" in unseen else "-")
        cells.append(f"{entry.get('seconds_per_run', float('nan')):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if _any_seeds_only(summary):
        lines.append(f"{SEEDS_ONLY_MARK} an interval over seeds alone: a Student-t interval on the per-seed differences of "
                     "the runs' means, used where a run's per-class scores were not kept (runs published before they "
                     "were), so test classes could not be resampled. It leaves out the test-class uncertainty the other "
                     "intervals include.")
        lines.append("")
    lines.append("MAP@R, difference from the reference:")
    lines.append("")
    for variant, entry in summary["variants"].items():
        parts = [f"{row} {_cell(entry[row]['minus_reference']['map@r'])}" for row in PROTOCOLS
                 if row in entry and "minus_reference" in entry[row]]
        if parts:
            lines.append(f"- {variant}: " + "; ".join(parts))
    lines.append("")
    for variant, entry in summary["variants"].items():
        parts = [f"{row} {_cell(entry[row]['minus_same_recipe_k1']['recall@1'])}" for row in PROTOCOLS
                 if "minus_same_recipe_k1" in entry.get(row, {})]
        if parts:
            reference = next(entry[row]["minus_same_recipe_k1"]["reference"] for row in PROTOCOLS if "minus_same_recipe_k1" in entry.get(row, {}))
            lines.append(f"- {variant} minus {reference}, R@1: " + "; ".join(parts))
    for variant, entry in summary["variants"].items():
        for metric in METRICS:
            parts = [f"{row} {_cell(entry[row]['minus_other_recipe'][metric])}" for row in PROTOCOLS
                     if "minus_other_recipe" in entry.get(row, {})]
            if parts:
                reference = next(entry[row]["minus_other_recipe"]["reference"] for row in PROTOCOLS if "minus_other_recipe" in entry.get(row, {}))
                lines.append(f"- {variant} minus {reference}, {metric}: " + "; ".join(parts))
    lines.append("")
    for row, values in summary["zero_shot"].items():
        lines.append(f"- zero-shot {row} R@1: " + ", ".join(f"{k.replace('zero-shot-', '')} {100 * v:.2f}" for k, v in values.items()))
    for variant, entry in summary["variants"].items():
        if "validation_unseen" in entry.get("unseen_vendor", {}):
            v = entry["unseen_vendor"]["validation_unseen"]["recall@1"]
            lines.append(f"- {variant} unseen-vendor R@1 on the validation classes (what recipes are chosen on): "
                         f"{100 * v['mean']:.2f} ± {100 * v['sd']:.2f} (n={v['n']})")
    for variant, entry in summary["variants"].items():
        if "by_vendor" in entry.get("unseen_vendor", {}):
            lines.append(f"- {variant} unseen-vendor R@1 by held-out vendor: " + ", ".join(
                f"{v} {100 * s['mean']:.2f} (n={s['n']})" for v, s in entry["unseen_vendor"]["by_vendor"].items()))
    return "\n".join(lines) + "\n"


#: Convergence curves of one recipe: line style and marker per number of learners.
CURVE_STYLE_BY_K = {"K1": ("--", "."), "K2": ("-.", "^"), "K4": ("-", "o"), "K8": (":", "s")}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcml.atomic_files import write_atomically

    # One line per comparison: each variant against K1, and a recipe's D&C against its own K = 1
    # (e.g. K4-drawing-aug against K1-drawing-aug), the comparison that isolates divide and conquer.
    comparisons = []
    for variant, entry in summary["variants"].items():
        if variant == REFERENCE:
            continue
        if any("minus_reference" in entry.get(row, {}) for row in PROTOCOLS):
            comparisons.append((f"{variant} − {REFERENCE}", {row: entry.get(row, {}).get("minus_reference") for row in PROTOCOLS}))
        recipe = {row: entry[row]["minus_same_recipe_k1"] for row in PROTOCOLS if "minus_same_recipe_k1" in entry.get(row, {})}
        if recipe:
            reference = next(iter(recipe.values()))["reference"]
            comparisons.append((f"{variant} − {reference}", recipe))
        other = {row: entry[row]["minus_other_recipe"] for row in PROTOCOLS if "minus_other_recipe" in entry.get(row, {})}
        if other:
            comparisons.append((f"{variant} − {next(iter(other.values()))['reference']}", other))
        if "minus_zero_shot" in entry.get("unseen_vendor", {}):
            comparisons.append((f"{variant} − zero-shot", {"unseen_vendor": entry["unseen_vendor"]["minus_zero_shot"]}))
    figure, (forest, curves) = plt.subplots(1, 2, figsize=(13, 0.5 * max(len(comparisons), 4) + 2.5), dpi=110)
    colours = dict(zip(PROTOCOLS, ("tab:blue", "tab:orange", "tab:green")))
    labelled: set = set()
    for i, (_, differences) in enumerate(comparisons):
        for j, row in enumerate(PROTOCOLS):
            d = (differences.get(row) or {}).get("recall@1")
            if d is None:
                continue
            y = i + (j - 1) * 0.22
            xerr = None if d["low"] is None else [[100 * (d["difference"] - d["low"])], [100 * (d["high"] - d["difference"])]]
            # Hollow: an interval over seeds alone (see SEEDS_ONLY_MARK).
            forest.errorbar(100 * d["difference"], y, xerr=xerr, fmt="o", color=colours[row], capsize=3,
                            mfc="white" if d.get("interval") == "seeds" else colours[row],
                            label=None if row in labelled else row)
            labelled.add(row)
    forest.axvline(0, color="grey", linestyle="--")
    if any(label.endswith("zero-shot") for label, _ in comparisons):
        # Section 2's target for the unseen-vendor protocol.
        forest.axvline(100 * UNSEEN_TARGET_OVER_ZERO_SHOT, color="tab:red", linestyle=":", label="target over zero-shot")
    forest.set_yticks(range(len(comparisons)), [label for label, _ in comparisons], fontsize=8)
    forest.invert_yaxis()
    forest.set_xlabel(f"Recall@1 difference, paired by seed (points, {100 * summary['level']:.0f}% interval; "
                      "hollow: over seeds alone)")
    forest.legend(loc="best", fontsize=8)
    forest.grid(True, axis="x", alpha=0.3)
    # The paper's convergence claim compares D&C with K = 1 trained the same way: one colour per recipe
    # that has both, one line style and marker per K (K = 1 dashed, K = 4 solid).
    recipes: dict[str, dict[str, str]] = {}
    for variant in summary["variants"]:
        k, _, recipe = variant.partition("-")
        recipes.setdefault(recipe, {})[k] = variant
    recipe_colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for recipe, by_k in recipes.items():
        curves_of = {k: summary["variants"][v].get("convergence") for k, v in by_k.items()}
        curves_of = {k: c for k, c in curves_of.items() if c}
        if REFERENCE not in curves_of or len(curves_of) < 2:
            continue
        colour = next(recipe_colours)
        for k, c in sorted(curves_of.items(), key=lambda item: int(item[0][1:]) if item[0][1:].isdigit() else 0):
            images = np.array(c["images"]) / 1000
            mean, sd = 100 * np.array(c["mean"]), 100 * np.array(c["sd"])
            linestyle, marker = CURVE_STYLE_BY_K.get(k, ("-", "."))
            curves.plot(images, mean, marker=marker, markersize=4, color=colour, linestyle=linestyle,
                        label=f"{by_k[k]} ({len(c['seeds'])} seed{'s' if len(c['seeds']) != 1 else ''})")
            curves.fill_between(images, mean - sd, mean + sd, color=colour, alpha=0.08)
    settings = sorted({entry["convergence"]["setting"] for entry in summary["variants"].values() if "convergence" in entry})
    curves.set_title("convergence: " + " + ".join({"all": "runs on every vendor", "unseen": "runs without the held-out vendor"}[s]
                                                  for s in settings), fontsize=9)
    curves.set_xlabel("training images seen (thousands)")
    curves.set_ylabel("validation cross-vendor Recall@1 (%), mean ± sd over seeds")
    curves.grid(True, alpha=0.3)
    if curves.lines:
        curves.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    import io as _io

    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomically({path: lambda s: s.write(buffer.getvalue())})


def publish(out: Path, destination: Path, with_plot: bool = True) -> dict:
    """Copy the runs in ``out`` to ``destination/per_run`` as JSON alone, per-class scores inside (the
    layout committed under benchmarks/results/), then summarise everything there.

    A run already published is replaced only by the same run with more kept (its per-class scores);
    one whose test metrics differ is refused, naming it: another machine's re-run of a published run
    is another result, not a copy.
    """
    from dcml.atomic_files import json_text, write_atomically

    source = runs_folder(out)
    if not source.is_dir():
        raise ValueError(f"no study runs in {out}")
    runs = destination / "per_run"
    runs.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.json")):
        if path.stem == "summary":
            continue
        record, per_class = _load(source, path.stem)
        if per_class is None:
            raise ValueError(f"{path} has neither per-class scores nor its .npz: nothing to publish the intervals from")
        record = {**record, "per_class": per_class}
        target = runs / path.name
        if target.exists():
            published = json.loads(target.read_text())
            if published.get("test") != record["test"]:
                raise ValueError(f"{target} holds another result of {path.stem} (other test metrics); "
                                 "remove it first if this run should replace it")
            if "per_class" in published:
                continue
        text = json_text(record, indent=1).encode()
        write_atomically({target: lambda s: s.write(text)})
    return summarize(destination, with_plot=with_plot)


def limit_threads(threads: int, environ=os.environ) -> None:
    """Keep every run of this process (and its spawned workers) to ``threads`` threads that sleep
    when idle. Call before torch and numba are imported; settings already in the environment win.

    ``torch.set_num_threads`` alone was not enough: each run still gained a second thread at its
    first evaluation, numba's team for the rank kernel (sized to every core, blind to torch's
    setting), whose OpenMP workers spin-waited between parallel regions. Two or three 1-thread runs
    on two cores then kept twice as many threads busy; measured 2026-12-06 with three runs side by
    side on two cores, epochs took 175-205 s with spinning threads and 65 s with
    ``OMP_WAIT_POLICY=PASSIVE``, same results. The rank kernel now follows torch's thread count
    itself; ``NUMBA_NUM_THREADS`` keeps numba from starting the extra thread at all.
    """
    for variable, value in (("OMP_NUM_THREADS", str(threads)), ("MKL_NUM_THREADS", str(threads)),
                            ("NUMBA_NUM_THREADS", str(threads)), ("OMP_WAIT_POLICY", "PASSIVE")):
        environ.setdefault(variable, value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(CPU_GRID), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra setting for every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (each with --threads threads)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--out", type=Path, default=Path("runs/dnc_study"))
    parser.add_argument("--summarize", action="store_true", help="only write the summary of the runs in --out")
    parser.add_argument("--publish", type=Path, metavar="DIR",
                        help="copy the runs in --out to DIR/per_run (JSON with per-class scores) and summarise them there")
    args = parser.parse_args()
    if args.publish is not None:
        try:
            publish(args.out, args.publish)
        except ValueError as error:
            print(f"dnc_study: {error}", file=sys.stderr)
            return 2
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        summarize(args.out)
        return 0
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    limit_threads(threads)
    zero_shot(args.out, args.overrides)
    # Seeds outermost: a study cut short still has complete pairs for the seeds it reached.
    jobs = [(v, st, s, args.overrides, args.out, threads) for s in args.seeds for v in args.variants for st in args.settings
            if not (args.out / f"{run_name(v, st, s)}.json").exists()]
    print(f"{len(jobs)} runs to train ({args.jobs} at a time, {threads} threads each)", flush=True)
    start = time.perf_counter()
    if args.jobs == 1:
        for job in jobs:
            print(f"{train_one(job)} done at {time.perf_counter() - start:.0f} s", flush=True)
    else:
        # Spawned workers: the zero-shot pass has started OpenMP threads here, and a forked child would abort.
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for name in pool.map(train_one, jobs):
                print(f"{name} done at {time.perf_counter() - start:.0f} s", flush=True)
    summarize(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The main job: single metric vs divide and conquer on the emoji benchmark, side by side.

Both models start from the same pretrained backbone, train with the same preset, budget (epochs)
and seed; only the number of learners differs. The zero-shot row is the pretrained backbone's own
features at the same resolution. All three are evaluated on the test classes under both emoji
protocols (leave-one-out and cross-vendor).

One seed of each is one draw: the D&C minus K = 1 difference comes with a paired bootstrap
interval over the test classes (:mod:`dcml.evaluation.paired`), from one more embedding pass of
the test split with each model's selected weights, and says in words whether it is
distinguishable from zero. That interval covers the luck of the test classes, not the spread
across training seeds, which only more runs measure (``make bench-dnc``).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from dcml.config import load_config
from dcml.errors import UserError
from dcml.evaluation.protocols import CROSS_GROUP_ROW, LEAVE_ONE_OUT_ROW
from dcml.evaluation.paired import PAIRED_METRICS, PairedDifference, QueryScores, paired_differences, protocol_query_scores
from dcml.atomic_files import json_text, write_atomically

PROTOCOLS = (CROSS_GROUP_ROW, LEAVE_ONE_OUT_ROW)
#: What a demo writes in its folder (besides one run folder per model, see RUN_NAMES).
RESULT_FILES = ("results.json", "results.md", "curves.png")
RUN_NAMES = ("baseline", "dnc")
TABLE_KS = (1, 2, 4, 8)
DEFAULT_DNC_LEARNERS = 4
#: The D&C minus K = 1 interval: a paired percentile bootstrap over test classes.
INTERVAL_LEVEL = 0.95
INTERVAL_RESAMPLES = 2000
INTERVAL_SEED = 0  # fixed, so the same two models always get the same interval
METRIC_NAMES = {"recall@1": "R@1", "map@r": "MAP@R"}


def smoke_test_note(image_size: int, epochs: int) -> str:
    """What ``--quick`` is for, said where its numbers are shown."""
    return (f"Smoke test (--quick): {image_size} px and {epochs} epochs are too short for the conquer phase to pay off, "
            "so its D&C vs K = 1 comparison is not a verdict; `make demo` (dcml demo without --quick) runs the comparison.")


def cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo), so a reader can tell which machine a table came from."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def check_demo_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier demo's files unless ``overwrite``, which clears them (only them)."""
    from dcml.training.checkpoint import remove_stale_temporaries
    from dcml.training.run_files import clear_run_files, existing_run_files

    existing = [out / name for name in RESULT_FILES if (out / name).exists()]
    for name in RUN_NAMES:
        existing += existing_run_files(out / name)
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists: {out} holds an earlier demo; choose another --out, "
                        "or pass --overwrite to replace it")
    for path in existing:
        if path.parent == out:
            path.unlink()
    for name in RUN_NAMES:
        clear_run_files(out / name)
        remove_stale_temporaries(out / name)
    remove_stale_temporaries(out)


def run_demo(out: Path, *, quick: bool = False, learners: int = DEFAULT_DNC_LEARNERS, seed: int = 0,
             overrides: list[str] | None = None, progress: bool = True, echo=print, overwrite: bool = False) -> dict:
    """Train K = 1 and K = ``learners`` on emoji; write out/results.json and out/results.md.

    An earlier demo in ``out`` is refused unless ``overwrite``."""
    from dcml.training.quick import QUICK_OVERRIDES
    from dcml.training.trainer import Trainer, prepare_dataset, write_config

    start = time.perf_counter()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    check_demo_folder(out, overwrite)
    # data.root null: the default emoji cache, built with npm on first use.
    common = [*(QUICK_OVERRIDES if quick else ()), f"seed={seed}", *(overrides or [])]
    configs = {
        "baseline": load_config("emoji", [*common, "clustering.learners=1"]),
        "dnc": load_config("emoji", [*common, f"clustering.learners={learners}"]),
    }
    epochs = configs["baseline"].schedule.epochs
    if quick:
        echo(smoke_test_note(configs["baseline"].data.image_size, epochs))
    dataset = prepare_dataset(configs["baseline"])
    test_split = dataset.split(dataset.evaluation.splits[0])
    if test_split.groups is None:
        raise UserError(f"dcml demo compares on emoji's cross-vendor protocol; dataset {dataset.name!r} has no vendors")
    shared_inputs: dict = {}  # the frozen units' outputs, computed once for both runs
    results: dict = {}
    runs: dict = {}
    histories: dict = {}
    scores: dict[str, dict[str, QueryScores]] = {}
    for name, config in configs.items():
        echo(f"== {name}: K = {config.clustering.learners}, {config.schedule.epochs} epochs")
        trainer = Trainer(config, out / name, progress=progress, echo=echo, dataset=dataset, shared_inputs=shared_inputs)
        if name == "baseline":
            zero_shot_start = time.perf_counter()
            results["zero_shot"] = trainer.evaluate(None, with_nmi=True, space="backbone")
            echo(f"zero-shot evaluated in {time.perf_counter() - zero_shot_start:.0f} s")
        write_config(out / name, config)
        run = trainer.fit()
        results[name] = run["test"]
        runs[name] = {k: run[k] for k in ("selected_epoch", "selection_metric", "selection_score", "seconds", "recluster_share")}
        runs[name]["train_images"] = sum(record["images"] for record in trainer.history)
        scores_start = time.perf_counter()
        scores[name] = split_query_scores(trainer.embed(test_split), test_split.labels, test_split.groups)
        runs[name]["per_query_matches_table"] = not table_mismatches(scores[name], results[name], echo)
        echo(f"per-query test scores in {time.perf_counter() - scores_start:.1f} s")
        histories[f"K = {config.clustering.learners}"] = trainer.history
    image_size = configs["baseline"].data.image_size
    payload = {
        "zero_shot": results["zero_shot"],
        "baseline": results["baseline"],
        "dnc": results["dnc"],
        "learners": learners,
        "seconds": time.perf_counter() - start,
        "quick": quick,
        "image_size": image_size,
        "backbone": configs["baseline"].model.backbone,
        "runs": runs,
        "seed": seed,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "device": str(trainer.device)},
        "dnc_minus_baseline": compare_models(scores["dnc"], scores["baseline"]),
        "interval": {"method": "paired percentile bootstrap over test classes (a class's queries move together)",
                     "level": INTERVAL_LEVEL, "resamples": INTERVAL_RESAMPLES, "bootstrap_seed": INTERVAL_SEED,
                     "covers": "the test classes' luck for these two trained models, not the spread across training seeds"},
        "note": smoke_test_note(image_size, epochs) if quick else None,
    }
    markdown = results_markdown(payload)
    text = json_text(payload, indent=2).encode()
    write_atomically({out / "results.json": lambda s: s.write(text), out / "results.md": lambda s: s.write(markdown.encode())})
    from dcml.plots import plot_training_curves

    metric = configs["baseline"].evaluation.selection_metric
    plot_training_curves(histories, out / "curves.png", metric=metric)
    return payload


def split_query_scores(embeddings: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, QueryScores]:
    """Both protocols' per-query scores of a test split's embedding, normalised as the evaluation does."""
    from dcml.model_runner import l2_normalize

    return protocol_query_scores(l2_normalize(embeddings), labels, groups)


def table_mismatches(scores: dict[str, QueryScores], rows: dict, echo) -> list[str]:
    """Metrics whose per-query mean differs from the trainer's test row (a nondeterministic device
    gives a second embedding pass slightly other numbers); each is echoed, none is hidden."""
    mismatches = []
    for protocol, protocol_scores in scores.items():
        for metric in PAIRED_METRICS:
            if protocol_scores.mean(metric) != rows[protocol][metric]:
                mismatches.append(f"{protocol}/{metric}")
                echo(f"note: the second test pass gives {protocol} {metric} {100 * protocol_scores.mean(metric):.2f}, "
                     f"the table {100 * rows[protocol][metric]:.2f}; the interval is from the second pass")
    return mismatches


def compare_models(dnc: dict[str, QueryScores], baseline: dict[str, QueryScores]) -> dict:
    """Per protocol: D&C minus K = 1 for each paired metric with its interval, and the sentence saying it."""
    comparison = {}
    for protocol in PROTOCOLS:
        differences = paired_differences(dnc[protocol], baseline[protocol], resamples=INTERVAL_RESAMPLES,
                                         seed=INTERVAL_SEED, level=INTERVAL_LEVEL)
        comparison[protocol] = {metric: difference.to_dict() for metric, difference in differences.items()}
        comparison[protocol]["summary"] = difference_sentence(differences)
    return comparison


def _verdict(difference: PairedDifference) -> str:
    if not difference.distinguishable:
        return "not distinguishable from zero with one seed"
    return "distinguishable from zero (D&C " + ("ahead)" if difference.difference > 0 else "behind)")


def difference_sentence(differences: dict[str, PairedDifference]) -> str:
    """``D&C minus K = 1: R@1 +2.39 [+0.51, +4.27], distinguishable from zero (D&C ahead); MAP@R ...``"""
    first = next(iter(differences.values()))
    parts = [f"{METRIC_NAMES[metric]} {100 * d.difference:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}], {_verdict(d)}"
             for metric, d in differences.items()]
    return (f"D&C minus K = 1 (points; {100 * first.level:.0f}% interval, bootstrap over {first.classes} test classes): "
            + "; ".join(parts) + ".")


def results_markdown(payload: dict) -> str:
    """The side-by-side table (metrics in %) as Markdown."""
    names = {"zero_shot": "zero-shot (pretrained features)", "baseline": "single metric (K = 1)",
             "dnc": f"divide & conquer (K = {payload['learners']})"}
    lines = [f"**{payload['note']}**", ""] if payload.get("note") else []
    lines += [
        f"Emoji test classes, {payload['backbone']} at {payload['image_size']} px"
        + (" (--quick budget)" if payload.get("quick") else "") + f"; metrics in %; {payload['seconds']:.0f} s in all. "
        f"One run, seed {payload['seed']}, on {payload['machine']['cpu']} ({payload['machine']['cores']} cores, "
        f"device {payload['machine']['device']}): CPU results repeat on the same machine, not across machines.",
        "",
    ]
    for protocol in PROTOCOLS:
        lines.append(f"**{protocol.replace('_', '-')}**")
        lines.append("")
        header = ["model"] + [f"R@{k}" for k in TABLE_KS] + ["MAP@R", "NMI"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" + "---:|" * (len(header) - 1))
        for key, label in names.items():
            metrics = payload[key][protocol]
            cells = [f"{100 * metrics.get(f'recall@{k}', float('nan')):.2f}" for k in TABLE_KS]
            cells += [f"{100 * metrics['map@r']:.2f}", f"{100 * metrics.get('nmi', float('nan')):.2f}"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(payload["dnc_minus_baseline"][protocol]["summary"])
        lines.append("")
    for key in ("baseline", "dnc"):
        run = payload["runs"][key]
        lines.append(f"- {names[key]}: selected epoch {run['selected_epoch']} on validation "
                     f"{run['selection_metric']}; {run['train_images']} training images seen; {run['seconds']:.0f} s")
    lines.append(f"- the intervals resample the test classes ({payload['interval']['resamples']} times): they cover which "
                 "classes were drawn, not the spread across training seeds (about a point on emoji: README, "
                 "\"When divide and conquer helps\")")
    return "\n".join(lines) + "\n"

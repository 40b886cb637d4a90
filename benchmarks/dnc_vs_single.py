"""Single metric (K = 1) vs divide and conquer on the emoji benchmark, over several seeds.

    python benchmarks/dnc_vs_single.py                      # all variants, seeds 0 1 2 (~45 min, 2 cores)
    python benchmarks/dnc_vs_single.py --variants K1 K4-class --seeds 0 --epochs 6

Every variant trains with the emoji preset (the demo's budget) and differs only in the settings
listed in VARIANTS. Prints mean and spread (population std) over seeds of the test classes'
cross-vendor Recall@1 and MAP@R, the training images seen, the share of training time spent
re-clustering, and, for the final clustering, how strongly clusters follow the emoji vendor and how
many classes straddle clusters. Writes every run's numbers to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dcml.config import load_config  # noqa: E402
from dcml.evaluation.protocols import CROSS_GROUP_ROW, LEAVE_ONE_OUT_ROW  # noqa: E402
from dcml.training.trainer import Trainer, prepare_dataset  # noqa: E402

VARIANTS = {
    "K1": ["clustering.learners=1"],
    "K2-image": ["clustering.learners=2", "clustering.unit=image"],
    "K2-class": ["clustering.learners=2", "clustering.unit=class"],
    "K4-image": ["clustering.learners=4", "clustering.unit=image"],
    "K4-class": ["clustering.learners=4", "clustering.unit=class"],
    "K4-image-embedding": ["clustering.learners=4", "clustering.unit=image", "clustering.space=embedding"],
    "K4-image-fresh": ["clustering.learners=4", "clustering.unit=image", "clustering.reuse_training_features=false"],
}


def cluster_diagnostics(trainer: Trainer) -> dict:
    """How the last clustering relates to vendors and classes (train split)."""
    clustering = trainer.clustering
    groups = trainer.train_split.groups
    labels = trainer.train_labels
    k = clustering.num_clusters
    if k == 1 or groups is None:
        return {}
    # Vendor purity: share of each cluster's images drawn by its most common vendor, averaged by size.
    purity = 0.0
    for c in range(k):
        members = groups[clustering.assignment == c]
        if len(members):
            purity += np.bincount(members).max()
    straddling = np.mean([len(np.unique(clustering.assignment[labels == y])) > 1 for y in np.unique(labels)])
    # Cross-vendor positives lost: same-class pairs from different vendors that sit in different clusters.
    same, split = 0, 0
    for y in np.unique(labels):
        idx = np.flatnonzero(labels == y)
        for i in range(len(idx)):
            for j in range(i + 1, len(idx)):
                if groups[idx[i]] != groups[idx[j]]:
                    same += 1
                    split += clustering.assignment[idx[i]] != clustering.assignment[idx[j]]
    return {"vendor_purity": purity / len(labels), "classes_straddling": float(straddling),
            "cross_vendor_pairs_split": split / max(same, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override schedule.epochs (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra setting for every run")
    parser.add_argument("--out", type=Path, default=Path("runs/dnc_vs_single.json"))
    parser.add_argument("--summarize", nargs="+", type=Path, default=None, metavar="JSON",
                        help="only print the summary of earlier --out files (e.g. one per seed)")
    parser.add_argument("--initial-clusters", action="store_true",
                        help="only cluster once with the pretrained weights (epoch 0) and print the diagnostics")
    args = parser.parse_args()
    if args.initial_clusters:
        return initial_clusters(args)
    if args.summarize:
        runs = [run for path in args.summarize for run in json.loads(path.read_text())]
        summarize(runs, [v for v in VARIANTS if any(r["variant"] == v for r in runs)])
        return 0

    extra = list(args.overrides) + ([f"schedule.epochs={args.epochs}", f"schedule.conquer_epoch={int(args.epochs * 0.7)}"] if args.epochs else [])
    dataset = prepare_dataset(load_config("emoji", extra))
    shared: dict = {}
    runs = []
    for seed in args.seeds:
        for name in args.variants:
            config = load_config("emoji", [*extra, *VARIANTS[name], f"seed={seed}"])
            start = time.perf_counter()
            trainer = Trainer(config, None, progress=False, echo=lambda _: None, dataset=dataset, shared_inputs=shared)
            result = trainer.fit()
            cross = result["test"][CROSS_GROUP_ROW]
            run = {
                "variant": name, "seed": seed,
                "cross_vendor_r1": cross["recall@1"], "cross_vendor_map_r": cross["map@r"],
                "leave_one_out_r1": result["test"][LEAVE_ONE_OUT_ROW]["recall@1"],
                "selected_epoch": result["selected_epoch"], "val_score": result["selection_score"],
                "train_images": sum(r["images"] for r in trainer.history),
                "recluster_share": result["recluster_share"], "timings": result["timings"],
                "seconds": time.perf_counter() - start, **cluster_diagnostics(trainer),
            }
            runs.append(run)
            print(json.dumps(run), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(runs, indent=2))

    summarize(runs, args.variants)
    return 0


def initial_clusters(args) -> int:
    """Diagnostics of the first clustering (pretrained features), for every variant with K > 1."""
    dataset = prepare_dataset(load_config("emoji", args.overrides))
    shared: dict = {}
    print(f"{'variant':<20}{'seed':>5}{'purity':>8}{'straddle':>9}{'pairs split':>12}  cluster sizes")
    for seed in args.seeds:
        for name in args.variants:
            config = load_config("emoji", [*args.overrides, *VARIANTS[name], f"seed={seed}"])
            if config.clustering.learners == 1:
                continue
            trainer = Trainer(config, None, progress=False, echo=lambda _: None, dataset=dataset, shared_inputs=shared)
            trainer.recluster(trainer.plans[0])
            d = cluster_diagnostics(trainer)
            print(f"{name:<20}{seed:>5}{100 * d['vendor_purity']:>7.1f}%{100 * d['classes_straddling']:>8.1f}%"
                  f"{100 * d['cross_vendor_pairs_split']:>11.1f}%  {trainer.clustering.cluster_sizes().tolist()}")
    return 0


def summarize(runs: list[dict], variants: list[str]) -> None:
    seeds = sorted({r["seed"] for r in runs})
    print(f"\nemoji test classes, seeds {seeds}: mean ± std (population) in %")
    print(f"{'variant':<20}{'R@1 (x-vendor)':>18}{'MAP@R':>16}{'images/run':>12}{'recluster':>11}{'purity':>8}{'straddle':>9}{'pairs split':>12}")
    for name in variants:
        rows = [r for r in runs if r["variant"] == name]
        r1 = 100 * np.array([r["cross_vendor_r1"] for r in rows])
        mapr = 100 * np.array([r["cross_vendor_map_r"] for r in rows])
        def mean(key):
            values = [r[key] for r in rows if key in r]
            return f"{100 * np.mean(values):.1f}%" if values else "-"
        print(f"{name:<20}{r1.mean():>10.2f} ± {r1.std():<5.2f}{mapr.mean():>9.2f} ± {mapr.std():<5.2f}"
              f"{np.mean([r['train_images'] for r in rows]):>12.0f}{mean('recluster_share'):>11}{mean('vendor_purity'):>8}"
              f"{mean('classes_straddling'):>9}{mean('cross_vendor_pairs_split'):>12}")


if __name__ == "__main__":
    raise SystemExit(main())

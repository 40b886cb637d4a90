"""Evaluation speed: dcml's full metric suite vs pytorch-metric-learning's AccuracyCalculator.

One run, same data, each contender in its own process (so peak memory is its own):
  - dcml: Recall@1/10/100/1000, Precision@1, R-Precision, MAP@R and NMI (leave-one-out)
  - PML:  precision_at_1, r_precision, mean_average_precision_at_r and NMI, k="max_bin_count"
on 60,502 x 128 unit vectors with SOP-like class sizes (11,316 classes of 2-12 images).
Prints both wall times, the ratio (overall, and without NMI's k-means, which both run through
faiss with the same seed), each peak RSS, and checks that the shared metrics agree to 1e-6.

    python benchmarks/eval_speed.py                 # random unit vectors (the issue's setting)
    python benchmarks/eval_speed.py --data clustered  # class structure, metrics far from zero
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SOP_TEST_IMAGES = 60_502
SOP_TEST_CLASSES = 11_316
SOP_MIN_CLASS, SOP_MAX_CLASS = 2, 12
SHARED = {"precision@1": "precision_at_1", "r_precision": "r_precision", "map@r": "mean_average_precision_at_r"}


def sop_like_labels(rng: np.random.Generator, images: int, classes: int) -> np.ndarray:
    """Class sizes in [2, 12] with SOP's mean (5.35 images per class), summing exactly to ``images``."""
    mean_extra = images / classes - SOP_MIN_CLASS
    sizes = SOP_MIN_CLASS + rng.binomial(SOP_MAX_CLASS - SOP_MIN_CLASS, mean_extra / (SOP_MAX_CLASS - SOP_MIN_CLASS), classes)
    while (surplus := int(sizes.sum()) - images) != 0:
        step = 1 if surplus < 0 else -1
        pick = rng.integers(0, classes, abs(surplus))
        sizes[pick] = np.clip(sizes[pick] + step, SOP_MIN_CLASS, SOP_MAX_CLASS)
    return rng.permutation(np.repeat(np.arange(classes), sizes))


def make_data(kind: str, images: int, classes: int, dim: int, seed: int, noise: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = sop_like_labels(rng, images, classes)
    x = rng.standard_normal((images, dim)).astype(np.float32)
    if kind == "clustered":
        centres = rng.standard_normal((classes, dim)).astype(np.float32)
        x = centres[labels] + noise * x
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def run_dcml(x: np.ndarray, labels: np.ndarray) -> tuple[dict, float]:
    """The full suite; returns the metrics and the seconds spent in NMI's k-means."""
    from dcml.evaluation.metrics import NMI, nmi, retrieval_metrics

    metrics = retrieval_metrics(x, labels, ks=(1, 10, 100, 1000))
    start = time.perf_counter()
    metrics[NMI] = nmi(x, labels)
    return metrics, time.perf_counter() - start


def run_pml(x: np.ndarray, labels: np.ndarray) -> tuple[dict, float]:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    def calculator(*metrics):
        return AccuracyCalculator(include=metrics, k="max_bin_count", device=torch.device("cpu"))

    x_t, labels_t = torch.from_numpy(x), torch.from_numpy(labels)
    metrics = calculator("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI").get_accuracy(x_t, labels_t)
    # The NMI part alone (outside the timed call), to report the speed-up without the shared k-means.
    start = time.perf_counter()
    calculator("NMI").get_accuracy(x_t, labels_t)
    return metrics, time.perf_counter() - start


def child(contender: str, data_path: str) -> None:
    data = np.load(data_path)
    x, labels = data["x"], data["labels"]
    if contender == "dcml":
        run_dcml(x[:5000], labels[:5000])  # compile the kernels (both passes) outside the timing
    start = time.perf_counter()
    metrics, nmi_seconds = run_dcml(x, labels) if contender == "dcml" else run_pml(x, labels)
    seconds = time.perf_counter() - start - (nmi_seconds if contender == "pml" else 0.0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "nmi_seconds": nmi_seconds, "peak_rss_mb": peak_mb, "metrics": {k: float(v) for k, v in metrics.items()}}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("random", "clustered"), default="random")
    parser.add_argument("--images", type=int, default=SOP_TEST_IMAGES)
    parser.add_argument("--classes", type=int, default=SOP_TEST_CLASSES)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=2.0, help="clustered data: noise scale relative to the class centres")
    parser.add_argument("--child", nargs=2, metavar=("CONTENDER", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    x, labels = make_data(args.data, args.images, args.classes, args.dim, args.seed, args.noise)
    print(f"data: {args.data}, {len(x)} x {x.shape[1]}, {len(np.unique(labels))} classes, sizes {np.bincount(labels).min()}-{np.bincount(labels).max()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.npz")
        np.savez(data_path, x=x, labels=labels)
        for contender in ("dcml", "pml"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", contender, data_path], check=True, capture_output=True, text=True
            ).stdout
            results[contender] = json.loads(out.strip().splitlines()[-1])
            r = results[contender]
            print(f"{contender:>5}: {r['seconds']:7.2f} s   peak RSS {r['peak_rss_mb']:7.0f} MB   " + ", ".join(f"{k}={v:.6f}" for k, v in r["metrics"].items()))

    ours, theirs = results["dcml"], results["pml"]
    shared = {**SHARED, "nmi": "NMI"}  # same faiss k-means, same seed: NMI must match too
    worst = max(abs(ours["metrics"][k] - theirs["metrics"][v]) for k, v in shared.items())
    print(f"shared metrics (P@1, R-Precision, MAP@R, NMI) max abs difference: {worst:.2e} -> {'AGREE' if worst <= 1e-6 else 'DISAGREE'} (tolerance 1e-6)")
    ratio = theirs["seconds"] / ours["seconds"]
    without_kmeans = (theirs["seconds"] - theirs["nmi_seconds"]) / (ours["seconds"] - ours["nmi_seconds"])
    print(f"NMI's k-means (identical in both): dcml {ours['nmi_seconds']:.1f} s, PML {theirs['nmi_seconds']:.1f} s")
    print(f"speed ratio (PML time / dcml time): {ratio:.2f}x overall, {without_kmeans:.2f}x without the k-means   "
          f"peak RSS dcml {ours['peak_rss_mb']:.0f} MB, PML {theirs['peak_rss_mb']:.0f} MB")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())

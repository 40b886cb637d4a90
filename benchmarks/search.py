"""Search speed on this machine: embedding through load_model vs the trainer's pass, query latency,
and 1,000,000 x 128 synthetic clustered vectors indexed by every kind (build time, memory,
queries/s, Recall@10 against exact search). Ratios and figures from one run; not a timed test.

    make bench-search            # about 15 minutes on 2 CPU cores
    python benchmarks/search.py --vectors 200000   # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = ("flat", "hnsw", "ivf", "ivfpq")
#: HNSW's search beam is a search-time setting: one built graph is measured at each of these.
EF_SEARCH_SWEEP = (64, 128, 256, 512)


def _percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms"


# ---------------------------------------------------------------------------- 1 + 2: a model
def _write_images(root: Path, classes: int, per_class: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(classes):
            folder = root / split / f"{split}{c:03d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def model_figures(work: Path, image_size: int) -> list[str]:
    import dcml
    from dcml.config import load_config
    from dcml.training import checkpoint as ckpt
    from dcml.training.trainer import Trainer

    root = work / "images"
    _write_images(root, classes=8, per_class=16, size=image_size + 32)
    config = load_config(None, ["data.dataset=folder", f"data.root={root}", f"data.image_size={image_size}",
                                "model.backbone=efficientnet_lite0", "model.embedding_dim=128", "clustering.learners=4",
                                "device=cpu", "data.eval_batch_size=32", "sampler.classes_per_batch=4",
                                "sampler.images_per_class=2", "evaluation.selection_metric=leave_one_out/recall@1"])
    trainer = Trainer(config, None, progress=False, echo=lambda _: None)
    run = work / "run"
    run.mkdir()
    ckpt.save_checkpoint(run / ckpt.BEST, {"config": config.to_dict(), "model": trainer.model.state_dict(),
                                          "active_learners": trainer.active_learners})
    split = trainer.dataset.split("test")
    model = dcml.load_model(run)
    trainer.embed(split), model.embed_split(split)  # warm-up
    rounds = {"trainer": [], "load_model": []}
    for _ in range(3):
        start = time.perf_counter()
        expected = trainer.embed(split)
        rounds["trainer"].append(time.perf_counter() - start)
        start = time.perf_counter()
        got = model.embed_split(split)
        rounds["load_model"].append(time.perf_counter() - start)
    n = split.num_images
    trainer_rate, model_rate = n / min(rounds["trainer"]), n / min(rounds["load_model"])
    lines = [f"embedding {n} JPEGs at {image_size} px, efficientnet_lite0, batch 32 (best of 3):",
             f"  trainer's feature pass {trainer_rate:.1f} img/s, load_model {model_rate:.1f} img/s "
             f"(ratio {model_rate / trainer_rate:.2f}); max |difference| {np.abs(expected - got).max():.2e}"]
    paths = list(split.paths)
    single = []
    for path in paths[:20]:
        start = time.perf_counter()
        model.embed([path])
        single.append(time.perf_counter() - start)
    batched = []
    for start_row in range(0, 96, 32):
        start = time.perf_counter()
        model.embed(paths[start_row : start_row + 32])
        batched.append(time.perf_counter() - start)
    lines.append(f"  query embedding, one image at a time: {_percentiles(single)}; batches of 32: {_percentiles(batched)} "
                 f"per batch ({32 / np.median(batched):.1f} img/s)")
    return lines


# ---------------------------------------------------------------------------- 3: 1M vectors
def write_vectors(path: Path, count: int, dimension: int, clusters: int = 1000, seed: int = 0) -> None:
    """Clustered unit vectors written in chunks (never all in memory)."""
    from dcml.search.storage import NpyRowWriter

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dimension)).astype(np.float32)
    writer = NpyRowWriter(path.parent, dimension)
    for start in range(0, count, 100_000):
        rows = min(100_000, count - start)
        x = centres[rng.integers(0, clusters, rows)] + 0.35 * rng.normal(size=(rows, dimension)).astype(np.float32)
        writer.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    writer.finish(path)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> float:
    """Current resident memory, with the kernel's peak (VmHWM) reset to it (Linux: clear_refs 5)."""
    import dcml.model_runner  # noqa: F401 - torch and faiss loaded before the baseline, not counted as the build's
    import faiss  # noqa: F401

    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def child_build(vectors: Path, out: Path, kind: str) -> dict:
    """Runs in its own process, so its peak memory is its own."""
    from dcml.search.index import Index, IndexBuilder, Items
    from dcml.search.storage import iter_npy_rows, npy_shape

    (count, dimension), _ = npy_shape(vectors)
    baseline = _reset_peak()
    start = time.perf_counter()
    with IndexBuilder(out, dimension) as builder:
        _append_all(builder, vectors)
        index = builder.finish(Items([f"v{i}" for i in range(count)]), {"checkpoint": "synthetic", "sha256": "0" * 64}, kind)
    build = time.perf_counter() - start
    peak = _status_mb("VmHWM") - baseline
    held = _status_mb("VmRSS") - baseline  # the finished index and its items table, as Index.load returns them
    del index
    index = Index.load(out)
    rng = np.random.default_rng(1)
    queries = next(iter_npy_rows(vectors, 1000))  # the first 1,000 rows, perturbed below
    queries = queries + 0.05 * rng.normal(size=queries.shape).astype(np.float32)
    index.search(queries[:10], 10)  # warm-up
    start = time.perf_counter()
    result = index.search(queries, 10)
    batch_seconds = time.perf_counter() - start
    single = []
    for q in queries[:100]:
        t = time.perf_counter()
        index.search(q[None], 10)
        single.append(time.perf_counter() - t)
    np.save(out.parent / f"{kind}.ids.npy", result.ids, allow_pickle=False)
    sweep = []
    if kind == "hnsw":
        for ef in EF_SEARCH_SWEEP:
            index.faiss_index.hnsw.efSearch = ef
            index.search(queries[:10], 10)
            start = time.perf_counter()
            found = index.search(queries, 10)
            sweep.append({"ef_search": ef, "qps": len(queries) / (time.perf_counter() - start)})
            np.save(out.parent / f"hnsw.ef{ef}.ids.npy", found.ids, allow_pickle=False)
    return {"kind": kind, "parameters": index.manifest["parameters"], "build_s": build, "peak_mb": peak,
            "held_mb": held, "qps": len(queries) / batch_seconds, "single": _percentiles(single),
            "recall_sampled": index.manifest["recall_at_10"], "sweep": sweep}


def _append_all(builder, vectors: Path) -> None:
    """The rows, chunk by chunk, as a model's batches would arrive (no chunk outlives the loop)."""
    from dcml.search.storage import iter_npy_rows

    for chunk in iter_npy_rows(vectors):
        builder.append(chunk)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))


def vector_figures(work: Path, count: int, dimension: int, kinds=KINDS) -> list[str]:
    vectors = work / "vectors.npy"
    write_vectors(vectors, count, dimension)
    raw_mb = count * dimension * 4 / 2**20
    lines = [f"{count:,} x {dimension} clustered unit vectors ({raw_mb:.0f} MB raw), k = 10, 1000 batched queries:"]
    rows = {}
    for kind in kinds:
        output = subprocess.run([sys.executable, __file__, "--child", kind, str(vectors), str(work / f"index-{kind}")],
                                capture_output=True, text=True, check=True).stdout
        rows[kind] = json.loads(output.strip().splitlines()[-1])
    exact = np.load(work / "flat.ids.npy")
    for kind in kinds:
        r = rows[kind]
        recall = _recall(np.load(work / f"{kind}.ids.npy"), exact)
        params = " ".join(f"{k}={v}" for k, v in r["parameters"].items()) or "exact"
        lines.append(f"  {kind:<6} ({params}): build {r['build_s']:.1f} s, peak +{r['peak_mb']:.0f} MB "
                     f"({r['peak_mb'] / raw_mb:.2f}x raw; {r['held_mb'] / raw_mb:.2f}x resident after), {r['qps']:.0f} queries/s batched "
                     f"({r['qps'] / rows['flat']['qps']:.1f}x exact), single query {r['single']}, "
                     f"Recall@10 vs exact {recall:.3f} (build-time sample {r['recall_sampled']:.3f})")
        for point in r["sweep"]:
            found = np.load(work / f"hnsw.ef{point['ef_search']}.ids.npy")
            lines.append(f"         same graph, ef_search={point['ef_search']}: {point['qps']:.0f} queries/s batched "
                         f"({point['qps'] / rows['flat']['qps']:.1f}x exact), Recall@10 vs exact {_recall(found, exact):.3f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated index kinds (flat is always built: the reference)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "VECTORS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, vectors, out = args.child
        print(json.dumps(child_build(Path(vectors), Path(out), kind)))
        return 0
    import torch

    lines = [f"dcml search benchmark, {torch.get_num_threads()} CPU threads, {time.strftime('%Y-%m-%d')}"]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if not args.skip_model:
            lines += model_figures(work, args.image_size)
            print("\n".join(lines), flush=True)
        kinds = tuple(dict.fromkeys(["flat", *args.kinds.split(",")]))
        printed = len(lines) if not args.skip_model else 0  # the model's figures are already out
        lines += vector_figures(work, args.vectors, args.dimension, kinds)
    print("\n".join(lines[printed:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

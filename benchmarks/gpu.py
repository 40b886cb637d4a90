"""One prepared GPU visit: training, feature-pass and evaluation throughput, written as it goes.

    python benchmarks/gpu.py                       # on the GPU machine (about 8 minutes; make bench-gpu)
    python benchmarks/gpu.py --device cpu --tiny   # toy sizes on the CPU, to check the script itself

Sections, each with a time budget; results are rewritten after every figure, so a timeout still
leaves what was measured in ``benchmarks/results/gpu_<device>.txt`` and ``.json``:

a. training images/s of the preset's step (cub200: ResNet-50, 224 px, batch 20 x 4) on synthetic
   JPEGs: dcml's configured runtime (bf16 + channels-last on CUDA) without and with
   ``runtime.compile``, a plain float32 loop (both from ``benchmarks/throughput.py``), and the
   device data path (``dcml.training.device_inputs``: JPEG bytes decoded and augmented on the
   device); with the share of step time spent waiting for data;
b. the re-clustering feature pass (``dcml.model_runner.run_over_batches``, no gradients) images/s;
c. the exact rank engine at SOP size (60,502 x 128, leave-one-out, Recall@1/10/100/1000, MAP@R)
   with the tile products on the host vs on the device; the ranks must be identical;
d. (``--with-study`` only) the emoji K = 1 vs divide and conquer study, the remaining time.

Needs no network and no weights: models have random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import throughput  # noqa: E402  (benchmarks/throughput.py: the synthetic data and the two training loops)
from dcml.config import load_config  # noqa: E402

TARGET_IMAGES_PER_SECOND = 2_500
DATA_WAIT_LIMIT = 0.05
SOP_SIZE, SOP_CLASSES, SOP_DIMS = 60_502, 11_318, 128


class Report:
    """The figures so far, rewritten to the .txt and .json after each one."""

    def __init__(self, folder: Path, device: torch.device, tiny: bool):
        folder.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") + ("-tiny" if tiny else "")
        self.txt, self.json = folder / f"gpu_{slug}.txt", folder / f"gpu_{slug}.json"
        self.data = {
            "device": name, "device_type": device.type, "tiny": tiny, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}, "verdicts": {},
        }

    def put(self, section: str, key: str, value) -> None:
        self.data["sections"].setdefault(section, {})[key] = value
        print(f"[{section}] {key}: {json.dumps(value)}", flush=True)
        self.write()

    def write(self) -> None:
        self.json.write_text(json.dumps(self.data, indent=2) + "\n")
        d = self.data
        lines = [f"device: {d['device']} ({d['device_type']}), torch {d['torch']}, CUDA {d['cuda']}, cuDNN {d['cudnn']}, "
                 f"{d['cpu_count']} CPU cores{', TINY sizes' if d['tiny'] else ''}", f"started: {d['started']}"]
        for section, rows in d["sections"].items():
            lines.append(f"\n[{section}]")
            for key, value in rows.items():
                if isinstance(value, dict) and "images_per_second" in value:
                    wait = value.get("data_wait_share")
                    lines.append(f"  {key:<28}{value['images_per_second']:>10.1f} images/s"
                                 + (f"   data wait {100 * wait:5.1f}%" if wait is not None else "")
                                 + (f"   ({value['precision']})" if "precision" in value else ""))
                else:
                    lines.append(f"  {key:<28}{json.dumps(value)}")
        if d["verdicts"]:
            lines.append("\n[verdicts]")
            lines += [f"  {key}: {value}" for key, value in d["verdicts"].items()]
        self.txt.write_text("\n".join(lines) + "\n")


def rates(row: dict) -> dict:
    row["images_per_second"] = row["images"] / row["seconds"]
    row["data_wait_share"] = row["data_wait_seconds"] / row["seconds"]
    return row


def sizes(args) -> dict:
    if args.tiny:
        return {"overrides": ["model.backbone=resnet18", "data.image_size=32", "sampler.classes_per_batch=4",
                              "sampler.images_per_class=2", "data.eval_batch_size=8",
                              "runtime.feature_batch_size=8"],
                "classes": 12, "warmup": 1, "steps": 2, "feature_batches": 2,
                "eval_size": 1500, "eval_classes": 300, "eval_dims": 16, "rank_cap": 100}
    return {"overrides": [], "classes": throughput.SYNTHETIC_CLASSES, "warmup": 15, "steps": 60, "feature_batches": 40,
            "eval_size": SOP_SIZE, "eval_classes": SOP_CLASSES, "eval_dims": SOP_DIMS, "rank_cap": 1000}


def device_decode_loop(config, dataset, warmup: int, steps: int, device: torch.device) -> dict:
    """The configured step (autocast, channels-last) fed by the device data path: workers only read bytes."""
    from dcml.data.images import DEFAULT_MAX_IMAGE_PIXELS
    from dcml.losses import build_loss
    from dcml.models.embedding_model import build_model
    from dcml.training.device import autocast_for
    from dcml.training.device_inputs import DeviceAugment, read_encoded

    d, s, r = config.data, config.sampler, config.runtime
    model = build_model(config).to(device)
    if r.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    split = dataset.split("train")

    class Encoded(torch.utils.data.Dataset):
        def __len__(self):
            return split.num_images

        def __getitem__(self, index):
            return read_encoded(split.paths[index], max_pixels=DEFAULT_MAX_IMAGE_PIXELS), index

    batch = s.classes_per_batch * s.images_per_class
    extra = {"persistent_workers": True, "prefetch_factor": r.prefetch_factor} if d.num_workers else {}
    loader = torch.utils.data.DataLoader(Encoded(), batch_size=batch, shuffle=True, num_workers=d.num_workers,
                                         drop_last=True, collate_fn=lambda items: items, **extra)
    augment = DeviceAugment(d.image_size, model.backbone.mean, model.backbone.std,
                            horizontal_flip=d.train_augmentation == "crop_flip", device=device)
    loss_fn = build_loss("margin", dataclasses.replace(config.loss.settings, beta_mode="fixed"), num_learners=1,
                         num_classes=len(np.unique(split.labels))).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=1e-4)
    autocast = autocast_for(r.precision, device)
    labels_all = torch.as_tensor(split.labels)
    rng = np.random.default_rng(0)
    iterator, seen, wait, start = iter(loader), 0, 0.0, None
    for step in range(warmup + steps):
        if step == warmup:
            throughput.synchronize(device)
            start, seen, wait = time.perf_counter(), 0, 0.0
        wait_start = time.perf_counter()
        try:
            items = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            items = next(iterator)
        wait += time.perf_counter() - wait_start
        indices = torch.tensor([index for _, index in items])
        inputs = augment([image for image, _ in items], rng.integers(0, 2**63 - 1, len(items)).tolist())
        labels = labels_all[indices].to(device, non_blocking=True)
        with autocast():
            loss = loss_fn(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(items)
    throughput.synchronize(device)
    return {"images": seen, "seconds": time.perf_counter() - start, "data_wait_seconds": wait}


def section_training(report, args, size, device, folder: Path) -> None:
    budget_end = time.perf_counter() + args.budget_training
    overrides = ["model.pretrained=false", "model.weights=null", f"device={device.type}",
                 f"data.num_workers={args.workers}", "data.cache_frozen_features=false",
                 "clustering.reuse_training_features=false", *size["overrides"]]
    config = load_config(args.preset, overrides)
    per_class = max(throughput.SYNTHETIC_IMAGES_PER_CLASS, config.sampler.images_per_class)
    dataset = throughput.synthetic_dataset(folder, config.data.image_size, size["classes"], per_class)
    from dcml.training.device import effective_precision

    precision = effective_precision(config.runtime.precision, device)
    report.put("training", "setup", {"preset": args.preset, "backbone": config.model.backbone, "image_size": config.data.image_size,
                                      "batch": config.sampler.classes_per_batch * config.sampler.images_per_class,
                                      "workers": args.workers, "warmup": size["warmup"], "steps": size["steps"]})
    variants = [
        ("configured", lambda: throughput.run_configured(config, dataset, size["warmup"], size["steps"]), precision),
        ("plain float32", lambda: throughput.run_plain(config, dataset, size["warmup"], size["steps"], device), "fp32"),
        ("device decode", lambda: device_decode_loop(config, dataset, size["warmup"], size["steps"], device), precision),
    ]
    if device.type == "cuda":  # compiling on the CPU only costs the tiny run its time
        compiled = load_config(args.preset, [*overrides, "runtime.compile=true"])
        variants.insert(1, ("configured + compile",
                            lambda: throughput.run_configured(compiled, dataset, size["warmup"], size["steps"]), precision))
    for name, run, row_precision in variants:
        if time.perf_counter() > budget_end:
            report.put("training", name, "skipped: section time budget spent")
            continue
        try:
            row = rates(run())
        except Exception as error:  # one variant failing must not cost the others' figures
            report.put("training", name, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            continue
        row.pop("device", None)
        row["precision"] = row_precision
        report.put("training", name, row)


def section_features(report, args, size, device) -> None:
    from dcml.model_runner import run_over_batches
    from dcml.models.embedding_model import build_model
    from dcml.training.device import autocast_for

    config = load_config(args.preset, ["model.pretrained=false", "model.weights=null", *size["overrides"]])
    model = build_model(config).to(device)
    if config.runtime.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    batch = config.runtime.feature_batch_size or config.data.eval_batch_size
    side = config.data.image_size
    host = torch.randn(batch, 3, side, side)
    if device.type == "cuda":
        host = host.pin_memory()
    autocast = autocast_for(config.runtime.precision, device)
    forward = model.backbone  # the re-clustering pass embeds with the backbone's pooled features
    run_over_batches([host] * 3, forward, device=device, model=model, autocast=autocast)  # warm-up, cuDNN autotuning
    throughput.synchronize(device)
    start = time.perf_counter()
    rows = run_over_batches([host] * size["feature_batches"], forward, device=device, model=model, autocast=autocast)
    seconds = time.perf_counter() - start
    report.put("features", "feature pass", {"images": len(rows), "seconds": seconds, "images_per_second": len(rows) / seconds,
                                             "batch": batch, "width": int(rows.shape[1])})


def clustered_embeddings(n: int, classes: int, dims: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, classes, n))
    centres = rng.normal(size=(classes, dims)).astype(np.float32)
    x = centres[labels] + 0.9 * rng.normal(size=(n, dims)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[1::997] = x[0::997][: len(x[1::997])]  # some exact duplicates: ties the engine must break the same way
    return x.astype(np.float32), labels


def section_evaluation(report, args, size, device) -> None:
    from dcml.evaluation.metrics import summarize_ranks
    from dcml.evaluation.ranks import positive_ranks

    x, labels = clustered_embeddings(size["eval_size"], size["eval_classes"], size["eval_dims"])
    ks = tuple(k for k in (1, 10, 100, 1000) if k <= size["rank_cap"])
    results = {}
    # Warm-up: the numba kernels compile on first use, which is not the engine's speed.
    positive_ranks(x[:300], labels[:300], x[:300], labels[:300], query_self_index=np.arange(300), rank_cap=10)
    for name, where in (("host", None), ("device", device)):
        start = time.perf_counter()
        ranks = positive_ranks(x, labels, x, labels, query_self_index=np.arange(len(x)), rank_cap=size["rank_cap"], device=where)
        seconds = time.perf_counter() - start
        results[name] = ranks
        metrics = {key: value for key, value in summarize_ranks(ranks, ks).items()}
        report.put("evaluation", name, {"seconds": seconds, "size": list(x.shape), "tile products on": str(where or "host"),
                                        **metrics})
    fields = ("num_positives", "first_rank", "average_precision_at_r", "r_precision")
    same = all(np.array_equal(getattr(results["host"], f), getattr(results["device"], f)) for f in fields)
    report.put("evaluation", "identical ranks", same)
    report.data["verdicts"]["evaluation device == host"] = "identical" if same else "DIFFERENT (a bug: see ranks.py)"
    report.write()
    if not same:
        raise SystemExit("evaluation on the device differs from the host path")


def section_study(report, args, remaining: float) -> None:
    # The study's full grid, several runs at once (a GPU has room for many emoji runs); a run
    # finished before the budget ends is kept in the folder, and `dnc_study.py --summarize` reads it.
    from dnc_study import VARIANTS

    command = [sys.executable, str(HERE / "dnc_study.py"), "--out", str(report.json.with_name(report.json.stem + "_study")),
               "--jobs", "6", "--threads", "2", "--variants", *VARIANTS]
    if args.tiny:
        command = [sys.executable, str(HERE / "dnc_study.py"), "--out", str(report.json.with_name(report.json.stem + "_study")),
                   "--seeds", "0", "--variants", "K1", "K4", "--settings", "all",
                   "--set", "schedule.epochs=1", "--set", "schedule.conquer_epoch=null"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(remaining, 1))
        report.put("study", "emoji K=1 vs D&C", {"rc": done.returncode, "tail": done.stdout[-2000:] or done.stderr[-2000:]})
    except subprocess.TimeoutExpired:
        report.put("study", "emoji K=1 vs D&C", f"stopped after {remaining:.0f} s (budget)")


def verdicts(report, device, config_ok: bool) -> None:
    rows = report.data["sections"].get("training", {})
    configured = [r for k, r in rows.items() if k != "plain float32" and isinstance(r, dict) and "images_per_second" in r]
    if not configured:
        return
    best = max(configured, key=lambda r: r["images_per_second"])
    name = next(k for k, r in rows.items() if r is best)
    applies = device.type == "cuda" and config_ok
    suffix = "" if applies else " (not judged: the target is for ResNet-50 at 224 px on CUDA)"
    report.data["verdicts"]["fastest training variant"] = f"{name}: {best['images_per_second']:.0f} images/s"
    report.data["verdicts"][f"{TARGET_IMAGES_PER_SECOND} images/s"] = (
        ("met" if best["images_per_second"] >= TARGET_IMAGES_PER_SECOND else "NOT met") + suffix)
    report.data["verdicts"][f"data wait under {100 * DATA_WAIT_LIMIT:.0f}%"] = (
        ("yes" if best["data_wait_share"] < DATA_WAIT_LIMIT else f"NO ({100 * best['data_wait_share']:.1f}%)") + suffix)
    report.write()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the script in well under a minute on the CPU")
    parser.add_argument("--preset", default="cub200")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the CPU count, at most 12)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--with-study", action="store_true", help="then the emoji study for the time left of --total")
    parser.add_argument("--total", type=float, default=480, help="seconds for everything (the study gets what is left)")
    parser.add_argument("--budget-training", type=float, default=300, help="seconds: no new training variant starts after")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.workers is None:
        args.workers = 0 if args.tiny else min(os.cpu_count() or 1, 12)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    size = sizes(args)
    report = Report(args.out, device, args.tiny)
    with tempfile.TemporaryDirectory(prefix="dcml-gpu-bench-") as folder:
        section_training(report, args, size, device, Path(folder))
    section_features(report, args, size, device)
    section_evaluation(report, args, size, device)
    config = load_config(args.preset, size["overrides"])
    verdicts(report, device, config.model.backbone == "resnet50" and config.data.image_size == 224)
    if args.with_study:
        section_study(report, args, args.total - (time.perf_counter() - started))
    report.data["seconds"] = time.perf_counter() - started
    report.write()
    print(f"wrote {report.txt} and {report.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

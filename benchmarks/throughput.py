"""Training throughput: dcml's configured pipeline vs a plain float32 loop, in the same run.

    python benchmarks/throughput.py                          # cub200 preset (ResNet-50, 224 px, 20 x 4)
    python benchmarks/throughput.py --preset sop-tpami --steps 50
    python benchmarks/throughput.py --set runtime.compile=true

Both contenders train the preset's model (random weights: speed does not depend on them) with the
preset's batch (P x M) and augmentation on synthetic JPEG images of the preset's size, decoded and
augmented by DataLoader workers as real images would be:

- **configured**: dcml's own training step (``Trainer.train_epoch``): bf16 autocast and
  channels-last on CUDA, optional torch.compile, one long-lived loader with pinned memory and
  persistent workers, no per-step host synchronisation;
- **plain**: the textbook loop: float32, default memory format, a DataLoader with the same workers
  but no pinning, ``loss.item()`` every step.

Each runs ``--warmup`` batches first (worker start-up, cuDNN autotuning, compilation), then
``--steps`` timed batches. Prints training images per second of both, the ratio, and the share of
step time spent waiting for the next batch. On the CPU the configured pipeline is float32 too
(bf16 and channels-last apply on CUDA only), so the ratio there should be about 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from dcml.config import load_config  # noqa: E402
from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split  # noqa: E402
from dcml.training.trainer import Trainer  # noqa: E402

#: H100 target for ResNet-50 at 224 px (issue 4): training images per second, and at most this
#: share of step time waiting for data ("the data loader is not the bottleneck").
GPU_TARGET_IMAGES_PER_SECOND = 2_500
DATA_WAIT_LIMIT = 0.10
SYNTHETIC_CLASSES = 200
SYNTHETIC_IMAGES_PER_CLASS = 8


def write_synthetic_images(folder: Path, image_size: int, count: int, seed: int = 0) -> list[Path]:
    """``count`` noisy JPEGs of about the size the preset resizes from (short side image_size x 256/224)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = round(image_size * 256 / 224)
    paths = []
    base = rng.integers(0, 256, size=(side, round(side * 4 / 3), 3), dtype=np.uint8)
    for index in range(count):
        # Smooth colour fields plus noise: JPEG sizes and decode times close to photographs.
        shift = rng.integers(0, 256, size=3, dtype=np.uint8)
        pixels = (base // 2 + shift // 2 + rng.integers(0, 16, size=base.shape, dtype=np.uint8)).astype(np.uint8)
        path = folder / f"{index:05d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def synthetic_dataset(folder: Path, image_size: int, classes: int, per_class: int) -> Dataset:
    paths = write_synthetic_images(folder, image_size, classes * per_class)
    labels = np.repeat(np.arange(classes), per_class)
    train = Split("train", tuple(paths), labels)
    small = Split("val", tuple(paths[: 4 * per_class]), labels[: 4 * per_class])
    spec = EvaluationSpec(Protocol.LEAVE_ONE_OUT, (1,), ("test",))
    return Dataset("synthetic", folder, {"train": train, "val": small, "test": small}, spec)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_batches_per_epoch(config, batches: int):
    """A copy of the (frozen) configuration whose epochs run ``batches`` batches."""
    return dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, batches_per_epoch=batches))


def run_configured(config, dataset: Dataset, warmup: int, steps: int) -> dict:
    """dcml's trainer step: one warm-up epoch of ``warmup`` batches, one timed epoch of ``steps``."""
    from dcml.clustering import cluster_training_set
    from dcml.training.schedule import DIVIDE

    trainer = Trainer(config, None, progress=False, echo=lambda message: None, dataset=dataset)
    plan = trainer.plans[0]
    assert plan.phase == DIVIDE
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(trainer.train_labels), 16)).astype(np.float32)
    trainer.clustering = cluster_training_set(features, trainer.train_labels, plan.active_learners, iterations=5, seed=0)
    trainer.config = with_batches_per_epoch(trainer.config, warmup)
    trainer.train_epoch(plan)
    trainer.config = with_batches_per_epoch(trainer.config, steps)
    synchronize(trainer.device)
    start = time.perf_counter()
    record = trainer.train_epoch(plan)  # reads the summed loss at the end: waits for the GPU
    synchronize(trainer.device)
    seconds = time.perf_counter() - start
    return {"images": record["images"], "seconds": seconds, "data_wait_seconds": record["data_wait_seconds"],
            "device": str(trainer.device)}


def run_plain(config, dataset: Dataset, warmup: int, steps: int, device: torch.device) -> dict:
    """A plain float32 loop over the same images, model, batch size and loss."""
    from dcml.losses import build_loss
    from dcml.models.embedding_model import build_model
    from dcml.training.inputs import _EvalImages

    d, s, lo = config.data, config.sampler, config.loss
    model = build_model(config).to(device)
    model.train()
    transform = model.backbone.train_transform(d.image_size, horizontal_flip=d.train_augmentation == "crop_flip")
    split = dataset.split("train")
    images = _EvalImages(split, transform)
    batch = s.classes_per_batch * s.images_per_class
    loader = torch.utils.data.DataLoader(images, batch_size=batch, shuffle=True, num_workers=d.num_workers, drop_last=True)
    loss_fn = build_loss("margin", dataclasses.replace(lo.settings, beta_mode="fixed"), num_learners=1,
                         num_classes=SYNTHETIC_CLASSES).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=1e-4)
    labels_all = torch.as_tensor(split.labels)
    iterator = iter(loader)
    seen, wait, start = 0, 0.0, None
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start, seen, wait = time.perf_counter(), 0, 0.0
        wait_start = time.perf_counter()
        try:
            inputs, indices = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            inputs, indices = next(iterator)
        wait += time.perf_counter() - wait_start
        inputs, labels = inputs.to(device), labels_all[indices].to(device)
        loss = loss_fn(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        seen += len(inputs)
    synchronize(device)
    return {"images": seen, "seconds": time.perf_counter() - start, "data_wait_seconds": wait}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cub200")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the preset's, at most the CPU count)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default: 10 on CUDA, 1 on the CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed batches (default: 50 on CUDA, 3 on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    cuda = args.device != "cpu" and torch.cuda.is_available()
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    steps = args.steps if args.steps is not None else (50 if cuda else 3)
    base = load_config(args.preset, ["model.pretrained=false", "model.weights=null", f"device={args.device}", *args.overrides])
    workers = args.workers if args.workers is not None else min(base.data.num_workers, os.cpu_count() or 1)
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    overrides = ["model.pretrained=false", "model.weights=null", f"device={args.device}", f"data.num_workers={workers}",
                 "data.cache_frozen_features=false", "clustering.reuse_training_features=false", *args.overrides]
    config = load_config(args.preset, overrides)
    per_class = max(SYNTHETIC_IMAGES_PER_CLASS, config.sampler.images_per_class)
    with tempfile.TemporaryDirectory(prefix="dcml-throughput-") as folder:
        dataset = synthetic_dataset(Path(folder), config.data.image_size, SYNTHETIC_CLASSES, per_class)
        configured = run_configured(config, dataset, warmup, steps)
        device = torch.device(configured["device"])
        plain = run_plain(load_config(args.preset, overrides), dataset, warmup, steps, device)

    rows = {"configured": configured, "plain float32": plain}
    print(f"{args.preset}: {config.model.backbone} at {config.data.image_size} px, batch "
          f"{config.sampler.classes_per_batch} x {config.sampler.images_per_class}, {workers} loader workers, "
          f"{steps} timed batches after {warmup} warm-up, on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({os.cpu_count()} CPU cores)"))
    print(f"{'pipeline':<16}{'images/s':>12}{'data wait':>12}")
    for name, row in rows.items():
        row["images_per_second"] = row["images"] / row["seconds"]
        row["data_wait_share"] = row["data_wait_seconds"] / row["seconds"]
        print(f"{name:<16}{row['images_per_second']:>12.1f}{100 * row['data_wait_share']:>11.1f}%")
    ratio = configured["images_per_second"] / plain["images_per_second"]
    print(f"ratio configured / plain: {ratio:.2f}x")
    if device.type == "cuda" and config.model.backbone == "resnet50" and config.data.image_size == 224:
        met = configured["images_per_second"] >= GPU_TARGET_IMAGES_PER_SECOND
        loader_ok = configured["data_wait_share"] <= DATA_WAIT_LIMIT
        print(f"target {GPU_TARGET_IMAGES_PER_SECOND} images/s: {'met' if met else 'NOT met'}; data loader "
              f"{'not the bottleneck' if loader_ok else 'IS the bottleneck'} (wait {100 * configured['data_wait_share']:.1f}% "
              f"of step time, limit {100 * DATA_WAIT_LIMIT:.0f}%)")
    if args.json:
        payload = {"preset": args.preset, "device": str(device), "workers": workers, "warmup": warmup, "steps": steps,
                   "ratio": ratio, **rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What `dcml serve` costs over doing the same in process, and onnxruntime against torch on the CPU.

1. Requests/s and p50 / p99 latency at 1, 8 and 32 concurrent clients: each request one image,
   k = 10, against `dcml serve` (its own process, on loopback), beside the same images through
   `load_model` + `Index.search` in this process with as many threads. Their ratio is the service's
   overhead. At 8 clients the run makes --requests requests (default 10,000) and reports errors
   and the server's resident memory before and after.
2. Embedding latency of one batch through torch (`load_model`) and through onnxruntime (the file
   `dcml export --format onnx` writes).

The model is efficientnet_lite0 (ImageNet weights from its pip package) with an untrained 128-d,
4-learner head: speed does not depend on the head's training. Bounded loops, loopback only; one
run, ratios within it, not a timed test.

    make bench-serve                                  # ~5 minutes on 2 CPU cores
    python benchmarks/serve.py --requests 2000        # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CONCURRENCY = (1, 8, 32)


def _write_images(root: Path, classes: int, per_class: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(classes):
            folder = root / split / f"{split}{c:03d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)  # smooth, photo-like JPEGs
                Image.fromarray(coarse).resize((size + 40, size + 24), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=90)


def make_run(work: Path, image_size: int) -> tuple[Path, Path]:
    """(run folder with an untrained-head checkpoint, image folder)."""
    from dcml.config import load_config
    from dcml.training import checkpoint as ckpt
    from dcml.training.trainer import Trainer

    root = work / "images"
    _write_images(root, classes=16, per_class=16, size=image_size)
    config = load_config(None, ["data.dataset=folder", f"data.root={root}", f"data.image_size={image_size}",
                                "model.backbone=efficientnet_lite0", "model.embedding_dim=128", "clustering.learners=4",
                                "device=cpu", "data.eval_batch_size=32", "sampler.classes_per_batch=4",
                                "sampler.images_per_class=2", "evaluation.selection_metric=leave_one_out/recall@1"])
    trainer = Trainer(config, None, progress=False, echo=lambda _: None)
    run = work / "run"
    run.mkdir()
    ckpt.save_checkpoint(run / ckpt.BEST, {"config": config.to_dict(), "model": trainer.model.state_dict(),
                                          "active_learners": trainer.active_learners})
    return run, root


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _drive(clients: int, requests: int, ask) -> dict:
    """``requests`` calls of ``ask(i)`` from ``clients`` threads; throughput, latencies, failures."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal failures
        state = {}
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            started = time.perf_counter()
            ok = ask(i, state)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                failures += not ok

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    seconds = time.perf_counter() - started
    p50, p99 = _percentiles(latencies)
    return {"rps": requests / seconds, "p50": p50, "p99": p99, "errors": failures, "requests": requests}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_process(index, paths: list[Path], clients: int, requests: int) -> dict:
    def ask(i: int, _state) -> bool:
        return len(index.search([paths[i % len(paths)]], k=10).ids[0]) == 10

    return _drive(clients, requests, ask)


def served(url: str, payloads: list[tuple[str, bytes]], clients: int, requests: int) -> dict:
    import httpx

    def ask(i: int, state) -> bool:
        if "client" not in state:
            # TCP_NODELAY, as curl and browsers set it: without it the body waits on the server's delayed ACK (~40 ms).
            transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
            state["client"] = httpx.Client(base_url=url, timeout=60, transport=transport)
        client = state["client"]
        name, data = payloads[i % len(payloads)]
        response = client.post("/search", params={"k": 10}, files=[("images", (name, data, "image/jpeg"))])
        return response.status_code == 200 and len(response.json()["queries"][0]["results"]) == 10

    return _drive(clients, requests, ask)


def start_server(index: Path) -> tuple[subprocess.Popen, str]:
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-m", "dcml", "serve", str(index), "--port", "0"],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    banner = child.stderr.readline()
    found = re.search(r"on (http://\S+) ", banner)
    if not found:
        try:
            rest = child.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            child.kill()
            rest = ""
        raise SystemExit(f"dcml serve did not start: {banner}{rest}")
    return child, found.group(1)


def service_figures(work: Path, run: Path, images: Path, requests: int, short: int) -> list[str]:
    import dcml
    from dcml.cli import main as dcml_main
    from dcml.inference import list_images

    index_folder = work / "index"
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the report
        assert dcml_main(["index", "build", "--model", str(run), "--images", str(images / "test"), "--out", str(index_folder),
                          "--no-progress"]) == 0
    paths = list_images(images / "test")
    payloads = [(p.name, p.read_bytes()) for p in paths]
    index = dcml.Index.load(index_folder, model=dcml.load_model(run))
    lines = [f"## 1. dcml serve vs in process: {len(paths)} indexed images, one image per request, k = 10",
             "| clients | requests | in process req/s | p50 ms | p99 ms | served req/s | p50 ms | p99 ms | served / in process | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    in_process(index, paths, 4, 64)  # warm both paths up before timing
    child, url = start_server(index_folder)
    memory = ""
    try:
        served(url, payloads, 4, 64)
        for clients in CONCURRENCY:
            count = requests if clients == 8 else short
            local = in_process(index, paths, clients, min(count, short))
            before = _rss_mb(child.pid)
            remote = served(url, payloads, clients, count)
            after = _rss_mb(child.pid)
            if clients == 8:
                memory = f"server memory (RSS) over the {count:,} requests at 8 clients: {before:.0f} MB before, {after:.0f} MB after"
            lines.append(f"| {clients} | {count:,} | {local['rps']:.1f} | {local['p50']:.1f} | {local['p99']:.1f} | "
                         f"{remote['rps']:.1f} | {remote['p50']:.1f} | {remote['p99']:.1f} | {remote['rps'] / local['rps']:.2f} | "
                         f"{remote['errors'] + local['errors']} |")
            print(lines[-1], file=sys.stderr, flush=True)
    finally:
        child.terminate()
        child.wait(60)
    return [*lines, "", memory]


def embedding_figures(work: Path, run: Path, batch: int, repeats: int) -> list[str]:
    import onnxruntime
    import torch

    import dcml
    from dcml.export import check_images, export_model, split_transform

    out = work / "model.onnx"
    report = export_model(run, "onnx", out, echo=lambda _: None)
    model = dcml.load_model(run)
    to_tensor, mean, std, _ = split_transform(model)
    images = check_images(model.image_size, batch, seed=1)
    pixels = torch.stack([to_tensor(image) for image in images])
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: pixels.numpy()}

    def timed(call) -> float:
        call()
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)
        return float(np.median(seconds) * 1000)

    lines = [f"## 2. embedding latency, CPU ({torch.get_num_threads()} torch threads), median of {repeats}; "
             f"export parity max abs {report.max_abs_difference:.1e}",
             "| batch | torch (load_model) ms | onnxruntime ms | onnxruntime / torch |", "|---:|---:|---:|---:|"]
    for size in (1, batch):
        torch_ms = timed(lambda s=size: model.embed_tensors(normalised[:s]))
        ort_ms = timed(lambda s=size: session.run(None, {name: value[:s] for name, value in feeds.items()}))
        lines.append(f"| {size} | {torch_ms:.1f} | {ort_ms:.1f} | {ort_ms / torch_ms:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000, help="requests at 8 clients (default: %(default)s)")
    parser.add_argument("--short", type=int, default=1_000, help="requests at 1 and 32 clients and in process (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=96, help="the run's image size (default: %(default)s, emoji's)")
    parser.add_argument("--batch", type=int, default=32, help="batch for the embedding latency (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dcml-bench-serve-") as tmp:
        work = Path(tmp)
        run, images = make_run(work, args.image_size)
        lines = [f"# dcml serve benchmark: efficientnet_lite0 at {args.image_size} px, 128-d, {os.cpu_count()} CPU cores", ""]
        lines += service_figures(work, run, images, args.requests, args.short)
        lines += ["", *embedding_figures(work, run, args.batch, args.repeats)]
    lines += ["", f"total {time.perf_counter() - started:.0f} s"]
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

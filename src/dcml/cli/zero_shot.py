"""`dcml zero-shot`: how well a pretrained backbone retrieves before any metric learning."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dcml.backends import DEFAULT_KMEANS_SEED
from dcml.cli.arguments import batch_size_int, image_size_int, seed_int, workers_int
from dcml.cli.embed import DEFAULT_BACKBONE


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "zero-shot",
        help="evaluate a pretrained backbone's features (no training) under the dataset's protocol",
        description="Embed the dataset's test data with a pretrained backbone (pooled features, "
        "L2-normalised) and print the metrics of the dataset's own protocol: for emoji, "
        "leave-one-out and cross-vendor (a query never retrieves its own vendor's images).",
    )
    parser.add_argument("--dataset", default="emoji", help="dataset name (default: %(default)s; see `dcml data list`)")
    parser.add_argument("--root", type=Path, default=None, help="dataset folder (emoji: the cache dir)")
    parser.add_argument("--split", default=None, help="evaluate this split instead of the protocol's test data")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone name (default: %(default)s)")
    parser.add_argument("--weights", type=Path, default=None, help="load backbone weights from this file")
    parser.add_argument("--image-size", type=image_size_int, default=None, help="test resolution (default: the backbone's)")
    parser.add_argument("--batch-size", type=batch_size_int, default=64)
    parser.add_argument("--workers", type=workers_int, default=0, help="DataLoader worker processes")
    parser.add_argument("--seed", type=seed_int, default=DEFAULT_KMEANS_SEED, help="seed of NMI's k-means and VehicleID's galleries (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from dcml.data import load_dataset
    from dcml.model_runner import extract_embeddings
    from dcml.evaluation.runner import evaluate_dataset, format_table
    from dcml.atomic_files import json_text, save_json_atomically
    from dcml.models.backbones import create_backbone

    start = time.perf_counter()
    dataset = load_dataset(args.dataset, args.root)
    backbone = create_backbone(args.backbone, pretrained=True, weights=args.weights)
    transform = backbone.test_transform(args.image_size)

    def embed(split):
        embeddings, _ = extract_embeddings(backbone, split, transform, batch_size=args.batch_size, num_workers=args.workers)
        return embeddings

    rows = evaluate_dataset(dataset, embed, split=args.split, seed=args.seed)
    seconds = time.perf_counter() - start
    size = args.image_size or backbone.input_size
    payload = {"dataset": dataset.name, "backbone": args.backbone, "image_size": size, "seconds": seconds, "metrics": rows}
    if args.out is not None:
        save_json_atomically(args.out, payload)
    if args.json:
        print(json_text(payload))
        return 0
    split_names = args.split or "+".join(dataset.evaluation.splits)
    print(f"zero-shot {args.backbone} ({size} px) on {dataset.name} {split_names} ({seconds:.0f} s); metrics in %")
    print(format_table(rows, dataset.evaluation.recall_ks))
    return 0

"""`dcml dedup`: groups of near-duplicate images, as JSON ``{file: [duplicates]}``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcml.atomic_files import json_text


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dedup", help="find groups of near-duplicate images with a trained model",
        description="Embed every image under --images and group those within a distance threshold of each "
        "other (connected groups). The threshold is a distance, or a calibrated name (precision@0.99, f1) "
        "read from --calibration; by default precision@0.99 calibrated on the run's validation classes.",
    )
    parser.add_argument("--model", type=Path, required=True, metavar="RUN")
    parser.add_argument("--images", type=Path, required=True, metavar="DIR")
    parser.add_argument("--threshold", default="precision@0.99", metavar="T",
                        help="a distance or a calibrated name (default: %(default)s)")
    parser.add_argument("--calibration", type=Path, default=None, metavar="C.json",
                        help="calibration file of dcml calibrate --out (default: calibrate on the run's validation split)")
    parser.add_argument("--out", type=Path, default=None, metavar="D.json", help="write the groups here instead of stdout")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.set_defaults(handler=_dedup)


def _threshold(args, model):
    from dcml.search.calibration import resolve_threshold
    from dcml.search.storage import read_json

    try:
        float(args.threshold)
    except ValueError:
        pass  # a calibrated name, resolved below
    else:  # a distance: a bad one is refused here, before any calibration runs
        return resolve_threshold(args.threshold, None)
    if args.calibration is not None:
        calibration = read_json(args.calibration.expanduser(), "calibration")
        if not isinstance(calibration, dict) or calibration.get("model_sha256") != model.sha256:
            from dcml.errors import UserError

            raise UserError(f"{args.calibration} was not calibrated with {model.checkpoint}; run dcml calibrate --model again")
    else:
        from dcml.cli.calibrate import calibration_split, run_calibration

        precisions = [float(args.threshold.partition("@")[2])] if args.threshold.startswith("precision@") else [0.99]
        split, _ = calibration_split(model, None, None, None)
        calibration, _ = run_calibration(model, split, precisions)
    return resolve_threshold(args.threshold, calibration)


def _dedup(args: argparse.Namespace) -> int:
    import sys

    from dcml.inference import list_images, load_model
    from dcml.atomic_files import refuse_to_overwrite, save_json_atomically
    from dcml.search.dedup import duplicate_groups, duplicates_by_file

    if args.out is not None:
        refuse_to_overwrite([args.out], args.overwrite, what="duplicate groups")
    model = load_model(args.model, device=args.device, progress=args.progress)
    name, threshold = _threshold(args, model)
    paths = list_images(args.images)
    embedded = model.embed_paths_tolerant(paths)
    readable = [p for p, ok in zip(paths, embedded.readable) if ok]
    groups = duplicates_by_file(readable, duplicate_groups(embedded.embeddings, threshold))
    for path, ok in zip(paths, embedded.readable):
        if not ok:
            print(f"dcml: warning: skipped unreadable image {path}", file=sys.stderr)
    if args.out is not None:
        save_json_atomically(args.out, groups)
        print(f"{len(groups)} groups of near-duplicates among {len(readable)} images (threshold {name} = {threshold:.4f}) -> {args.out}")
    else:
        print(json_text(groups, indent=1))
    return 0

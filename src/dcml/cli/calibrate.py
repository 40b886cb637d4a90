"""`dcml calibrate`: distance thresholds for "same class or not" from a labelled split."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcml.atomic_files import json_text


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a precision in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a precision in (0, 1], got {value}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="distance thresholds reaching a target precision, F1-optimal, FNMR@FMR, PR curve",
        description="Embed a labelled split with a trained model (default: the run's validation classes), "
        "treat every pair of images as a same-class-or-not decision and report the Euclidean distance "
        "thresholds that reach each target precision, the F1-optimal one and an FNMR@FMR table. With "
        "--index the thresholds are stored with the index, for dcml query --threshold precision@0.95.",
    )
    parser.add_argument("--model", type=Path, required=True, metavar="RUN")
    parser.add_argument("--dataset", default=None, metavar="NAME", help="dataset (default: the run's)")
    parser.add_argument("--root", type=Path, default=None, metavar="DIR")
    parser.add_argument("--split", default=None, metavar="SPLIT", help="labelled split (default: the run's validation classes)")
    parser.add_argument("--precision", type=_fraction, nargs="+", default=[0.9, 0.95, 0.99], metavar="P",
                        help="target precisions (default: 0.9 0.95 0.99)")
    parser.add_argument("--index", type=Path, default=None, metavar="INDEX", help="store the thresholds with this index")
    parser.add_argument("--out", type=Path, default=None, metavar="C.json", help="also write the calibration here")
    parser.add_argument("--plot", type=Path, default=None, metavar="PR.png", help="draw the precision-recall curve")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out / --plot files and the index's calibration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.set_defaults(handler=_calibrate)


def calibration_split(model, dataset: str | None, root: Path | None, split: str | None):
    """The labelled split to calibrate on: the given one, or the run's validation split."""
    from dcml.data import load_dataset
    from dcml.training.trainer import prepare_dataset

    if dataset is None and root is None:
        data = prepare_dataset(model.config)  # carves the run's validation classes where the dataset has none
        return data.split(split or "val"), f"{model.config.data.dataset}/{split or 'val'}"
    name = dataset or model.config.data.dataset
    return load_dataset(name, root).split(split or "val"), f"{name}/{split or 'val'}"


def run_calibration(model, split, precisions) -> tuple[dict, object]:
    from dcml.search.calibration import calibrate

    embeddings = model.embed_split(split)
    report, op = calibrate(embeddings, split.labels, tuple(precisions))
    report.update(model_sha256=model.sha256, model_checkpoint=str(model.checkpoint), images=split.num_images)
    return report, op


def _calibrate(args: argparse.Namespace) -> int:
    from dcml.inference import load_model
    from dcml.atomic_files import refuse_to_overwrite, save_json_atomically
    from dcml.search.calibration import plot_precision_recall
    from dcml.search.index import CALIBRATION_FILE, Index

    outputs = [p for p in (args.out, args.plot) if p is not None]
    index = Index.load(args.index) if args.index is not None else None
    if index is not None:
        outputs.append(index.folder / CALIBRATION_FILE)
    refuse_to_overwrite(outputs, args.overwrite, what="calibration")
    model = load_model(args.model, device=args.device, progress=args.progress)
    if index is not None:
        index.use_model(model)  # thresholds of another model would be meaningless for this index
    split, source = calibration_split(model, args.dataset, args.root, args.split)
    report, op = run_calibration(model, split, args.precision)
    report["source"] = source
    for path in ([args.out] if args.out else []) + ([index.folder / CALIBRATION_FILE] if index is not None else []):
        save_json_atomically(path, report)
    if args.plot is not None:
        plot_precision_recall(op, args.plot, report["thresholds"])
    if args.json:
        print(json_text(report))
        return 0
    print(f"calibrated on {source}: {report['images']} images, {report['matching_pairs']} matching / "
          f"{report['non_matching_pairs']} non-matching pairs (Euclidean distance, L2-normalised)")
    for name, point in report["thresholds"].items():
        if point is None:
            print(f"  {name:<16} not reached")
        else:
            print(f"  {name:<16} distance <= {point['distance']:.4f}  precision {point['precision']:.3f}  recall {point['recall']:.3f}")
    print("  FNMR@FMR: " + ", ".join(f"{row['fnmr']:.3f} @ {row['fmr_target']:g}" for row in report["fnmr_at_fmr"]))
    if index is not None:
        print(f"stored with {index.folder}: dcml query {index.folder} IMAGE --threshold precision@0.95")
    return 0

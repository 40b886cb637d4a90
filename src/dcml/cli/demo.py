"""`dcml demo`: the single-metric baseline and divide and conquer side by side on emoji."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcml.cli.arguments import positive_int, seed_int


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train K = 1 and divide and conquer on the emoji benchmark and compare them (CPU, minutes)",
        description="On the offline emoji benchmark, train the single-metric baseline (K = 1) and "
        "divide and conquer (K learners) with the same preset, backbone and budget, and print a "
        "side-by-side table (cross-vendor and leave-one-out Recall@K, MAP@R, NMI on the test classes) "
        "with the pretrained backbone's zero-shot row, and D&C minus K = 1 on R@1 and MAP@R with a 95% "
        "interval (a paired bootstrap over the test classes) saying whether it is distinguishable from zero. Writes DIR/results.json, DIR/results.md, DIR/curves.png (validation score per epoch) and "
        "each run's folder (DIR/baseline, DIR/dnc).",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test (a few minutes on two cores): a budget too short for the conquer phase "
                        "to pay off, so its D&C vs K = 1 comparison is not a verdict")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: %(default)s)")
    parser.add_argument("--learners", type=positive_int, default=4, help="K for divide and conquer (default: %(default)s)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of both runs (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of both runs, e.g. --set clustering.unit=class")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo's files in --out")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from dcml.demo import run_demo
    from dcml.training.stopping import TrainingStopped

    try:
        payload = run_demo(args.out, quick=args.quick, learners=args.learners, seed=args.seed, overrides=args.overrides,
                           progress=not args.no_progress and sys.stderr.isatty(), echo=lambda m: print(m, flush=True),
                           overwrite=args.overwrite)
    except TrainingStopped as stopped:
        print(f"dcml: stopped by {stopped.signal_name}; the demo is incomplete (run it again with --overwrite)", file=sys.stderr)
        return stopped.exit_code
    print()
    print((args.out / "results.md").read_text().rstrip())
    print(f"\nwrote {args.out}/results.json and {args.out}/results.md ({payload['seconds']:.0f} s)")
    return 0

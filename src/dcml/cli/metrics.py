"""`dcml metrics`: retrieval and clustering metrics for anyone's embeddings."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dcml.backends import DEFAULT_KMEANS_SEED
from dcml.cli.arguments import seed_int
from dcml.errors import UserError

DEFAULT_KS = "1,2,4,8"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "metrics",
        help="Recall@K, MAP@R, R-Precision, Precision@1 and NMI for embeddings in .npy files",
        description="Exact retrieval and clustering metrics on any embeddings, in bounded memory. "
        "Without --query-mask every row queries all other rows (leave-one-out); with it, query rows "
        "are searched against the non-query rows only. Distances are Euclidean on the vectors as given.",
    )
    parser.add_argument("--embeddings", type=Path, required=True, help="float array, rows x dims (.npy)")
    parser.add_argument("--labels", type=Path, required=True, help="integer class label per row (.npy)")
    parser.add_argument("--query-mask", type=Path, default=None, help="boolean per row, True = query (.npy)")
    parser.add_argument(
        "--groups",
        type=Path,
        default=None,
        help="integer group per row (.npy): a query never retrieves rows of its own group "
        "(cross-vendor protocol; re-identification's same-camera rule)",
    )
    parser.add_argument("--ks", default=DEFAULT_KS, help="comma-separated K values for Recall@K (default: %(default)s)")
    parser.add_argument("--no-nmi", action="store_true", help="skip NMI (its k-means is the slowest part)")
    parser.add_argument("--backend", default="auto", choices=("auto", "faiss", "torch"), help="k-means backend for NMI")
    parser.add_argument("--seed", type=seed_int, default=DEFAULT_KMEANS_SEED, help="k-means seed for NMI (default: %(default)s, faiss's own)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the Recall@K curve for K = 1..max(--ks) (.png or .pdf)")
    parser.set_defaults(handler=_run)


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--ks must be comma-separated positive integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--ks must be comma-separated positive integers, got {text!r}")
    return ks


def load_array(path: Path, what: str) -> np.ndarray:
    """np.load with one-line errors (missing file, not an .npy, pickled objects)."""
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"cannot read {what} file {path} as .npy: {error}") from None


def _run(args: argparse.Namespace) -> int:
    from dcml.evaluation.metrics import NMI, NUM_EXCLUDED, NUM_QUERIES, evaluate_with_ranks, nmi, recall_curve
    from dcml.atomic_files import json_text

    ks = parse_ks(args.ks)
    embeddings = load_array(args.embeddings, "embeddings")
    labels = load_array(args.labels, "labels")
    query_mask = load_array(args.query_mask, "query mask") if args.query_mask else None
    groups = load_array(args.groups, "groups") if args.groups else None
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".pdf"):
        raise UserError(f"--plot must name a .png or .pdf file, got {args.plot}")
    if args.plot is not None:
        from dcml.atomic_files import refuse_to_overwrite

        refuse_to_overwrite([args.plot], args.overwrite, what="Recall@K plot")
    result, ranks = evaluate_with_ranks(
        embeddings,
        labels,
        ks=ks,
        query_mask=query_mask,
        groups=groups,
        with_nmi=False,  # after the check below: no k-means for a report that cannot be made
    )
    if result[NUM_QUERIES] == 0:
        # Every retrieval metric averages over queries with a positive; with none they have no value.
        raise UserError("no query has a positive reference (a row of its class it may retrieve: labels all "
                        "distinct, or --query-mask / --groups leave none), so Recall@K and MAP@R are undefined")
    if not args.no_nmi:
        result[NMI] = nmi(embeddings, labels, backend=args.backend, seed=args.seed)
    protocol = "query vs gallery" if query_mask is not None else "leave-one-out"
    if groups is not None:
        protocol += ", excluding the query's own group"
    if args.plot is not None:
        from dcml.plots import plot_recall_curves

        plot_recall_curves({protocol: recall_curve(ranks)}, args.plot, title=f"Recall@K: {args.embeddings.name}")
    if args.json:
        print(json_text(result))
        return 0
    print(f"{len(labels)} rows, {len(np.unique(labels))} classes, {protocol}")
    for key, value in result.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<22} {shown}")
    if NMI not in result:
        print("  (NMI skipped)")
    if result[NUM_EXCLUDED]:
        print(f"  ({result[NUM_EXCLUDED]} queries without a positive reference are left out of the retrieval metrics)")
    return 0

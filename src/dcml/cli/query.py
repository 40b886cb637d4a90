"""`dcml query INDEX IMAGE...`: the nearest indexed items of each query image (or embedding)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcml.cli.arguments import int_in_range
from dcml.atomic_files import json_text

#: Results per query at most: beyond this a listing is a dump of the index, not a search.
MAX_K = 10_000


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "query", help="search an index with images or embeddings",
        description="Rank the items of an index by distance to each query image (embedded with the index's "
        "model; a different model is refused) or each row of --embeddings. Prints rank, path, label and "
        "distance; --threshold marks matches and answers 'no match' when none is close enough. An "
        "unreadable query image is reported on its own; the other queries are still answered.",
    )
    parser.add_argument("index", type=Path, metavar="INDEX")
    parser.add_argument("images", type=Path, nargs="*", metavar="IMAGE", help="query image files")
    parser.add_argument("--embeddings", type=Path, default=None, metavar="Q.npy", help="query with these N x D embeddings")
    parser.add_argument("-k", type=int_in_range(1, MAX_K, f"k in 1..{MAX_K}"), default=10, help="results per query (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=None, metavar="RUN",
                        help="the index's model (default: the checkpoint its manifest names); checked by sha256")
    parser.add_argument("--threshold", default=None, metavar="T",
                        help="a distance, or a calibrated name: precision@0.95, f1 (see dcml calibrate)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--grid", type=Path, default=None, metavar="PNG", help="draw the results as a thumbnail grid")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.set_defaults(handler=_query)


def _query_vectors(args, index):
    """(names, vectors of the answerable queries, per-query error or None)."""
    import numpy as np

    from dcml.errors import UserError

    if args.embeddings is not None:
        if args.images:
            raise UserError("give query images or --embeddings, not both")
        path = args.embeddings.expanduser()
        if not path.is_file():
            raise UserError(f"query embeddings {path} not found")
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read query embeddings {path}: {str(error).splitlines()[0]}") from None
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != index.dimension:
            raise UserError(f"query embeddings {path} have shape {vectors.shape}; the index holds {index.dimension}-d vectors")
        return [f"{path}[{i}]" for i in range(len(vectors))], vectors, [None] * len(vectors)
    if not args.images:
        raise UserError("give query images (or --embeddings Q.npy)")
    if args.model is not None:
        from dcml.inference import load_model

        index.use_model(load_model(args.model, device=args.device))
    model = index.model()
    embedded = model.embed_paths_tolerant(args.images)
    errors = [None if ok else _reason(path) for path, ok in zip(args.images, embedded.readable)]
    return [str(p) for p in args.images], embedded.embeddings, errors


def _reason(path: Path) -> str:
    from dcml.data.images import load_rgb
    from dcml.errors import UserError

    try:
        load_rgb(path)
    except UserError as error:
        return str(error).splitlines()[0]
    return f"cannot embed image {path}"


def answer(index, names, vectors, errors, k: int, threshold) -> list[dict]:
    """One JSON-ready record per query, in order; failed queries carry their error and no results."""
    result = index.search_vectors(vectors, k) if len(vectors) else None
    records, row = [], 0
    label_of = {path: label for path, label in zip(index.items.paths, index.items.labels)}
    for name, error in zip(names, errors):
        record = {"query": name, "error": error, "results": [], "match": None}
        if error is None:
            query_label = label_of.get(str(Path(name).resolve())) if not name.endswith("]") else None
            for rank, (item, distance) in enumerate(zip(result.ids[row], result.distances[row]), start=1):
                if item < 0:
                    continue
                entry = {"rank": rank, "id": int(item), "path": index.items.paths[item], "label": index.items.labels[item],
                         "group": index.items.groups[item], "distance": float(distance)}
                if threshold is not None:
                    entry["match"] = bool(distance <= threshold[1])
                if query_label is not None and entry["label"] is not None:
                    entry["same_label"] = entry["label"] == query_label
                record["results"].append(entry)
            if threshold is not None:
                record["match"] = any(entry["match"] for entry in record["results"])
            row += 1
        records.append(record)
    return records


def _query(args: argparse.Namespace) -> int:
    from dcml.errors import UserError
    from dcml.atomic_files import refuse_to_overwrite
    from dcml.search.calibration import resolve_threshold
    from dcml.search.index import Index

    if args.grid is not None:
        refuse_to_overwrite([args.grid], args.overwrite, what="grid picture")
    index = Index.load(args.index)
    index.check_k(args.k)
    threshold = resolve_threshold(args.threshold, index.calibration() if args.threshold is not None else None)
    names, vectors, errors = _query_vectors(args, index)
    if all(error is not None for error in errors):
        raise UserError(errors[0] if len(errors) == 1 else f"no query could be read ({errors[0]}, ...)")
    records = answer(index, names, vectors, errors, args.k, threshold)
    if args.grid is not None:
        _draw(args.grid, records)
    if args.json:
        print(json_text({"index": str(index.folder), "k": args.k, "distance": index.manifest.get("distance"),
                          "threshold": None if threshold is None else {"name": threshold[0], "distance": threshold[1]},
                          "queries": records}))
    else:
        _print(records, threshold)
    for record in records:
        if record["error"] is not None and not args.json:
            print(f"dcml: warning: query {record['query']}: {record['error']}", file=sys.stderr)
    return 0


def _print(records, threshold) -> None:
    for record in records:
        if record["error"] is not None:
            continue
        verdict = ""
        if threshold is not None:
            verdict = f"  [{'match' if record['match'] else 'no match'} at {threshold[0]} = {threshold[1]:.4f}]"
        print(f"query {record['query']}{verdict}")
        for entry in record["results"]:
            label = "-" if entry["label"] is None else entry["label"]
            mark = ("  match" if entry["match"] else "") if threshold is not None else ""
            print(f"  {entry['rank']:>3}  {entry['distance']:.4f}  label {label}  {entry['path']}{mark}")


def _draw(out: Path, records) -> None:
    import numpy as np

    from dcml.search.grid import draw_retrieval_grid

    answered = [r for r in records if r["error"] is None]
    k = max(len(r["results"]) for r in answered)
    distances = np.array([[e["distance"] for e in r["results"]] + [np.nan] * (k - len(r["results"])) for r in answered])
    correct = [[e.get("same_label") for e in r["results"]] for r in answered]
    draw_retrieval_grid(out, [r["query"] for r in answered], [[e["path"] for e in r["results"]] for r in answered],
                        distances, correct, captions=[Path(r["query"]).name for r in answered])

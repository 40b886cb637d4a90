"""`dcml index build|add|info|rebuild`: a searchable index folder of a trained model's embeddings."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcml.cli.arguments import batch_size_int, int_in_range, workers_int
from dcml.atomic_files import json_text


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help="build, extend and inspect a search index of a trained model's embeddings",
        description="An index folder holds a faiss index, the items table (row -> path, label, group), "
        "the embeddings and a manifest (dcml version, the model checkpoint's sha256, dimension, distance, "
        "kind and parameters, item count, times). Builds go to a temporary folder renamed into place.",
    )
    commands = parser.add_subparsers(dest="index_command", metavar="ACTION")
    commands.required = True

    build = commands.add_parser("build", help="embed images with a trained model and index them",
                                description="Embed a folder (--images) or a dataset split with a trained model and "
                                "write an index folder. Exact search (--kind flat) is the default and ranks as "
                                "evaluation does; approximate kinds report their measured Recall@10 against exact search. Under "
                                "torchrun (torchrun --nproc_per_node N -m dcml index build ... --device cuda) each rank "
                                "embeds its share of the images on GPU LOCAL_RANK and rank 0 builds the one index; on "
                                "several nodes --out must be on a file system every node shares.")
    build.add_argument("--model", type=Path, required=True, metavar="RUN", help="trained run folder or dcml checkpoint")
    _source_arguments(build)
    build.add_argument("--out", type=Path, required=True, metavar="INDEX", help="index folder to write")
    _kind_arguments(build)
    build.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    _embedding_arguments(build)
    build.set_defaults(handler=_build)

    add = commands.add_parser("add", help="append new images to an index (existing items are not re-embedded)")
    add.add_argument("index", type=Path, metavar="INDEX")
    add.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of images to add (recursively)")
    add.add_argument("--model", type=Path, default=None, metavar="RUN",
                     help="the model the index was built with (default: the checkpoint its manifest names)")
    _embedding_arguments(add)
    add.set_defaults(handler=_add)

    info = commands.add_parser("info", help="describe an index")
    info.add_argument("index", type=Path, metavar="INDEX")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=_info)

    rebuild = commands.add_parser("rebuild", help="another kind of index over the same embeddings (no re-embedding)")
    rebuild.add_argument("index", type=Path, metavar="INDEX")
    rebuild.add_argument("--out", type=Path, required=True, metavar="NEW")
    _kind_arguments(rebuild)
    rebuild.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    rebuild.set_defaults(handler=_rebuild)


def _source_arguments(parser) -> None:
    parser.add_argument("--images", type=Path, default=None, metavar="DIR", help="index every image under this folder")
    parser.add_argument("--dataset", default=None, metavar="NAME", help="index a dataset split (labels and groups kept)")
    parser.add_argument("--root", type=Path, default=None, metavar="DIR", help="the dataset's folder")
    parser.add_argument("--split", default=None, metavar="SPLIT", help="the split to index, e.g. test")


def _kind_arguments(parser) -> None:
    parser.add_argument("--kind", default="flat", choices=("flat", "hnsw", "ivf", "ivfpq"),
                        help="flat: exact (default); hnsw / ivf / ivfpq: approximate, faster on large collections")
    parser.add_argument("--m", type=int_in_range(2, 256, "hnsw neighbours in 2..256"), default=None, help="hnsw: neighbours per node (default 16)")
    parser.add_argument("--ef-construction", type=int_in_range(1, 4096, "a beam width in 1..4096"), default=None, help="hnsw: build beam width (default 80)")
    parser.add_argument("--ef-search", type=int_in_range(1, 4096, "a beam width in 1..4096"), default=None, help="hnsw: search beam width (default 128)")
    parser.add_argument("--nlist", type=int_in_range(1, 1 << 20, "a number of lists in 1..1048576"), default=None, help="ivf/ivfpq: inverted lists (default ~sqrt(N))")
    parser.add_argument("--nprobe", type=int_in_range(1, 1 << 20, "a number of lists in 1..1048576"), default=None, help="ivf/ivfpq: lists visited per query (default 16)")
    parser.add_argument("--pq-m", type=int_in_range(1, 4096, "a number of sub-quantizers in 1..4096"), default=None, help="ivfpq: sub-quantizers, divides the dimension (default D/4)")
    parser.add_argument("--pq-bits", type=int_in_range(1, 16, "bits per code in 1..16"), default=None, help="ivfpq: bits per code (default 8)")


def kind_parameters(args: argparse.Namespace) -> dict:
    given = {"m": args.m, "ef_construction": args.ef_construction, "ef_search": args.ef_search, "nlist": args.nlist,
             "nprobe": args.nprobe}
    if args.kind == "ivfpq":
        given.update(m=args.pq_m, nbits=args.pq_bits)
    elif args.pq_m is not None or args.pq_bits is not None:
        from dcml.errors import UserError

        raise UserError("--pq-m and --pq-bits apply to --kind ivfpq only")
    return {key: value for key, value in given.items() if value is not None}


def _embedding_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--batch-size", type=batch_size_int, default=None, help="images per forward pass (default: the run's)")
    parser.add_argument("--workers", type=workers_int, default=0, help="image-loading worker processes")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr")


def load_cli_model(path: Path, args: argparse.Namespace, *, device: str | None = None, progress: bool | None = None):
    from dcml.inference import load_model

    return load_model(path, device=device or args.device, batch_size=args.batch_size, num_workers=args.workers,
                      progress=args.progress if progress is None else progress)


def _items_to_embed(args: argparse.Namespace, model):
    """(paths, labels, groups, description) of what ``build`` indexes."""
    from dcml.errors import UserError
    from dcml.inference import list_images

    if (args.images is None) == (args.split is None):
        raise UserError("give either --images DIR or --split SPLIT (with --dataset NAME, default the run's)")
    if args.images is not None:
        if args.dataset is not None:
            raise UserError("give either --images DIR or --dataset/--split, not both")
        paths = list_images(args.images)
        return paths, [], [], str(args.images)
    from dcml.data import load_dataset

    name = args.dataset or model.config.data.dataset
    root = args.root if args.root is not None else (Path(model.config.data.root) if args.dataset is None and model.config.data.root else None)
    split = load_dataset(name, root).split(args.split)
    if split.num_images == 0:
        raise UserError(f"split {args.split!r} of {name} has no images")
    groups = [] if split.groups is None else split.groups.tolist()
    return list(split.paths), split.labels.tolist(), groups, f"{name}/{args.split}"


def embed_into(builder, model, paths):
    """Embed ``paths`` straight into the builder (bounded memory); returns the readable mask."""
    from dcml.model_runner import l2_normalize

    return model.embed_paths_tolerant(paths, sink=lambda rows: builder.append(l2_normalize(rows))).readable


def _one_process(command: str) -> None:
    """Commands that replace an index folder: under torchrun every rank would race to replace it."""
    from dcml.errors import UserError
    from dcml.training.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise UserError(f"dcml index {command} runs as one process; under torchrun only dcml index build "
                        "shares its embedding out over the ranks")


def _skipped_note(paths, readable) -> str:
    bad = [str(paths[i]) for i in range(len(paths)) if not readable[i]]
    if not bad:
        return ""
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"; skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''}: {shown}"


def _build(args: argparse.Namespace) -> int:
    """Under torchrun each rank embeds its shard of the images and rank 0 builds the index (see dcml.search.sharded)."""
    import torch._dynamo  # noqa: F401 - see below

    from dcml.training import distributed

    # Imported before the process group exists: torch._dynamo (which torchvision and timm import)
    # keeps references to a group that exists when it is first imported, so teardown could not stop
    # gloo's threads, and a rank whose thread released a tensor during interpreter shutdown aborted.
    dist = distributed.setup(args.device)  # a plain run: a single rank, no process group
    try:
        return _build_on(args, dist)
    finally:
        distributed.teardown()


def _build_on(args: argparse.Namespace, dist) -> int:
    import contextlib

    from dcml.search.index import IndexBuilder, Items, model_description, refuse_replacing
    from dcml.search.sharded import check_same_list, embed_sharded, every_rank

    out = args.out.expanduser()
    every_rank(dist, lambda: refuse_replacing(out, args.overwrite) if dist.is_main else None)
    params = kind_parameters(args)
    # Under torchrun each rank takes the GPU of its LOCAL_RANK (distributed.setup made it current).
    device = f"cuda:{dist.local_rank}" if dist.enabled and args.device.startswith("cuda") else args.device
    model = every_rank(dist, lambda: load_cli_model(args.model, args, device=device, progress=args.progress and dist.is_main))
    paths, labels, groups, source = every_rank(dist, lambda: _items_to_embed(args, model))
    # One list of strings, embedded and indexed: a Path object a file would cost several times more.
    paths = [str(Path(p).expanduser().resolve()) for p in paths]
    check_same_list(dist, paths, source)
    builder = every_rank(dist, lambda: IndexBuilder(out, model.dimension, overwrite=args.overwrite) if dist.is_main else None)
    with builder if builder is not None else contextlib.nullcontext():
        readable = embed_sharded(dist, builder, model, paths)
        if not dist.is_main:
            return 0  # rank 0 builds and reports the index
        items = Items(paths, labels, groups).select(readable)
        index = builder.finish(items, model_description(model), args.kind, params)
    print(f"indexed {len(index)} images of {source} -> {index.folder} ({_describe(index)})"
          f"{_skipped_note(paths, readable)}")
    return 0


def _describe(index) -> str:
    m = index.manifest
    text = f"{m['kind']}, {m['dimension']}-d, {m['distance']}"
    if m["parameters"]:
        text += ", " + " ".join(f"{k}={v}" for k, v in m["parameters"].items())
    if m["kind"] != "flat" and m.get("recall_at_10") is not None:
        text += f"; Recall@{m['recall_k']} vs exact search {m['recall_at_10']:.3f} on {m['recall_queries']} sampled items"
    return text


def _add(args: argparse.Namespace) -> int:
    from dcml.inference import list_images
    from dcml.search.index import Index, Items, extend_index

    _one_process("add")
    index = Index.load(args.index)
    model = load_cli_model(args.model, args) if args.model is not None else None
    if model is not None:
        index.use_model(model)
    else:
        model = index.model()  # the checkpoint the manifest names, checksum checked
        model.progress, model.num_workers = args.progress, args.workers
    known = set(index.items.paths)
    candidates = [str(p.resolve()) for p in list_images(args.images)]
    new = [p for p in candidates if p not in known]
    already = len(candidates) - len(new)
    if not new:
        print(f"nothing to add: all {already} images under {args.images} are already in {index.folder}")
        return 0
    index.drop_faiss_index()  # the new index is built from embeddings.npy and the new rows
    readable = []

    def append(builder) -> Items:
        readable.append(embed_into(builder, model, new))
        return Items(new).select(readable[0])

    index = extend_index(index, append)
    added = int(readable[0].sum())
    print(f"added {added} images to {index.folder} ({len(index)} items now; {already} already indexed, skipped)"
          f"{_skipped_note(new, readable[0])}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from dcml.search.index import Index

    index = Index.load(args.index)
    info = index.info()
    if args.json:
        print(json_text(info))
        return 0
    print(f"{info['path']}: {info['items']} items ({info['labelled_items']} labelled), {_describe(index)}")
    print(f"model: {info['model'].get('checkpoint')} (sha256 {str(info['model'].get('sha256'))[:12]}), "
          f"dcml {info['dcml_version']}, created {info['created']}, updated {info['updated']}")
    if info["thresholds"]:
        print("thresholds: " + ", ".join(f"{name} {value['distance']:.4f}" for name, value in info["thresholds"].items()
                                         if value and value.get("distance") is not None))
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from dcml.search.index import Index, rebuild_index

    _one_process("rebuild")
    source = Index.load(args.index)
    source.drop_faiss_index()  # rebuilt from embeddings.npy: one faiss index in memory
    index = rebuild_index(source, args.out, args.kind, kind_parameters(args), overwrite=args.overwrite)
    print(f"rebuilt {len(index)} items of {source.folder} -> {index.folder} ({_describe(index)})")
    return 0

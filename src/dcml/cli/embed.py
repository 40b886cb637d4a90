"""`dcml embed`: embed a dataset split or a folder of images, with a trained dcml model or a pretrained
backbone, and save .npy arrays."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcml.cli.arguments import batch_size_int, image_size_int, workers_int

DEFAULT_BACKBONE = "efficientnet_lite0"  # real ImageNet weights that ship with a pip package: works offline


def register(subparsers) -> None:
    embed = subparsers.add_parser(
        "embed",
        help="embed a dataset split or a folder with a trained model (--model) or a pretrained backbone",
        description="Embed every image of one dataset split, or of a folder (--images), and save the "
        "embeddings (float32, N x D, in split / sorted-path order) and optionally the class labels and "
        "group ids as .npy files. With --model RUN: the trained embedding evaluation scores (the "
        "normalised concatenation of the learners), from the run's checkpoint alone. Without it: a "
        "pretrained backbone's global average pooled features (no training). Files are written "
        "atomically and never replaced without --overwrite. Weights are never downloaded: "
        "efficientnet_lite0 ships with a pip package; resnet18/resnet50 use torchvision's cached "
        "ImageNet checkpoint or --weights PATH.",
    )
    embed.add_argument("--model", type=Path, default=None, metavar="RUN",
                       help="a trained run folder (its best.pt) or a dcml checkpoint: write its trained embedding")
    embed.add_argument("--dataset", default=None, metavar="NAME",
                       help="dataset name (see `dcml data list`; with --model: default the run's dataset)")
    embed.add_argument("--root", type=Path, default=None, metavar="DIR", help="folder that holds the dataset (optional for emoji)")
    embed.add_argument("--split", default=None, metavar="SPLIT", help="split to embed, e.g. test (see `dcml data info NAME`)")
    embed.add_argument("--images", type=Path, default=None, metavar="DIR",
                       help="embed every image under this folder (recursively, sorted by path) instead of a split")
    embed.add_argument("--paths-out", type=Path, default=None, metavar="P.txt",
                       help="also write the embedded file paths, one a line, in row order")
    embed.add_argument("--out", type=Path, required=True, metavar="E.npy", help="where to write the N x D float32 embeddings")
    embed.add_argument("--labels-out", type=Path, default=None, metavar="L.npy", help="also write the N int64 class labels")
    embed.add_argument("--groups-out", type=Path, default=None, metavar="G.npy",
                       help="also write the N int64 group ids (emoji vendors, cameras); the split must have groups")
    embed.add_argument("--backbone", default=DEFAULT_BACKBONE, metavar="NAME",
                       help="backbone: efficientnet_lite0, resnet18, resnet50 (default: %(default)s; an unknown name lists all)")
    embed.add_argument("--weights", type=Path, default=None, metavar="PATH",
                       help="load the backbone's weights from this state dict instead of the default ImageNet ones "
                       "(a trained dcml checkpoint goes to --model)")
    embed.add_argument("--image-size", type=image_size_int, default=None, metavar="N",
                       help="square input resolution: resize the short side to N*256/224, centre-crop N "
                       "(default: the backbone's, 224; with --model: the run's)")
    embed.add_argument("--batch-size", type=batch_size_int, default=None, metavar="B",
                       help="images per forward pass (default: 64; with --model: the run's feature-pass batch)")
    embed.add_argument("--workers", type=workers_int, default=0, metavar="W", help="image-loading worker processes (default: %(default)s)")
    embed.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    embed.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                       help="L2-normalise each embedding (default: on)")
    embed.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    embed.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="show a progress bar on stderr (default: on)")
    embed.set_defaults(handler=_embed)


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    from dcml.errors import UserError
    from dcml.atomic_files import refuse_to_overwrite

    resolved = [p.expanduser().resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UserError("--out, --labels-out, --groups-out and --paths-out must be different files")
    for path in paths:
        parent = path.expanduser().parent
        if not parent.is_dir():
            raise UserError(f"cannot write {path}: directory {parent} does not exist")
        if path.expanduser().is_dir():
            raise UserError(f"cannot write {path}: it is a directory")
    refuse_to_overwrite(paths, overwrite, what="embeddings")


def refuse_dcml_checkpoint_as_weights(path: Path | None) -> None:
    """A trained dcml checkpoint passed as backbone weights would silently drop the trained head."""
    if path is None or not Path(path).expanduser().is_file():
        return
    import torch

    from dcml.errors import UserError

    try:
        content = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not readable as a checkpoint: the weights loader names the reason
        return
    if isinstance(content, dict) and "format_version" in content and "config" in content:
        raise UserError(f"{path} is a trained dcml checkpoint, not backbone weights: use --model {path} "
                        "to embed with the trained model (its head and learners included)")


def _check_sources(args: argparse.Namespace) -> None:
    from dcml.errors import UserError

    if args.images is not None and (args.dataset is not None or args.split is not None):
        raise UserError("give either --images DIR or --dataset/--split, not both")
    if args.images is None and args.split is None:
        raise UserError("say what to embed: --split SPLIT (with --dataset NAME) or --images DIR")
    if args.images is None and args.dataset is None and args.model is None:
        raise UserError("--dataset NAME is required (or --model RUN to use the run's dataset)")
    if args.images is not None and (args.labels_out is not None or args.groups_out is not None):
        raise UserError("a folder of images has no labels or groups; drop --labels-out / --groups-out")
    if args.model is not None and (args.weights is not None or args.image_size is not None):
        raise UserError("--model uses the run's own weights and image size; drop --weights / --image-size")


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    from dcml.model_runner import l2_normalize
    from dcml.errors import UserError
    from dcml.inference import list_images
    from dcml.atomic_files import save_npy_atomically, write_atomically

    _check_sources(args)
    outputs = [p for p in (args.out, args.labels_out, args.groups_out, args.paths_out) if p is not None]
    _check_outputs(outputs, args.overwrite)
    refuse_dcml_checkpoint_as_weights(args.weights)

    split = None
    paths: list[Path]
    if args.images is not None:
        paths = list_images(args.images)
        source = str(args.images)
    else:
        split, source = _load_split(args)
        paths = list(split.paths)
        if args.groups_out is not None and split.groups is None:
            raise UserError(f"split {args.split!r} of {source} has no group ids; drop --groups-out")

    device = _device_or_error(args.device)
    if args.model is not None:
        embeddings, what = _embed_with_model(args, split, paths, device)
    else:
        embeddings, what = _embed_with_backbone(args, split, paths, device)
    if args.normalize:
        embeddings = l2_normalize(embeddings)
    embeddings = embeddings.astype(np.float32, copy=False)

    arrays = {args.out: embeddings}
    if args.labels_out is not None:
        arrays[args.labels_out] = np.asarray(split.labels, dtype=np.int64)
    if args.groups_out is not None:
        arrays[args.groups_out] = np.asarray(split.groups, dtype=np.int64)
    save_npy_atomically(arrays)
    if args.paths_out is not None:
        listing = "".join(f"{path}\n" for path in paths).encode()
        write_atomically({args.paths_out: lambda stream: stream.write(listing)})
    print(
        f"embedded {embeddings.shape[0]} images of {source} with {what} "
        f"-> {args.out} ({embeddings.shape[0]} x {embeddings.shape[1]} float32"
        f"{', L2-normalised' if args.normalize else ''})"
    )
    return 0


def _load_split(args: argparse.Namespace):
    from dcml.data import load_dataset
    from dcml.errors import UserError

    name, root = args.dataset, args.root
    if name is None:  # --model without --dataset: the run's own dataset
        from dcml.inference import resolve_checkpoint
        from dcml.training.checkpoint import load_checkpoint

        data = load_checkpoint(resolve_checkpoint(args.model))["config"].get("data", {})
        name = data.get("dataset")
        root = root if root is not None else (Path(data["root"]) if data.get("root") else None)
    dataset = load_dataset(name, root)
    split = dataset.split(args.split)
    if split.num_images == 0:
        raise UserError(f"split {args.split!r} of dataset {name!r} has no images")
    return split, f"{name}/{args.split}"


def _embed_with_model(args, split, paths, device):
    from dcml.inference import load_model

    model = load_model(args.model, device=device, batch_size=args.batch_size, num_workers=args.workers,
                       progress=args.progress)
    embeddings = model.embed_split(split) if split is not None else model.embed_paths(paths)
    return embeddings, f"the trained model {model.checkpoint} at {model.image_size} px"


def _embed_with_backbone(args, split, paths, device):
    from dcml.data.records import Split
    from dcml.model_runner import extract_embeddings
    from dcml.models.backbones import create_backbone

    backbone = create_backbone(args.backbone, pretrained=True, weights=args.weights)
    if split is None:  # a folder: the same loader over its files, without labels
        split = Split("images", paths, labels=[0] * len(paths))
    embeddings, _ = extract_embeddings(backbone, split, backbone.test_transform(args.image_size), batch_size=args.batch_size or 64,
                                       num_workers=args.workers, device=device, progress=args.progress)
    return embeddings, f"{args.backbone} at {args.image_size or backbone.input_size} px"


def _device_or_error(name: str):
    from dcml.errors import UserError

    try:
        return _device(name)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"unusable --device {name!r}: {str(error).splitlines()[0]}") from None


def _device(name: str):
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    return device

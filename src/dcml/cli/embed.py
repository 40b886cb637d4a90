"""`dcml embed`: embed one split of a dataset with a pretrained backbone and save .npy arrays."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcml.cli.arguments import non_negative_int, positive_int

DEFAULT_BACKBONE = "efficientnet_lite0"  # real ImageNet weights that ship with a pip package: works offline


def register(subparsers) -> None:
    embed = subparsers.add_parser(
        "embed",
        help="embed a dataset split with a pretrained backbone, save .npy arrays",
        description="Embed every image of one dataset split with a pretrained backbone (global average "
        "pooled features, no training) and save the embeddings (float32, N x D, in split order) and "
        "optionally the class labels and group ids as .npy files. Files are written atomically. "
        "Weights are never downloaded: efficientnet_lite0 ships with a pip package; resnet18/resnet50 "
        "use torchvision's cached ImageNet checkpoint or --weights PATH.",
    )
    embed.add_argument("--dataset", required=True, metavar="NAME", help="dataset name (see `dcml data list`)")
    embed.add_argument("--root", type=Path, default=None, metavar="DIR", help="folder that holds the dataset (optional for emoji)")
    embed.add_argument("--split", required=True, metavar="SPLIT", help="split to embed, e.g. test (see `dcml data info NAME`)")
    embed.add_argument("--out", type=Path, required=True, metavar="E.npy", help="where to write the N x D float32 embeddings")
    embed.add_argument("--labels-out", type=Path, default=None, metavar="L.npy", help="also write the N int64 class labels")
    embed.add_argument("--groups-out", type=Path, default=None, metavar="G.npy",
                       help="also write the N int64 group ids (emoji vendors, cameras); the split must have groups")
    embed.add_argument("--backbone", default=DEFAULT_BACKBONE, metavar="NAME",
                       help="backbone: efficientnet_lite0, resnet18, resnet50 (default: %(default)s; an unknown name lists all)")
    embed.add_argument("--weights", type=Path, default=None, metavar="PATH",
                       help="load the backbone's weights from this state dict / checkpoint instead of the default ImageNet ones")
    embed.add_argument("--image-size", type=positive_int, default=None, metavar="N",
                       help="square input resolution: resize the short side to N*256/224, centre-crop N "
                       "(default: the backbone's, 224; the emoji images are 64 px)")
    embed.add_argument("--batch-size", type=positive_int, default=64, metavar="B", help="images per forward pass (default: %(default)s)")
    embed.add_argument("--workers", type=non_negative_int, default=0, metavar="W", help="image-loading worker processes (default: %(default)s)")
    embed.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    embed.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                       help="L2-normalise each embedding (default: on)")
    embed.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="show a progress bar on stderr (default: on)")
    embed.set_defaults(handler=_embed)


def _check_outputs(paths: list[Path]) -> None:
    from dcml.errors import UserError

    resolved = [p.expanduser().resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UserError("--out, --labels-out and --groups-out must be different files")
    for path in paths:
        parent = path.expanduser().parent
        if not parent.is_dir():
            raise UserError(f"cannot write {path}: directory {parent} does not exist")
        if path.expanduser().is_dir():
            raise UserError(f"cannot write {path}: it is a directory")


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    from dcml.data import load_dataset
    from dcml.embedding import extract_embeddings, l2_normalize
    from dcml.errors import UserError
    from dcml.io import save_npy_atomically
    from dcml.models.backbones import create_backbone

    outputs = [p for p in (args.out, args.labels_out, args.groups_out) if p is not None]
    _check_outputs(outputs)

    dataset = load_dataset(args.dataset, args.root)
    split = dataset.split(args.split)
    if split.num_images == 0:
        raise UserError(f"split {args.split!r} of dataset {args.dataset!r} has no images")
    if args.groups_out is not None and split.groups is None:
        raise UserError(f"split {args.split!r} of dataset {args.dataset!r} has no group ids; drop --groups-out")

    backbone = create_backbone(args.backbone, pretrained=True, weights=args.weights)
    try:
        device = _device(args.device)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"unusable --device {args.device!r}: {str(error).splitlines()[0]}") from None
    embeddings, labels = extract_embeddings(
        backbone,
        split,
        backbone.test_transform(args.image_size),
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=device,
        progress=args.progress,
    )
    if args.normalize:
        embeddings = l2_normalize(embeddings)
    embeddings = embeddings.astype(np.float32, copy=False)

    arrays = {args.out: embeddings}
    if args.labels_out is not None:
        arrays[args.labels_out] = labels
    if args.groups_out is not None:
        arrays[args.groups_out] = np.asarray(split.groups, dtype=np.int64)
    save_npy_atomically(arrays)
    size = args.image_size or backbone.input_size
    print(
        f"embedded {embeddings.shape[0]} images of {args.dataset}/{args.split} with {args.backbone} at {size} px "
        f"-> {args.out} ({embeddings.shape[0]} x {embeddings.shape[1]} float32"
        f"{', L2-normalised' if args.normalize else ''})"
    )
    return 0


def _device(name: str):
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    return device

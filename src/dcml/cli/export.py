"""`dcml export RUN --format onnx|torchscript --out FILE`: the trained embedding as one graph."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a trained run as an ONNX or TorchScript graph (checked against load_model)",
        description="Write the trained embedding as one graph. Input: a batch of RGB images already resized "
        "(short side to the run's image size x 256/224) and centre-cropped to the image size, as float32 in "
        "[0, 1], N x 3 x S x S (the batch axis is dynamic). Inside: mean/std normalisation, backbone, head, each "
        "learner's normalisation, the normalised concatenation. Output: N x D, L2-normalised. Before writing, "
        "the export and load_model embed the same images (through onnxruntime for ONNX); the max abs difference "
        "is printed and an export above 1e-4 is refused. A TorchScript file runs code when loaded "
        "(torch.jit.load): load only files you made; the ONNX file is data only.",
    )
    parser.add_argument("run", type=Path, metavar="RUN", help="trained run folder (its best.pt) or a dcml checkpoint")
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"), dest="fmt")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write (e.g. model.onnx)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from dcml.export import export_model

    export_model(args.run, args.fmt, args.out, overwrite=args.overwrite)
    return 0

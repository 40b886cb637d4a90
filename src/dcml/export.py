"""`dcml export`: a trained run as one self-contained ONNX or TorchScript graph.

The graph's input is a batch of RGB images already resized and centre-cropped to the run's image
size, as float32 in [0, 1], N x 3 x S x S (what ``ToTensor`` gives; the batch axis is dynamic).
Everything after that happens inside: the backbone's mean / std normalisation, the backbone, the
head, each learner's L2 normalisation and the final normalised concatenation, so the output is the
embedding :func:`dcml.load_model` gives for the same images. That is checked before anything is
written: the exported graph (through onnxruntime for ONNX) and ``load_model`` embed the same batch
and an export that differs by more than :data:`PARITY_TOLERANCE` is refused.

A TorchScript file holds code that ``torch.jit.load`` runs by design: it is for loading files
you made yourself. dcml never loads an exported file except its own bytes right after export.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dcml.errors import MissingDependencyError, UserError
from dcml.atomic_files import write_atomically

FORMATS = ("onnx", "torchscript")
#: Largest max-abs difference between the export and load_model on the check batch.
PARITY_TOLERANCE = 1e-4
#: The dynamo exporter's default opset in this torch; 17 is the least the README's onnxruntime needs.
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
#: Batch sizes: tracing with one and checking with another shows the batch axis really is free.
_TRACE_BATCH, _CHECK_BATCH = 2, 3


class ExportedEmbedding(nn.Module):
    """float32 [0, 1] N x 3 x S x S -> N x D: normalisation, backbone, head, the evaluated embedding."""

    def __init__(self, trained, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = trained.model
        self.active_learners = int(trained.active_learners)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        normalised = (images - self.mean) / self.std
        raw = self.model.head(self.model.features(normalised)).float()
        return self.model.head.full_embedding(raw, self.active_learners)


@dataclass(frozen=True)
class ExportReport:
    out: Path
    format: str
    image_size: int
    resize: int
    dimension: int
    check_batch: int
    max_abs_difference: float


def split_transform(trained):
    """(resize + crop + ToTensor, mean, std): the run's test transform, its Normalize taken out."""
    from torchvision import transforms

    steps = list(trained.transform.transforms)
    normalise = [step for step in steps if isinstance(step, transforms.Normalize)]
    if len(normalise) != 1 or steps[-1] is not normalise[0]:
        raise UserError("this run's test transform does not end in one Normalize; it cannot be exported")
    resize = next((step.size for step in steps if isinstance(step, transforms.Resize)), None)
    return transforms.Compose(steps[:-1]), tuple(normalise[0].mean), tuple(normalise[0].std), resize


def check_images(size: int, count: int, seed: int = 0) -> list[Image.Image]:
    """Images of other shapes than the crop (so resize and crop really run), smooth enough to look like photos."""
    rng = np.random.default_rng(seed)
    shapes = [(size * 2 + 5, size * 3 // 2 + 1), (size + 9, size * 2), (size * 3, size * 3)]
    images = []
    for i in range(count):
        width, height = shapes[i % len(shapes)]
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    return images


def export_model(run: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False, echo=print) -> ExportReport:
    """Export ``run`` to ``out``; the file is written only if it matches load_model within the tolerance."""
    from dcml.inference import load_model
    from dcml.atomic_files import refuse_to_overwrite

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    refuse_to_overwrite([out], overwrite, what=f"{fmt} export")
    trained = load_model(run, device="cpu")
    to_tensor, mean, std, resize = split_transform(trained)
    wrapper = ExportedEmbedding(trained, mean, std).eval()
    size = trained.image_size
    images = check_images(size, _CHECK_BATCH)
    batch = torch.stack([to_tensor(image) for image in images])
    expected = trained.embed_pil(images)
    example = torch.rand(_TRACE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    data, produced = (_onnx(wrapper, example, batch, trained, size, resize) if fmt == "onnx"
                      else _torchscript(wrapper, example, batch))
    difference = float(np.abs(produced - expected).max())
    if not np.isfinite(difference) or difference > PARITY_TOLERANCE:
        raise UserError(f"the {fmt} export differs from load_model by {difference:.3g} (max abs, {len(images)} images), "
                        f"above {PARITY_TOLERANCE:g}; nothing was written")
    write_atomically({out: lambda stream: stream.write(data)})
    report = ExportReport(out, fmt, size, int(resize) if isinstance(resize, int) else size, trained.dimension,
                          len(images), difference)
    echo(f"exported {trained.checkpoint} to {out} ({fmt}, {len(data) / 1e6:.1f} MB): input float32 [0, 1] N x 3 x "
         f"{size} x {size} (resize the short side to {report.resize}, centre-crop {size}), output N x {trained.dimension}; "
         f"max |export - load_model| = {difference:.2e} on {len(images)} images")
    return report


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters print progress to stdout and warn about their own deprecations; neither is the user's business."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _onnx(wrapper: nn.Module, example: torch.Tensor, batch: torch.Tensor, trained, size: int, resize) -> tuple[bytes, np.ndarray]:
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise MissingDependencyError(f"ONNX export needs {error.name}: pip install onnx onnxruntime onnxscript") from None
    try:
        with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},), opset_version=ONNX_OPSET,
                external_data=False)
    except ImportError as error:  # the dynamo exporter imports onnxscript lazily
        raise MissingDependencyError(f"ONNX export needs {error.name}: pip install onnxscript") from None
    proto = program.model_proto
    metadata = {"dcml_checkpoint_sha256": trained.sha256, "image_size": str(size),
                "resize_short_side": str(resize if isinstance(resize, int) else size),
                "input": f"float32 RGB in [0, 1], N x 3 x {size} x {size}, after resize + centre crop",
                "output": f"float32 N x {trained.dimension}, L2-normalised; compare with Euclidean distance"}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    batch_axis = session.get_inputs()[0].shape[0]
    if not isinstance(batch_axis, str):  # the exporter fell back to a fixed batch: refuse rather than ship it
        raise UserError(f"the ONNX exporter fixed the batch size at {batch_axis} for this model; nothing was written")
    produced = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    return data, produced


def _torchscript(wrapper: nn.Module, example: torch.Tensor, batch: torch.Tensor) -> tuple[bytes, np.ndarray]:
    with _quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        data = buffer.getvalue()
        # Our own bytes, just written: the check runs the saved file, not the object in memory.
        reloaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        produced = reloaded(batch).numpy()
    return data, produced

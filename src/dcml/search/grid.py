"""Retrieval grids: one row per query, its top-k thumbnails with the distance under each.

Borders are green (same label as the query) or red (another label) when labels are known, grey
otherwise. Drawn with Pillow; images that cannot be read become a grey tile with a cross.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GREEN = (30, 160, 60)
RED = (210, 40, 40)
GREY = (150, 150, 150)
QUERY = (40, 90, 200)
_BORDER = 4
_CAPTION = 16
_GAP = 6


def _thumbnail(path: str | Path | None, size: int) -> Image.Image:
    from dcml.data.images import load_rgb
    from dcml.errors import UserError

    tile = Image.new("RGB", (size, size), (235, 235, 235))
    if path is None:
        return tile
    try:
        image = load_rgb(path)
    except UserError:
        draw = ImageDraw.Draw(tile)
        draw.line((0, 0, size, size), fill=GREY, width=2)
        draw.line((0, size, size, 0), fill=GREY, width=2)
        return tile
    scale = size / max(image.width, image.height)  # small images (emoji, tests) are enlarged too
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def draw_retrieval_grid(
    out: str | Path,
    query_paths: Sequence[str | Path | None],
    result_paths: Sequence[Sequence[str | Path]],
    distances: np.ndarray,
    correct: np.ndarray | None = None,
    *,
    captions: Sequence[str] | None = None,
    thumb: int = 96,
) -> Path:
    """Write a PNG grid: query (blue border) then its results, ``distances[i, j]`` under result j.

    ``correct[i, j]``: True green, False red, None / missing grey. ``captions[i]`` goes under query i.
    """
    from dcml.atomic_files import write_atomically

    rows, k = len(query_paths), max((len(r) for r in result_paths), default=0)
    cell = thumb + 2 * _BORDER
    width = _GAP + (cell + _GAP) * (k + 1) + _GAP
    height = _GAP + (cell + _CAPTION + _GAP) * max(rows, 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(rows):
        top = _GAP + i * (cell + _CAPTION + _GAP)
        _framed(canvas, _thumbnail(query_paths[i], thumb), _GAP, top, QUERY)
        caption = captions[i] if captions is not None else "query"
        draw.text((_GAP + 2, top + cell + 2), caption[:18], fill=(0, 0, 0))
        for j, path in enumerate(result_paths[i]):
            left = _GAP + (j + 1) * (cell + _GAP) + _GAP
            flag = None if correct is None else correct[i][j]
            colour = GREY if flag is None else (GREEN if flag else RED)
            _framed(canvas, _thumbnail(path, thumb), left, top, colour)
            draw.text((left + 2, top + cell + 2), f"{float(distances[i][j]):.3f}", fill=(0, 0, 0))
    out = Path(out).expanduser()
    suffix = out.suffix.lstrip(".").upper() or "PNG"

    def write(stream):
        canvas.save(stream, format="JPEG" if suffix in ("JPG", "JPEG") else "PNG")

    write_atomically({out: write})
    return out


def _framed(canvas: Image.Image, tile: Image.Image, left: int, top: int, colour) -> None:
    size = tile.width + 2 * _BORDER
    canvas.paste(Image.new("RGB", (size, size), colour), (left, top))
    canvas.paste(tile, (left + _BORDER, top + _BORDER))


def worst_queries(embeddings: np.ndarray, labels: np.ndarray, count: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out queries with the lowest average precision (AP@R, as evaluation's MAP@R): (ids, AP)."""
    from dcml.model_runner import l2_normalize
    from dcml.evaluation.metrics import retrieval_ranks

    labels = np.asarray(labels)
    ranks = retrieval_ranks(l2_normalize(embeddings), labels, max_k=1)
    scored = np.flatnonzero(ranks.num_positives > 0)
    order = scored[np.lexsort((scored, ranks.average_precision_at_r[scored]))]  # lowest AP first, ties by id
    chosen = order[:count]
    return chosen, ranks.average_precision_at_r[chosen]


def worst_queries_grid(out: str | Path, embeddings: np.ndarray, labels: np.ndarray, paths: Sequence[str | Path], *,
                       count: int = 8, k: int = 5, thumb: int = 96) -> Path:
    """``dcml evaluate RUN --grid worst.png``: the ``count`` lowest-AP queries and their top ``k`` (self excluded)."""
    from dcml.search.exact import nearest_neighbours

    labels = np.asarray(labels)
    chosen, ap = worst_queries(embeddings, labels, count)
    k = min(k, len(labels) - 1)
    ids, distances = nearest_neighbours(embeddings, embeddings[chosen], k, exclude=chosen)
    correct = labels[ids] == labels[chosen][:, None]
    return draw_retrieval_grid(out, [paths[i] for i in chosen], [[paths[j] for j in row] for row in ids], distances,
                               correct, captions=[f"AP {a:.2f}" for a in ap], thumb=thumb)

"""Argument types shared by the commands: bad values become argparse's one-line usage errors."""

from __future__ import annotations

import argparse

from dcml.config import MAX_BATCH_SIZE, MAX_IMAGE_SIZE, MAX_SEED, MAX_WORKERS


def int_in_range(minimum: int, maximum: int | None, wording: str):
    """An argparse ``type``: an integer in ``minimum..maximum`` (``None``: no upper end)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {wording}, got {value}")
        return value

    return parse


positive_int = int_in_range(1, None, "a positive integer")
non_negative_int = int_in_range(0, None, "an integer >= 0")
#: Every --seed: the range of the configuration's ``seed`` (numpy, faiss and torch all accept it).
seed_int = int_in_range(0, MAX_SEED, f"a seed in 0..{MAX_SEED}")
#: --image-size, --batch-size and --workers take the ranges of data.image_size, data.eval_batch_size
#: and data.num_workers, so a command accepts what a training run would.
image_size_int = int_in_range(16, MAX_IMAGE_SIZE, f"an image size in 16..{MAX_IMAGE_SIZE} pixels")
batch_size_int = int_in_range(1, MAX_BATCH_SIZE, f"a batch size in 1..{MAX_BATCH_SIZE}")
workers_int = int_in_range(0, MAX_WORKERS, f"a number of workers in 0..{MAX_WORKERS}")

"""Checkpoints: everything needed to continue a run exactly, written atomically.

``last.pt`` (written after every epoch) holds the model, optimiser, loss parameters (betas), the
current clustering, the epoch, the best validation score so far and every RNG state; ``best.pt``
holds the weights of the epoch model selection picked. Both go through a temporary file and a
rename, so a kill while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from dcml.errors import UserError
from dcml.io import write_atomically

LAST = "last.pt"
BEST = "best.pt"
FORMAT_VERSION = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    data = buffer.getvalue()
    write_atomically({Path(path): lambda stream: stream.write(data)})


def load_checkpoint(path: Path) -> dict:
    """Read a dcml checkpoint; one-line UserError when it is missing or not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        # Our own files: they hold numpy RNG states and config dicts, not only tensors.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise UserError(f"cannot read checkpoint {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint or "config" not in checkpoint:
        raise UserError(f"{path} is not a dcml checkpoint")
    checkpoint["path"] = str(path)
    return checkpoint

"""Where and how precisely a run computes, and its seeding: the settings that change speed, not the method."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from dcml.errors import UserError
from dcml.training.distributed import SINGLE, Distributed

#: Under torchrun rank r draws its dropout and negative-sampling randomness from seed + r x this.
RANK_SEED_STRIDE = 1_000_003


def resolve_device(name: str, distributed: Distributed = SINGLE) -> torch.device:
    """``auto``: CUDA when available, else the CPU; under torchrun each rank takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available (use device=cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "cuda" and distributed.enabled:
        device = torch.device("cuda", distributed.local_rank)
    return device


def effective_precision(precision: str, device: torch.device) -> str:
    """What ``runtime.precision`` means on ``device``: bf16 autocast on CUDA for auto/bf16, else float32."""
    if precision == "bf16" and device.type != "cuda":
        raise UserError("runtime.precision=bf16 needs a CUDA device; use auto (bf16 on CUDA, float32 on the CPU) or fp32")
    return "bf16" if precision in ("auto", "bf16") and device.type == "cuda" else "fp32"


def autocast_for(precision: str, device: torch.device):
    """A context-manager factory: bf16 autocast (CUDA; ``auto`` or ``bf16``) or nothing (the CPU, ``fp32``)."""
    if effective_precision(precision, device) == "bf16":
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (dropout and negative sampling draw from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own randomness (dropout, negative sampling) under torchrun."""
    return seed + RANK_SEED_STRIDE * rank

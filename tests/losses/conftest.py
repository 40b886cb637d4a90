"""Shared settings for the loss tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _tiny_tensors(one_intra_op_thread):
    """The tensors here are tiny: one intra-op thread (tests/conftest.py)."""
    yield

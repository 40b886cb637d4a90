"""The numba rank kernel follows torch's thread count: a process limited to one thread evaluates on one."""

import dataclasses

import numpy as np
import pytest
import torch

from dcml.evaluation import ranks as ranks_module
from dcml.evaluation.ranks import positive_ranks

numba = pytest.importorskip("numba")


def _clustered(n=500, dims=12, classes=30, seed=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dims))
    return (centres[labels] + 0.8 * rng.normal(size=(n, dims))).astype(np.float32), labels


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _recording_kernel(seen: list):
    real = ranks_module._numba_kernel()
    if real is None:
        pytest.skip("numba kernel unavailable")

    def recording(function):
        def call(*args):
            seen.append(numba.get_num_threads())
            return function(*args)

        return call

    return dataclasses.replace(
        real,
        pair_distances=recording(real.pair_distances),
        count_rows=recording(real.count_rows),
        count_cols=recording(real.count_cols),
    )


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_numba_kernel_runs_on_torchs_thread_count(leave_one_out, monkeypatch, torch_threads):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: numba's team cannot be larger than one thread")
    x, labels = _clustered()
    seen: list = []
    monkeypatch.setattr(ranks_module, "_NUMBA", [_recording_kernel(seen)])
    before = numba.get_num_threads()
    self_index = np.arange(len(x)) if leave_one_out else None
    references = x if leave_one_out else x[::-1].copy()
    reference_labels = labels if leave_one_out else labels[::-1].copy()

    torch.set_num_threads(1)
    one = positive_ranks(x, labels, references, reference_labels, query_self_index=self_index, rank_cap=50)
    assert seen and set(seen) == {1}
    assert numba.get_num_threads() == before, "the caller's numba setting is restored"

    seen.clear()
    torch.set_num_threads(2)
    two = positive_ranks(x, labels, references, reference_labels, query_self_index=self_index, rank_cap=50)
    assert set(seen) == {2}
    for field in ("num_positives", "first_rank", "average_precision_at_r", "r_precision"):
        np.testing.assert_array_equal(getattr(one, field), getattr(two, field))

"""The rank engine's device path (tile products computed by torch on ``device``) gives the host's ranks."""

import numpy as np
import pytest
import torch

from dcml.evaluation import ranks as ranks_module
from dcml.evaluation.ranks import positive_ranks


def _clustered(n=600, dims=16, classes=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dims))
    x = (centres[labels] + 0.8 * rng.normal(size=(n, dims))).astype(np.float32)
    x[10:20] = x[0]  # exact duplicates: real ties, broken by reference index
    x[30] = x[31] + np.float32(1e-7)  # a near tie only float64 can order
    return x, labels


def _fields(result):
    return result.num_positives, result.first_rank, result.average_precision_at_r, result.r_precision


def _assert_same(a, b):
    for left, right in zip(_fields(a), _fields(b)):
        np.testing.assert_array_equal(left, right)


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_cpu_device_path_equals_default_leave_one_out(kernel, monkeypatch):
    x, labels = _clustered()
    default = positive_ranks(x, labels, x, labels, query_self_index=np.arange(len(x)), rank_cap=100, kernel=kernel)
    calls = []
    original = ranks_module._Problem._device_dots
    monkeypatch.setattr(ranks_module._Problem, "_device_dots", lambda self, *a: calls.append(1) or original(self, *a))
    on_device = positive_ranks(x, labels, x, labels, query_self_index=np.arange(len(x)), rank_cap=100, kernel=kernel, device="cpu")
    assert calls, "the device path was not taken"
    _assert_same(default, on_device)


def test_cpu_device_path_equals_default_query_gallery():
    x, labels = _clustered(seed=1)
    query, gallery = np.arange(len(x)) % 3 == 0, np.arange(len(x)) % 3 != 0
    groups = np.arange(len(x)) % 5
    args = (x[query], labels[query], x[gallery], labels[gallery])
    kwargs = dict(query_groups=groups[query], reference_groups=groups[gallery], rank_cap=50)
    _assert_same(positive_ranks(*args, **kwargs), positive_ranks(*args, **kwargs, device=torch.device("cpu")))


def test_products_rounded_differently_still_give_the_same_ranks(monkeypatch):
    # A GPU sums the products in another order; here the correctly rounded (float64) product stands
    # in for it. The float64 re-checks must absorb the difference, so the ranks stay identical.
    x, labels = _clustered(seed=2)
    default = positive_ranks(x, labels, x, labels, query_self_index=np.arange(len(x)), rank_cap=100)

    def rounded_dots(self, buffer, query_rows, ref_start, ref_end):
        q = self.q[query_rows].astype(np.float64)
        product = (q @ self.r[ref_start:ref_end].astype(np.float64).T).astype(np.float32)
        out = buffer[: product.size].view(*product.shape).numpy()
        out[:] = product
        return out

    monkeypatch.setattr(ranks_module._Problem, "_device_dots", rounded_dots)
    _assert_same(default, positive_ranks(x, labels, x, labels, query_self_index=np.arange(len(x)), rank_cap=100, device="cpu"))

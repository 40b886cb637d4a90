"""Arrays at the metrics boundary: shapes, magnitudes and ids the engines cannot take are refused or
made safe, never a crash or a silently wrong number."""

from __future__ import annotations

import numpy as np
import pytest

from dcml.errors import UserError
from dcml.evaluation.metrics import evaluate_embeddings, retrieval_metrics

KERNELS = ("numba", "torch")


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    x = (np.eye(10)[labels] * 3 + rng.standard_normal((50, 10))).astype(np.float32)
    return x, labels


@pytest.mark.parametrize(
    "embeddings, labels, kwargs, message",
    [
        (np.zeros((10, 0), np.float32), np.zeros(10, np.int64), {"ks": (1,)}, "at least one dimension"),
        (np.zeros((1, 3), np.float32), np.zeros(1, np.int64), {"ks": (1,)}, "at least 2 rows"),
        (np.zeros((0, 3), np.float32), np.zeros(0, np.int64), {"ks": (1,)}, "at least 2 rows"),
        (np.zeros((4, 2), np.float32), np.zeros(4, np.int64), {"ks": (1,), "query_mask": np.ones(4, bool)}, "no gallery"),
    ],
)
def test_arrays_the_engines_cannot_take_are_user_errors(embeddings, labels, kwargs, message):
    with pytest.raises(UserError, match=message):
        retrieval_metrics(embeddings, labels, **kwargs)
    with pytest.raises(UserError, match=message):
        evaluate_embeddings(embeddings, labels, **kwargs)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scale", [2.0**120, 2.0**-74, 2.0**-76])
def test_extreme_magnitudes_give_the_metrics_of_the_same_vectors_at_unit_scale(data, kernel, scale):
    """Values near float32's maximum would overflow squared distances (faiss aborted); squared
    distances in the subnormal range lose the precision ranks need. Powers of two keep the geometry."""
    x, labels = data
    expected = retrieval_metrics(x, labels, kernel=kernel)
    scaled = (x.astype(np.float64) * scale).astype(np.float32)
    assert retrieval_metrics(scaled, labels, kernel=kernel) == expected


def test_nmi_of_huge_values_is_the_nmi_at_unit_scale(data):
    # The torch backend: faiss aborted the whole process on such values (tests/cli checks that in a subprocess).
    x, labels = data
    expected = evaluate_embeddings(x, labels, backend="torch")
    assert evaluate_embeddings((x.astype(np.float64) * 2.0**120).astype(np.float32), labels, backend="torch") == expected


def test_float64_values_beyond_float32_survive_the_cast(data):
    x, labels = data
    expected = evaluate_embeddings(x, labels)
    assert evaluate_embeddings(x.astype(np.float64) * 2.0**900, labels) == expected


def test_values_near_float32_max_do_not_overflow(data):
    x, labels = data
    huge = (x / np.abs(x).max() * np.float32(3e38)).astype(np.float32)
    result = evaluate_embeddings(huge, labels, backend="torch")
    assert all(np.isfinite(v) for v in result.values()) and result["recall@1"] == retrieval_metrics(x, labels)["recall@1"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask", [False, True], ids=["leave-one-out", "query-gallery"])
def test_a_group_named_minus_one_is_a_group_like_any_other(data, kernel, mask):
    """-1 is the engine's "no group" marker: a caller's group -1 must still exclude its own members."""
    x, labels = data
    groups = np.where(np.arange(50) % 2 == 0, -1, 0)
    query_mask = (np.arange(50) % 3 == 0) if mask else None
    got = retrieval_metrics(x, labels, groups=groups, query_mask=query_mask, kernel=kernel)
    assert got == retrieval_metrics(x, labels, groups=groups + 5, query_mask=query_mask, kernel=kernel)


@pytest.mark.parametrize("with_nmi", [False, True])
def test_score_keys_are_the_keys_evaluate_embeddings_returns(data, with_nmi):
    from dcml.evaluation.metrics import score_keys

    x, labels = data
    result = evaluate_embeddings(x, labels, ks=(1, 3, 7), with_nmi=with_nmi)
    assert tuple(k for k in result if not k.startswith("num_")) == score_keys((1, 3, 7), with_nmi)


@pytest.mark.parametrize("iterations", [0, 2**40, 2.5])
def test_nmi_iterations_have_a_range(data, iterations):
    x, labels = data
    with pytest.raises(UserError, match="iterations must be an integer in 1.."):
        evaluate_embeddings(x, labels, kmeans_iterations=iterations)

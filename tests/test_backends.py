import numpy as np
import pytest

from dcml.backends import get_backend
from dcml.errors import UserError

BACKENDS = ("faiss", "torch")


@pytest.mark.parametrize("name", BACKENDS)
def test_knn_matches_brute_force(name):
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((37, 6)).astype(np.float32)
    refs = rng.standard_normal((120, 6)).astype(np.float32)
    distances, indices = get_backend(name).knn(queries, refs, 5)
    brute = ((queries[:, None, :].astype(np.float64) - refs[None, :, :]) ** 2).sum(-1)
    expected = np.argsort(brute, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(distances, np.take_along_axis(brute, expected, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_kmeans_finds_separated_clusters(name):
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [50, 0], [0, 50]], dtype=np.float32)
    truth = np.repeat(np.arange(3), 40)
    x = centres[truth] + rng.standard_normal((120, 2)).astype(np.float32)
    results = [get_backend(name).kmeans(x, 3, iterations=20, seed=seed) for seed in range(5)]
    for result in results:
        assert result.centroids.shape == (3, 2)
        assert result.assignment.shape == (120,) and set(np.unique(result.assignment)) <= {0, 1, 2}
    # Some seed recovers the three clusters exactly (up to relabelling).
    assert any(len({(t, a) for t, a in zip(truth, r.assignment)}) == 3 and len(np.unique(r.assignment)) == 3 for r in results)


def test_torch_kmeans_never_leaves_a_cluster_empty():
    x = np.concatenate([np.zeros((30, 2)), np.ones((2, 2)) * 100]).astype(np.float32)
    result = get_backend("torch").kmeans(x, 4, iterations=5, seed=0)
    assert len(np.unique(result.assignment)) >= 2


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="unknown search backend"):
        get_backend("annoy")

import numpy as np
import pytest
import torch

from deepranking import retrieval
from deepranking.cli import UserError


def brute_force(q, db, k, exclude_self=False, largest=False):
    d = torch.cdist(torch.tensor(q, dtype=torch.float64), torch.tensor(db, dtype=torch.float64)).numpy()
    if exclude_self:
        np.fill_diagonal(d, -np.inf if largest else np.inf)
    key = -d if largest else d
    idx = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def test_knn_on_a_line_by_hand():
    db = np.array([[0.0], [1.0], [3.0], [7.0]])
    q = np.array([[2.0], [6.0]])
    dist, idx = retrieval.knn_search(q, db, k=3)
    # From 2: 1 (d=1) and 3 (d=1) tie -> lower index first, then 0 (d=2).
    assert idx.tolist() == [[1, 2, 0], [3, 2, 1]]
    np.testing.assert_allclose(dist, [[1, 1, 2], [1, 3, 5]])
    far_d, far_i = retrieval.knn_search(q, db, k=2, largest=True)
    assert far_i.tolist() == [[3, 0], [0, 1]]
    np.testing.assert_allclose(far_d, [[5, 2], [6, 5]])


def test_exclude_self_never_returns_the_query():
    db = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    dist, idx = retrieval.knn_search(db, db, k=2, exclude_self=True)
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0]]
    assert dist[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_equals_brute_force(chunk):
    rng = np.random.default_rng(0)
    db = rng.normal(size=(60, 5)).astype(np.float32)
    q = rng.normal(size=(23, 5)).astype(np.float32)
    dist, idx = retrieval.knn_search(q, db, k=10, chunk_size=chunk)
    ref_d, ref_i = brute_force(q, db, 10)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-5)
    dist, idx = retrieval.knn_search(db, db, k=5, chunk_size=chunk, exclude_self=True)
    np.testing.assert_array_equal(idx, brute_force(db, db, 5, exclude_self=True)[1])


@pytest.mark.parametrize("largest", [False, True])
def test_many_ties_take_the_lowest_indices(largest):
    # 30 identical database rows (more ties than topk's spare candidates): the lowest indices win.
    db = np.zeros((40, 3), dtype=np.float32)
    db[30:] = 10.0  # 10 far rows
    db[[5, 17]] = 0.5  # two slightly farther than the tied block
    q = np.zeros((2, 3), dtype=np.float32)
    dist, idx = retrieval.knn_search(q, db, k=4, chunk_size=1, largest=largest)
    expected = [30, 31, 32, 33] if largest else [0, 1, 2, 3]
    assert idx.tolist() == [expected, expected]
    assert dist[0].tolist() == pytest.approx([np.sqrt(300)] * 4 if largest else [0] * 4)
    _, idx = retrieval.knn_search(q, db, k=29, largest=largest)
    assert idx[0].tolist() == (list(range(30, 40)) + [5, 17] + [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12,
                                                               13, 14, 15, 16, 18] if largest else
                               [i for i in range(30) if i not in (5, 17)] + [5])


def test_index_searched_many_times_with_excluded_rows_and_a_small_memory_budget():
    rng = np.random.default_rng(2)
    db = rng.normal(size=(50, 4)).astype(np.float32)
    # 7 floats per chunk: one query row (of 50 distances) at a time, the smallest possible.
    index = retrieval.ExactIndex(db, "cpu", chunk_floats=7)
    sub = np.array([4, 9, 33])
    dist, idx = index.search(db[sub], 6, exclude_rows=sub)
    full_d, full_i = brute_force(db, db, 6, exclude_self=True)
    np.testing.assert_array_equal(idx, full_i[sub])
    np.testing.assert_allclose(dist, full_d[sub], rtol=1e-5, atol=1e-5)
    # The same index, another search: nothing excluded, so each row finds itself first.
    dist, idx = index.search(db[sub], 1)
    assert idx[:, 0].tolist() == sub.tolist() and np.allclose(dist, 0, atol=1e-3)
    with pytest.raises(UserError, match="dimension 3 does not match database dimension 4"):
        index.search(np.zeros((1, 3)), 1)


def test_k_too_large_is_a_clear_error():
    db = np.zeros((3, 2))
    with pytest.raises(UserError, match="k=3"):
        retrieval.knn_search(db, db, k=3, exclude_self=True)


def test_metrics_by_hand():
    qlab = ["a", "b"]
    nb = np.array([["a", "b", "a", "a"], ["a", "a", "a", "b"]])
    assert retrieval.precision_at_k(qlab, nb, 2) == pytest.approx((1 / 2 + 0) / 2)
    assert retrieval.precision_at_k(qlab, nb, 4) == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert retrieval.hit_at_k(qlab, nb, 2) == 0.5
    assert retrieval.hit_at_k(qlab, nb, 4) == 1.0
    assert retrieval.recall_at_1(qlab, nb) == 0.5
    assert retrieval.precision_at_k_curve(qlab, nb, [1, 2, 4]) == pytest.approx([0.5, 0.25, 0.5])
    # MAP@R: query a has R=3: relevant at 1 and 3 -> (1/1 + 2/3)/3; query b R=1: 0.
    assert retrieval.map_at_r(qlab, nb, [3, 1]) == pytest.approx(((1 + 2 / 3) / 3 + 0) / 2)
    table = retrieval.per_class_precision(qlab, nb, 4)
    assert table["class"].tolist() == ["a", "b"]
    assert table["precision_at_k"].tolist() == pytest.approx([0.75, 0.25])


def test_triplet_accuracy_by_hand():
    q = [[0, 0], [0, 0]]
    p = [[1, 0], [3, 0]]
    n = [[2, 0], [0, 1]]
    assert retrieval.triplet_accuracy(q, p, n) == 0.5


def test_drop_neighbours_removes_the_query_row_once():
    idx = np.array([[4, 2, 7], [1, 3, 5]])  # query rows 2 and 9 (9 is not among its neighbours)
    dist = np.array([[0.0, 0.0, 1.0], [0.5, 0.6, 0.7]])
    d, i = retrieval.drop_neighbours(dist, idx, [2, 9], k=2)
    assert i.tolist() == [[4, 7], [1, 3]]
    assert d.tolist() == [[0.0, 1.0], [0.5, 0.6]]

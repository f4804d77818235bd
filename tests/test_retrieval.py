import math

import numpy as np
import pytest
import torch

from deepranking import retrieval
from deepranking.cli import UserError


def brute_force(q, db, k, exclude_self=False, largest=False, exclude_rows=None):
    """float64 reference: difference-form distances of the float32 vectors, ordered by the
    float32-rounded distance (what search returns), ties by the lower database index."""
    q = np.asarray(q, dtype=np.float32).astype(np.float64)
    db = np.asarray(db, dtype=np.float32).astype(np.float64)
    d = np.sqrt(((q[:, None, :] - db[None, :, :]) ** 2).sum(-1))  # [Q, N]
    key = d.astype(np.float32).astype(np.float64)
    key = -key if largest else key
    if exclude_self:
        exclude_rows = np.arange(len(q))
    if exclude_rows is not None:
        hit = np.nonzero(np.asarray(exclude_rows) >= 0)[0]
        key[hit, np.asarray(exclude_rows)[hit]] = np.inf
    cols = np.broadcast_to(np.arange(db.shape[0]), key.shape)
    idx = np.lexsort((cols, key), axis=1)[:, :k]
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
    assert idx[:, 0].tolist() == sub.tolist() and (dist == 0).all()
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
    per_query = retrieval.precision_at_k_per_query(qlab, nb, 4)  # [3/4, 1/4]: mean 1/2, sample std sqrt(1/8)
    assert retrieval.standard_error(per_query) == pytest.approx(math.sqrt(1 / 8) / math.sqrt(2))
    assert math.isnan(retrieval.standard_error([0.5]))
    table = retrieval.per_class_precision(qlab, nb, 4)
    assert table["class"].tolist() == ["a", "b"]
    assert table["precision_at_k"].tolist() == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize("call, message", [
    (lambda nb: retrieval.precision_at_k(["a"], nb, 2), r"\(1,\) query labels for neighbour labels of shape \(2, 2\)"),
    (lambda nb: retrieval.precision_at_k(np.array(["a", "b"]), nb[None], 2), "expected \\[Q\\] and \\[Q, K\\]"),
    (lambda nb: retrieval.precision_at_k([], nb[:0], 2), "no queries to score"),
    (lambda nb: retrieval.precision_at_k_curve(["a", "b"], nb, [0]), "k=0 but only 4"),
    (lambda nb: retrieval.precision_at_k_curve(["a", "b"], nb, [1, 5]), "k=5 but only 4"),
    (lambda nb: retrieval.precision_at_k_curve(["a", "b"], nb, [-1]), "k=-1"),
])
def test_metrics_refuse_inputs_that_would_give_a_number_that_means_nothing(call, message):
    """One label broadcast over every row, no query at all, or k outside 1..K used to score."""
    nb = np.array([["a", "b", "a", "a"], ["a", "a", "a", "b"]])
    with pytest.raises(ValueError, match=message):
        call(nb)


def test_triplet_accuracy_refuses_nan():
    with pytest.raises(ValueError, match="NaN or infinity"):
        retrieval.triplet_accuracy([[0, 0]], [[1, 0]], [[np.nan, 0]])


def test_pair_distance_is_the_distance_the_index_returns_bit_for_bit():
    """get_distance.py and query.py / eval.py print the same digits for a pair (6 decimals
    differed in ~3 % of pairs when one was float64 and the other float32)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 4096)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist, idx = retrieval.ExactIndex(x, "cpu").search(x[:50], 20)
    pairs = [retrieval.pair_distance(x[q], x[j]) for q in range(50) for j in idx[q]]
    np.testing.assert_array_equal(np.array(pairs, dtype=np.float32), dist.ravel())


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


def _assert_exact(q, db, k, dist, idx, **kw):
    ref_d, ref_i = brute_force(q, db, k, **kw)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 3, 32, 512])
@pytest.mark.parametrize("largest", [False, True])
def test_equals_float64_brute_force_over_many_blocks(dim, largest):
    rng = np.random.default_rng(dim)
    n = 300
    db = rng.normal(size=(n, dim)).astype(np.float32)
    db[50:70] = db[10]  # exact duplicates: ties broken by the lower index
    db[100:160] = db[20] + 1e-3 * rng.normal(size=(60, dim)).astype(np.float32)  # near-duplicates
    q = np.concatenate([db[[10, 20, 5]], db[20:21] + 1e-4, rng.normal(size=(9, dim))]).astype(np.float32)
    k = 25
    # Budget for 2 query rows per [C, N] block: 7 blocks for 13 queries.
    index = retrieval.ExactIndex(db, "cpu", chunk_floats=2 * n + 1)
    dist, idx = index.search(q, k, largest=largest)
    _assert_exact(q, db, k, dist, idx, largest=largest)
    # Excluded rows (query i is database row sub[i]; -1: none), with the smallest budget.
    sub = np.array([10, 20, 5, -1, 7, 299, -1, 0, 1, 2, 3, 4, 50])
    qs = np.where(sub[:, None] >= 0, db[np.maximum(sub, 0)], q)
    index = retrieval.ExactIndex(db, "cpu", chunk_floats=1)
    dist, idx = index.search(qs, k, exclude_rows=sub, largest=largest)
    _assert_exact(qs, db, k, dist, idx, exclude_rows=sub, largest=largest)
    assert not (idx == sub[:, None]).any()
    # The same answer whatever the budget.
    d2, i2 = retrieval.ExactIndex(db, "cpu").search(qs, k, exclude_rows=sub, largest=largest)
    np.testing.assert_array_equal(i2, idx)
    np.testing.assert_array_equal(d2, dist)


@pytest.mark.parametrize("dim", [32, 512])
def test_no_slack_falls_back_to_more_candidates_and_stays_exact(dim, monkeypatch):
    """With no spare candidates, every row whose k-th neighbour is not proven must search
    again with more (near-duplicates make the float32 expanded formula's order wrong)."""
    monkeypatch.setattr(retrieval, "SLACK", 0)
    rng = np.random.default_rng(1)
    base = (100 * rng.normal(size=dim) / np.sqrt(dim)).astype(np.float32)  # norm ~100
    db = rng.normal(size=(400, dim)).astype(np.float32)
    db[::4] = base + 1e-3 * rng.normal(size=(100, dim)).astype(np.float32)
    q = np.stack([base, db[8], base + 1e-3]).astype(np.float32)
    calls = []
    rank = retrieval.ExactIndex._rank
    monkeypatch.setattr(retrieval.ExactIndex, "_rank", lambda self, *a: calls.append(a[1].shape[1]) or rank(self, *a))
    dist, idx = retrieval.ExactIndex(db, "cpu").search(q, 10)
    assert max(calls) > 10  # some row asked for more candidates
    _assert_exact(q, db, 10, dist, idx)
    assert dist[1, 0] == 0 and idx[1, 0] == 8


def test_grouped_top_k_of_a_wide_block():
    """Databases of >= 64 * 4 * (k + SLACK) rows take the grouped top-k (with a partial last group)."""
    rng = np.random.default_rng(3)
    n = 64 * 4 * (3 + retrieval.SLACK) + 37
    db = rng.normal(size=(n, 6)).astype(np.float32)
    db[n - 5] = db[n - 3] = db[1]  # ties in the partial last group and a full one
    q = np.concatenate([db[[1, n - 1, 100]], rng.normal(size=(4, 6))]).astype(np.float32)
    score = torch.from_numpy(rng.normal(size=(5, n)).astype(np.float32))
    vals, cols = retrieval._block_topk(score, 20)
    np.testing.assert_array_equal(vals, torch.topk(score, 20, dim=1, largest=False).values)
    np.testing.assert_array_equal(score.gather(1, cols), vals)
    dist, idx = retrieval.knn_search(q, db, 3)
    _assert_exact(q, db, 3, dist, idx)
    assert idx[0].tolist() == [1, n - 5, n - 3]
    sub = np.array([1, n - 1, 100, -1, -1, -1, -1])
    dist, idx = retrieval.ExactIndex(db, "cpu").search(q, 3, exclude_rows=sub)
    _assert_exact(q, db, 3, dist, idx, exclude_rows=sub)


def test_self_distance_is_exactly_zero_at_any_scale():
    rng = np.random.default_rng(4)
    for scale in (1e-3, 1.0, 1e3):
        db = (scale * rng.normal(size=(200, 64))).astype(np.float32)
        dist, idx = retrieval.knn_search(db, db, k=2)
        assert (idx[:, 0] == np.arange(200)).all()
        assert (dist[:, 0] == 0).all()
        assert (dist[:, 1] > 0).all()


@pytest.mark.parametrize("dim", [32, 512])
def test_small_distance_between_large_vectors_is_accurate(dim):
    """Norm-100 vectors 1e-4 apart: the expanded formula's float32 cancellation (~1e-3 in
    the squared distance) is gone; the distance is within 1e-6 (relative) of float64's."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, dim))
    x = (100 * x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    step = rng.normal(size=(50, dim))
    y = (x + 1e-4 * step / np.linalg.norm(step, axis=1, keepdims=True)).astype(np.float32)
    dist, idx = retrieval.knn_search(y, x, k=1)
    assert (idx[:, 0] == np.arange(50)).all()
    ref = np.linalg.norm(y.astype(np.float64) - x.astype(np.float64), axis=1)
    assert 5e-5 < ref.min() and ref.max() < 2e-4
    np.testing.assert_allclose(dist[:, 0], ref, rtol=1e-6, atol=0)
    assert np.abs(dist[:, 0] - ref).max() < 1e-6

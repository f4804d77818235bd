"""scoring.evaluate on plain arrays: the worked examples of test_eval.py and test_unseen_protocol.py,
called as the library function eval.py and the benches use."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepranking import embedding_io, retrieval, scoring
from deepranking.cli import UserError
from test_unseen_protocol import LABELS, MAP_AT_R, PRECISION_AT_2, R_PRECISION, RECALL_AT_1, X, eval_main

# Database on a line: class a at x=0,1,2; class b at x=10,11,12 (test_eval.write_files).
DB = np.array([[0, 0], [1, 0], [2, 0], [10, 0], [11, 0], [12, 0]], dtype=np.float32)
DB_LABELS = ["a"] * 3 + ["b"] * 3
# Queries: one "a" near 0; one "b" at 5, closer to the a's: 2 at 3, 1 at 4, then 0 and 10 tie at 5.
QUERIES = np.array([[0.1, 0], [5.0, 0]], dtype=np.float32)
QUERY_LABELS = ["a", "b"]
LINE = np.array([[x, 0.0] for x in X], dtype=np.float32)


def test_split_protocol_by_hand():
    result = scoring.evaluate(DB, DB_LABELS, QUERIES, QUERY_LABELS, 2, max_train_queries=10, device="cpu",
                              progress=False)
    m = result.metrics
    # Query a: 2 nearest are a, a -> 1.0. Query b at 5: nearest are 2 (a), 1 (a) -> 0.0.
    assert result.per_query["precision"].tolist() == [1.0, 0.0]
    assert m["test_precision_at_k"] == pytest.approx(0.5)
    assert m["test_precision_at_k_se"] == pytest.approx(0.5)  # per query [1, 0]: sample std sqrt(1/2) / sqrt(2)
    assert m["hit_at_k"] == pytest.approx(0.5) and m["recall_at_1"] == pytest.approx(0.5)
    # MAP@R, R = 3: query a -> 1; query b: order 2,1,0,3 -> no b in the first 3 -> 0.
    assert m["map_at_r"] == pytest.approx(0.5)
    assert result.per_query["map_at_r"].tolist() == pytest.approx([1.0, 0.0])
    # Train, self excluded, k=2: x=0 -> 1,2 (a,a); x=2 -> 1,0; x=10 -> 11,12 ... all pure.
    assert m["train_precision_at_k"] == pytest.approx(1.0) and m["num_train_queries"] == 6
    assert m["precision_at_k_curve"]["test"] == pytest.approx([0.5, 0.5])
    assert m["precision_at_k_curve"]["train"] == pytest.approx([1.0, 1.0])
    assert result.table["class"].tolist() == ["a", "b"] and result.table["precision_at_k"].tolist() == [1.0, 0.0]
    assert result.lone == [] and m["num_lone_queries"] == 0


def test_without_train_queries_only_the_queries_are_scored():
    """The benches' use: test precision alone, the same figures as with train precision."""
    full = scoring.evaluate(DB, DB_LABELS, QUERIES, QUERY_LABELS, 2, max_train_queries=10, device="cpu",
                            progress=False)
    bare = scoring.evaluate(DB, DB_LABELS, QUERIES, QUERY_LABELS, 2, device="cpu", progress=False)
    assert bare.metrics["train_precision_at_k"] is None and bare.metrics["num_train_queries"] == 0
    assert "train" not in bare.metrics["precision_at_k_curve"]
    for name, values in full.per_query.items():
        np.testing.assert_array_equal(bare.per_query[name], values)


def test_self_protocol_by_hand():
    result = scoring.evaluate(LINE, LABELS, LINE, LABELS, 2, protocol="self", max_train_queries=10, device="cpu",
                              progress=False)
    m = result.metrics
    assert m["recall_at_1"] == pytest.approx(RECALL_AT_1)
    assert m["r_precision"] == pytest.approx(R_PRECISION)
    assert m["map_at_r"] == pytest.approx(MAP_AT_R)
    assert m["test_precision_at_k"] == pytest.approx(PRECISION_AT_2)
    assert m["hit_at_k"] == pytest.approx(4 / 7)  # q0, q1, q4, q5 have a same-class item in 2
    assert m["num_lone_queries"] == 1 and result.lone == ["c"]
    assert m["train_precision_at_k"] is None  # the queries are the database: no train precision
    assert np.isnan(result.per_query["r_precision"][6])  # the lone query is not scored


def test_k_beyond_the_database_is_refused():
    with pytest.raises(UserError, match=r"--k 7 is larger than the database \(6 images besides the query\)"):
        scoring.evaluate(LINE, LABELS, LINE, LABELS, 7, protocol="self", device="cpu", progress=False)
    with pytest.raises(UserError, match=r"--k 7 is larger than the database \(6 images\)"):
        scoring.evaluate(DB, DB_LABELS, QUERIES, QUERY_LABELS, 7, device="cpu", progress=False)
    with pytest.raises(ValueError, match="queries to be the database"):
        scoring.evaluate(DB, DB_LABELS, QUERIES, QUERY_LABELS, 1, protocol="self", device="cpu", progress=False)


def test_small_neighbour_budget_gives_the_same_scores(monkeypatch):
    a = scoring.evaluate(LINE, LABELS, LINE, LABELS, 2, protocol="self", device="cpu", progress=False)
    monkeypatch.setattr(scoring, "NEIGHBOUR_BUDGET", 1)  # one query per block
    b = scoring.evaluate(LINE, LABELS, LINE, LABELS, 2, protocol="self", device="cpu", progress=False)
    assert a.metrics == b.metrics
    for name, values in a.per_query.items():
        np.testing.assert_array_equal(b.per_query[name], values)


def test_eval_writes_what_the_library_function_returns(tmp_path):
    """eval.py's metrics.json holds evaluate's metrics unchanged (plus its own file names)."""
    train = tmp_path / "train.txt"
    test = tmp_path / "test.txt"
    embedding_io.write_embeddings(train, [f"/db/{i}.png" for i in range(6)], DB_LABELS, DB, progress=False)
    embedding_io.write_embeddings(test, ["/q/0.png", "/q/1.png"], QUERY_LABELS, QUERIES, progress=False)
    eval_main("--train-embeddings", train, "--test-embeddings", test, "--k", 2, "--output-dir", tmp_path / "o",
              "--device", "cpu", "--seed", 3)
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())
    result = scoring.evaluate(DB, DB_LABELS, QUERIES, QUERY_LABELS, 2, retrieval.ExactIndex(DB, "cpu"),
                              max_train_queries=10_000, seed=3, progress=False)
    assert {k: written[k] for k in result.metrics} == json.loads(json.dumps(result.metrics))


def test_achievable_precision_and_the_classes_below_k_by_hand():
    # R = 3 other items of the class with k = 4: at most 3 of the 4 right; R = 0 (lone): none; R >= k: all
    np.testing.assert_array_equal(scoring.achievable_precision(np.array([3, 0, 10, 4]), 4), [0.75, 0.0, 1.0, 1.0])
    names = np.array(["a", "b", "c"])
    assert scoring.classes_below_k(names, np.array([0, 1, 2, 0]), np.array([3, 0, 10, 3]), 4) == ["a", "b"]
    assert scoring.classes_below_k(names, np.array([2]), np.array([10]), 4) == []


def test_precision_at_k_beside_its_ceiling_on_classes_smaller_than_k():
    result = scoring.evaluate(DB, DB_LABELS, QUERIES, QUERY_LABELS, 4, max_train_queries=10, device="cpu",
                              progress=False)
    m = result.metrics
    # Query a at 0.1: 0, 1, 2 (a), 3 (b) -> 3/4, its best; query b at 5: 2, 1, 0 (a; 0 and 3 tie at 5,
    # the lower index first), 3 (b) -> 1/4. Both classes have R = 3 < 4: the ceiling is 3/4.
    assert result.per_query["precision"].tolist() == [0.75, 0.25]
    assert m["test_precision_at_k_max"] == 0.75 and m["classes_below_k"] == ["a", "b"]
    assert m["train_precision_at_k_max"] == 0.5  # a database row has 2 others of its class: 2/4
    # k within every class: no ceiling
    m2 = scoring.evaluate(DB, DB_LABELS, QUERIES, QUERY_LABELS, 2, max_train_queries=10, device="cpu",
                          progress=False).metrics
    assert (m2["test_precision_at_k_max"], m2["train_precision_at_k_max"], m2["classes_below_k"]) == (1.0, 1.0, [])
    # Leave-one-out on LINE at k = 2: a and b have R = 2 (1 each), c is alone (0): 6/7
    m3 = scoring.evaluate(LINE, LABELS, LINE, LABELS, 2, protocol="self", device="cpu", progress=False).metrics
    assert m3["test_precision_at_k_max"] == pytest.approx(6 / 7) and m3["classes_below_k"] == ["c"]
    assert m3["train_precision_at_k_max"] is None


def test_best_and_worst_lists_never_show_a_class_twice():
    table = retrieval.per_class_mean(list("abcdefg"), [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    best, worst = scoring.best_and_worst(table, 5)  # 7 classes < 2 x 5: every class once, best first
    assert best["class"].tolist() == list("abcdefg") and len(worst) == 0
    best, worst = scoring.best_and_worst(table, 3)  # 7 >= 2 x 3: two lists that share none
    assert best["class"].tolist() == ["a", "b", "c"] and worst["class"].tolist() == ["g", "f", "e"]

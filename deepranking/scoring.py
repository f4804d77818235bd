"""Scoring an embedding database: an index + query labels -> every metric, per query and summarised.

The one place that turns neighbour searches into the figures eval.py writes to
metrics.json (precision@k with its standard error and its ceiling on classes smaller
than k + 1, hit@k, recall@1, R-precision, MAP@R, the precision@1..k curve, train
precision) and that the benches report.
The metrics themselves are the pure functions of :mod:`retrieval`; this module
decides how deep each query searches, scores queries in bounded blocks and
summarises them.

Inputs are plain arrays: embeddings [N, d] and one class label per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deepranking import cli, retrieval
from deepranking.cli import UserError

# Neighbour entries ([queries, depth] int64 indices + int32 labels) held at once: 2**24 = ~200 MB.
NEIGHBOUR_BUDGET = 1 << 24
PROTOCOLS = ("split", "self")  # the queries against another database, or against themselves (leave-one-out)


@dataclass
class Evaluation:
    """What :func:`evaluate` found.

    metrics: the summary (the keys of eval.py's metrics.json that scoring decides);
    per_query: float arrays [Q] of the queries (see :func:`score_queries`), without "curve";
    table: pandas DataFrame (class, n_queries, precision_at_k), best first;
    lone: the query classes with no other item of their class in the database, sorted.
    """

    metrics: dict
    per_query: dict
    table: object
    lone: list[str]


def label_codes(db_labels: np.ndarray, query_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class names, int32 codes of the database labels, of the query labels): neighbours' labels
    are gathered as 4-byte codes instead of strings."""
    db_labels, query_labels = np.asarray(db_labels), np.asarray(query_labels)
    names, codes = np.unique(np.concatenate([db_labels.astype(str), query_labels.astype(str)]), return_inverse=True)
    codes = codes.astype(np.int32)
    return names, codes[:len(db_labels)], codes[len(db_labels):]


def same_class_counts(q_codes: np.ndarray, db_codes: np.ndarray, self_search: bool) -> np.ndarray:
    """R per query (Musgrave et al.): the OTHER database items of its class (itself excluded
    when the queries are database rows)."""
    counts = np.bincount(db_codes, minlength=int(max(db_codes.max(initial=0), q_codes.max(initial=0))) + 1)
    r = counts[q_codes].astype(np.int64)
    return r - 1 if self_search else r


def achievable_precision(r: np.ndarray, k: int) -> np.ndarray:
    """The best precision@k each query can reach, min(k, R) / k (R: same_class_counts): float64 [Q].

    A query whose class has fewer than k other database items scores below 1 even when every
    one of them comes first; the mean is the ceiling to read precision@k against.
    """
    return np.minimum(np.asarray(r, dtype=np.int64).clip(min=0), k) / k


def classes_below_k(names: np.ndarray, q_codes: np.ndarray, r: np.ndarray, k: int) -> list[str]:
    """The query classes with fewer than k same-class database items (R < k), whose precision@k
    cannot reach 1, sorted."""
    return sorted({str(names[c]) for c in q_codes[np.asarray(r) < k]})


def best_and_worst(table, n: int):
    """(best, worst) rows of a per-class table sorted best first (retrieval.per_class_mean): the first
    ``n`` and the last ``n``, worst first. With fewer than 2n classes the two would share classes,
    so every class is shown once instead: (the whole table, best first; an empty table)."""
    if len(table) < 2 * n:
        return table, table.iloc[0:0]
    return table.head(n), table.tail(n).iloc[::-1]


def check_k(k: int, n_database: int, self_search: bool) -> None:
    """Refuse a k larger than the database (besides the query itself in a self search)."""
    available = n_database - (1 if self_search else 0)
    if k > available:
        raise UserError(f"--k {k} is larger than the database ({available} images"
                        f"{' besides the query' if self_search else ''})")


@dataclass
class Grades:
    """A class hierarchy as codes: the parent code of each class code, int [C], and, per query, the
    database items of another class under its parent, int [Q] (the ideal ranking's gain-1 items)."""

    parent_of: np.ndarray
    siblings: np.ndarray


def class_grades(names: np.ndarray, q_codes: np.ndarray, db_codes: np.ndarray, parents: dict) -> Grades:
    """Grades of the queries from ``parents`` (class name -> parent, image_data.read_class_hierarchy);
    UserError naming a class the hierarchy does not list."""
    missing = [str(n) for n in names if str(n) not in parents]
    if missing:
        raise UserError(f"the class hierarchy gives no parent for {len(missing)} class(es) of the embeddings, "
                        f"e.g. {missing[0]!r}")
    _, parent_of = np.unique([parents[str(n)] for n in names], return_inverse=True)
    per_parent = np.bincount(parent_of[db_codes], minlength=int(parent_of.max(initial=0)) + 1)
    per_class = np.bincount(db_codes, minlength=len(names))
    return Grades(parent_of, per_parent[parent_of[q_codes]] - per_class[q_codes])


def score_queries(index: retrieval.ExactIndex, queries: np.ndarray, q_codes: np.ndarray, db_codes: np.ndarray,
                  k: int, r: np.ndarray, exclude_rows: np.ndarray | None = None, chunk_size: int | None = None,
                  progress: bool = True, desc: str = "scoring", neighbour_budget: int = NEIGHBOUR_BUDGET,
                  max_block: int | None = None, grades: Grades | None = None) -> dict:
    """Per-query metrics of ``queries`` against ``index`` (whose labels are ``db_codes``).

    ``index``: a retrieval.ExactIndex, or anything with its ``search`` and ``len`` (database.StreamingIndex);
    ``queries``: [Q, d], any object whose slices are float arrays (a database.Database too).
    Each query fetches max(k, max R) neighbours (R: see same_class_counts), enough for
    R-precision and MAP@R of the largest class. Queries go ``neighbour_budget`` // depth (and at most
    ``max_block``) at a time, so the [block, depth] neighbour indices and labels and the block's query
    vectors stay within the budget whatever the number of queries (the index bounds its own distance block).
    Returns float arrays [Q]: precision (at k), hit (at k), recall_at_1, r_precision,
    map_at_r (NaN where R = 0), and "curve": precision@1..k averaged over all queries. With
    ``grades`` (a class hierarchy) also parent_precision (at k: neighbours under the query's parent)
    and ndcg (at k, graded gains; NaN where nothing in the database is relevant).
    """
    n_q = len(queries)
    available = len(index) - (1 if exclude_rows is not None else 0)
    depth = int(min(available, max(k, int(r.max(initial=0)), 1)))
    block = max(1, min(neighbour_budget // depth, max_block or n_q))
    names = ("precision", "hit", "recall_at_1", "r_precision", "map_at_r")
    out = {name: np.empty(n_q, dtype=np.float64)
           for name in names + (("parent_precision", "ndcg") if grades is not None else ())}
    curve = np.zeros(k, dtype=np.float64)
    ks = list(range(1, k + 1))
    with cli.progress(total=n_q, desc=desc, unit="query", enabled=progress, leave=False) as bar:
        for s in range(0, n_q, block):
            e = min(n_q, s + block)
            rows = None if exclude_rows is None else exclude_rows[s:e]
            _, idx = index.search(queries[s:e], depth, exclude_rows=rows, chunk_size=chunk_size)  # [b, depth]
            nb, ql, rr = db_codes[idx], q_codes[s:e], np.minimum(r[s:e], depth)
            out["precision"][s:e] = retrieval.precision_at_k_per_query(ql, nb, k)
            out["hit"][s:e] = retrieval.matches(ql, nb[:, :k]).any(1)
            out["recall_at_1"][s:e] = retrieval.recall_at_1_per_query(ql, nb, rr)
            out["r_precision"][s:e] = retrieval.r_precision_per_query(ql, nb, rr)
            out["map_at_r"][s:e] = retrieval.map_at_r_per_query(ql, nb, rr)
            curve += np.asarray(retrieval.precision_at_k_curve(ql, nb, ks)) * (e - s)
            if grades is not None:
                pq, pnb = grades.parent_of[ql], grades.parent_of[nb[:, :k]]
                out["parent_precision"][s:e] = retrieval.precision_at_k_per_query(pq, pnb, k)
                gains = retrieval.graded_gains(ql, nb[:, :k], pq, pnb)
                out["ndcg"][s:e] = retrieval.ndcg_at_k_per_query(gains, r[s:e], grades.siblings[s:e], k)
            bar.update(e - s)
    out["curve"] = curve / max(n_q, 1)
    return out


def mean_or_none(values: np.ndarray) -> float | None:
    """Mean over the scored (non-NaN) queries; None (null in metrics.json) if there are none."""
    scored = values[~np.isnan(values)]
    return float(scored.mean()) if len(scored) else None


def none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def evaluate(db_emb: np.ndarray, db_labels, query_emb: np.ndarray, query_labels, k: int,
             index: retrieval.ExactIndex | None = None, *, protocol: str = "split", max_train_queries: int = 0,
             seed: int = 0, chunk_size: int | None = None, device=None, progress: bool = True,
             parents: dict | None = None, neighbour_budget: int = NEIGHBOUR_BUDGET,
             max_block: int | None = None) -> Evaluation:
    """Every metric of the queries ``query_emb`` [Q, d] (labels [Q]) against the database ``db_emb`` [N, d]
    (labels [N]), searched through ``index`` (default: an ExactIndex over ``db_emb`` on ``device``).
    ``db_emb`` and ``query_emb`` may be database.Database objects: only their slices and the train
    precision's rows are read, so a database larger than memory is scored through a
    database.StreamingIndex; ``neighbour_budget`` and ``max_block``: see score_queries.

    protocol "split": the queries search the database; with ``max_train_queries`` > 0 also train
    precision (a subset of at most that many database rows, drawn with ``seed``, each its own row
    excluded). protocol "self": the queries are the database (pass the same arrays twice), each
    query's own row excluded (leave-one-out, Musgrave et al. 2020's unseen-class protocol).
    Recall@1, R-precision and MAP@R leave out queries with R = 0 (Musgrave's "lone" queries);
    precision@k and hit@k count every query (the classic protocol). ``parents`` (class -> parent, a
    class hierarchy) adds parent-level precision@k and NDCG@k (same class 2 > same parent 1 > other 0).
    """
    self_search = _check_protocol(protocol, len(db_emb), len(query_emb))
    check_k(k, len(db_emb), self_search)
    index = retrieval.ExactIndex(db_emb, device) if index is None else index
    query_labels = np.asarray(query_labels)
    names, db_codes, q_codes = label_codes(db_labels, query_labels)
    r = same_class_counts(q_codes, db_codes, self_search)
    exclude = np.arange(len(query_emb)) if self_search else None
    grades = class_grades(names, q_codes, db_codes, parents) if parents is not None else None
    blocks = {"neighbour_budget": neighbour_budget, "max_block": max_block}
    s = score_queries(index, query_emb, q_codes, db_codes, k, r, exclude, chunk_size, progress,
                      desc="scoring queries", grades=grades, **blocks)
    lone = sorted({str(names[c]) for c in q_codes[r <= 0]})
    metrics = {
        "protocol": protocol,
        "k": k,
        "test_precision_at_k": float(s["precision"].mean()),
        # Another draw of as many queries moves the figure by about this much; None with one query.
        "test_precision_at_k_se": none_if_nan(retrieval.standard_error(s["precision"])),
        # the mean of min(k, R) / k: below 1 when classes have fewer than k other database items
        "test_precision_at_k_max": float(achievable_precision(r, k).mean()),
        "hit_at_k": float(s["hit"].mean()),
        "recall_at_1": mean_or_none(s["recall_at_1"]),
        "r_precision": mean_or_none(s["r_precision"]),
        "map_at_r": mean_or_none(s["map_at_r"]),
        "precision_at_k_curve": {"k": list(range(1, k + 1)), "test": s["curve"].tolist()},
        "num_test_queries": len(query_emb),
        "num_database": len(db_emb),
        "num_lone_queries": int((r <= 0).sum()),
        "lone_classes": lone,
        "classes_below_k": classes_below_k(names, q_codes, r, k),
        **_graded_metrics(s),
    }
    table = retrieval.per_class_mean(query_labels, s["precision"])
    wanted = not self_search and max_train_queries > 0 and len(db_emb) - 1 >= k
    _add_train_precision(metrics, index, db_emb, db_codes, k, max_train_queries if wanted else 0, seed,
                         chunk_size, progress, blocks)
    per_query = {name: values for name, values in s.items() if name != "curve"}
    return Evaluation(metrics, per_query, table, lone)


def _check_protocol(protocol: str, n_database: int, n_queries: int) -> bool:
    """Whether the protocol is a self search (ValueError for an unknown one, or "self" on two sets)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "self" and n_database != n_queries:
        raise ValueError("protocol 'self' needs the queries to be the database")
    return protocol == "self"


def _add_train_precision(metrics: dict, index: retrieval.ExactIndex, db_emb: np.ndarray, db_codes: np.ndarray,
                         k: int, max_queries: int, seed: int, chunk_size: int | None, progress: bool,
                         blocks: dict) -> None:
    """metrics' train_precision_at_k, its ceiling, its curve and query count (None, 0 with no queries)."""
    if max_queries <= 0:
        metrics.update(train_precision_at_k=None, train_precision_at_k_max=None, num_train_queries=0)
        return
    t, n_train = train_precision(index, db_emb, db_codes, k, max_queries, seed, chunk_size, progress, **blocks)
    metrics["train_precision_at_k"] = float(t["precision"].mean())
    metrics["train_precision_at_k_max"] = float(t["achievable"].mean())
    metrics["precision_at_k_curve"]["train"] = t["curve"].tolist()
    metrics["num_train_queries"] = n_train


def _graded_metrics(scores: dict) -> dict:
    """Parent-level precision@k and NDCG@k of score_queries' arrays, when it had a hierarchy."""
    if "ndcg" not in scores:
        return {}
    return {"parent_precision_at_k": float(scores["parent_precision"].mean()),
            "ndcg_at_k": mean_or_none(scores["ndcg"])}


def train_precision(index: retrieval.ExactIndex, db_emb: np.ndarray, db_codes: np.ndarray, k: int,
                    max_queries: int, seed: int, chunk_size: int | None = None,
                    progress: bool = True, **blocks) -> tuple[dict, int]:
    """Train precision: a seeded subset of at most ``max_queries`` database rows queries the
    database, each its own row excluded. Returns (score_queries' arrays plus "achievable", each
    query's achievable_precision, the number of queries); ``blocks``: score_queries' neighbour_budget
    and max_block."""
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(len(db_emb), size=min(len(db_emb), max_queries), replace=False))
    t = score_queries(index, RowsOf(db_emb, sub), db_codes[sub], db_codes, k, np.zeros(len(sub), dtype=np.int64),
                      sub, chunk_size, progress, desc="scoring train queries", **blocks)
    t["achievable"] = achievable_precision(same_class_counts(db_codes[sub], db_codes, True), k)
    return t, int(len(sub))


class RowsOf:
    """Rows ``rows`` of ``emb`` (an array or a database.Database) as queries, read a block (slice) at a time."""

    def __init__(self, emb, rows: np.ndarray):
        self.emb, self.rows = emb, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, block: slice) -> np.ndarray:
        return self.emb[self.rows[block]]

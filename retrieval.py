"""Exact nearest-neighbour search and retrieval metrics (the one place for both).

Search is DINO-``eval_knn``-style: chunked matrix products + ``topk`` in torch,
on the GPU when there is one, with memory bounded by ``chunk_size x N`` floats
whatever the number of queries. Metrics are small pure functions over the
labels of each query's neighbours.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from cli_utils import UserError


def _as_tensor(x, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
    return t.to(device)


def knn_search(
    queries,
    database,
    k: int,
    chunk_size: int = 1024,
    exclude_self: bool = False,
    device=None,
    largest: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest (or, with ``largest``, farthest) database rows of each query.

    queries: [Q, d], database: [N, d] (numpy or torch). Returns (dist [Q, k]
    float32 Euclidean, idx [Q, k] int64), sorted by distance. ``exclude_self``:
    query i is database row i (train-vs-train), which is never returned.
    Ties (equal float32 distances) are broken by the lower database index.
    """
    if device is None or device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    db = _as_tensor(database, device)
    q_all = _as_tensor(queries, device)
    n, d = db.shape
    if q_all.shape[1] != d:
        raise UserError(f"query dimension {q_all.shape[1]} does not match database dimension {d}")
    available = n - 1 if exclude_self else n
    if k < 1 or k > available:
        raise UserError(f"k={k} is out of range: the database has {available} candidate(s) per query")
    if exclude_self and q_all.shape[0] != n:
        raise ValueError("exclude_self needs the queries to be the database")
    # float32 matmuls (a float64 copy of a 100k x 4096 database costs 3 GB and 2x the time);
    # ties are ordered by database index below.
    work_dtype = torch.float32
    db_w = db.to(work_dtype)
    db_sq = (db_w * db_w).sum(1)  # [N]
    out_d = np.empty((q_all.shape[0], k), dtype=np.float32)
    out_i = np.empty((q_all.shape[0], k), dtype=np.int64)
    # Take a few extra candidates so that a stable re-sort can fix tie order at the k boundary.
    extra = min(available - k, 8)
    for start in range(0, q_all.shape[0], chunk_size):
        q = q_all[start:start + chunk_size].to(work_dtype)  # [C, d]
        sq = (q * q).sum(1, keepdim=True) - 2.0 * q @ db_w.T + db_sq  # [C, N] squared distances
        sq.clamp_(min=0.0)
        if exclude_self:
            rows = torch.arange(q.shape[0], device=sq.device)
            sq[rows, rows + start] = -float("inf") if largest else float("inf")
        vals, idx = torch.topk(sq, k + extra, dim=1, largest=largest, sorted=True)
        # Stable ordering: by distance, then by database index.
        order_key = idx.to(torch.float64) / n  # in [0, 1)
        vals64 = vals.to(torch.float64)
        sign = -1.0 if largest else 1.0
        perm = np.lexsort((order_key.cpu().numpy(), sign * vals64.cpu().numpy()), axis=1)[:, :k]
        idx_np = np.take_along_axis(idx.cpu().numpy(), perm, axis=1)
        vals_np = np.take_along_axis(vals64.cpu().numpy(), perm, axis=1)
        # More entries tied with the k-th value than the k + extra candidates hold (e.g. many
        # duplicate images): topk picked an arbitrary subset of them, so sort those rows fully.
        kth = vals[:, k - 1 : k]
        reach = (sq >= kth) if largest else (sq <= kth)
        for r in torch.nonzero(reach.sum(1) > k + extra).flatten().tolist():
            row_vals, row_idx = torch.sort(sq[r], descending=largest, stable=True)
            idx_np[r] = row_idx[:k].cpu().numpy()
            vals_np[r] = row_vals[:k].to(torch.float64).cpu().numpy()
        out_i[start:start + q.shape[0]] = idx_np
        out_d[start:start + q.shape[0]] = np.sqrt(vals_np).astype(np.float32)
    return out_d, out_i


def drop_neighbours(dist: np.ndarray, idx: np.ndarray, rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove, per query q, the neighbour equal to database row ``rows[q]`` and keep the first k.

    For a search of k+1 neighbours whose queries are database rows (e.g. a seeded
    subset of the train set): a query that is not among its own neighbours
    (duplicates at distance 0) keeps its first k, order unchanged.
    """
    keep = idx != np.asarray(rows)[:, None]  # [Q, k+1]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


def _check_k(neighbour_labels: np.ndarray, k: int) -> None:
    if k < 1 or k > neighbour_labels.shape[1]:
        raise ValueError(f"k={k} but only {neighbour_labels.shape[1]} neighbours given")


def matches(query_labels: Sequence, neighbour_labels) -> np.ndarray:
    """bool [Q, K]: neighbour j of query i has query i's label."""
    q = np.asarray(query_labels)
    nb = np.asarray(neighbour_labels)
    return nb == q[:, None]


def precision_at_k(query_labels, neighbour_labels, k: int) -> float:
    """Mean over queries of the fraction of the first k neighbours sharing the query's class."""
    nb = np.asarray(neighbour_labels)
    _check_k(nb, k)
    return float(matches(query_labels, nb[:, :k]).mean())


def precision_at_k_curve(query_labels, neighbour_labels, ks: Sequence[int]) -> list[float]:
    """precision_at_k for each k in ``ks`` (one pass over the match matrix)."""
    m = matches(query_labels, neighbour_labels)
    cum = np.cumsum(m, axis=1)
    return [float((cum[:, k - 1] / k).mean()) for k in ks]


def hit_at_k(query_labels, neighbour_labels, k: int) -> float:
    """Fraction of queries with at least one same-class neighbour among the first k.

    This is what the classic TinyImageNet code reported as "accuracy at k=30".
    """
    nb = np.asarray(neighbour_labels)
    _check_k(nb, k)
    return float(matches(query_labels, nb[:, :k]).any(axis=1).mean())


def recall_at_1(query_labels, neighbour_labels) -> float:
    """Fraction of queries whose nearest neighbour shares their class."""
    return hit_at_k(query_labels, neighbour_labels, 1)


def map_at_r(query_labels, neighbour_labels, r_per_query) -> float:
    """MAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check").

    R_i = number of database items of query i's class (self excluded where it
    applies); needs at least max(R_i) neighbours. For each query:
    (1/R) * sum_{j<=R} P@j * [neighbour j relevant].
    """
    nb = np.asarray(neighbour_labels)
    r = np.asarray(r_per_query, dtype=np.int64)
    if (r > nb.shape[1]).any():
        raise ValueError(f"MAP@R needs {int(r.max())} neighbours, got {nb.shape[1]}")
    m = matches(query_labels, nb).astype(np.float64)  # [Q, K]
    j = np.arange(1, nb.shape[1] + 1)
    prec = np.cumsum(m, axis=1) / j  # P@j
    within_r = j[None, :] <= r[:, None]
    ap = np.where(r > 0, (prec * m * within_r).sum(1) / np.maximum(r, 1), 0.0)
    return float(ap.mean())


def per_class_precision(query_labels, neighbour_labels, k: int):
    """pandas DataFrame (class, n_queries, precision_at_k), sorted best first."""
    import pandas as pd

    nb = np.asarray(neighbour_labels)
    _check_k(nb, k)
    per_query = matches(query_labels, nb[:, :k]).mean(1)
    df = pd.DataFrame({"class": np.asarray(query_labels).astype(str), "p": per_query})
    table = df.groupby("class").agg(n_queries=("p", "size"), precision_at_k=("p", "mean")).reset_index()
    return table.sort_values(["precision_at_k", "class"], ascending=[False, True]).reset_index(drop=True)


def triplet_accuracy(q, p, n) -> float:
    """Fraction of triplets ranked correctly: D(q, p) < D(q, n) (Euclidean)."""
    q, p, n = (np.asarray(a, dtype=np.float64) for a in (q, p, n))
    return float((np.linalg.norm(q - p, axis=1) < np.linalg.norm(q - n, axis=1)).mean())

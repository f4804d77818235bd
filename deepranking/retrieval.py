"""Exact nearest-neighbour search and retrieval metrics (the one place for both).

Search is DINO-``eval_knn``-style: chunked matrix products + ``topk`` in torch,
on the GPU when there is one, with memory bounded by ``CHUNK_FLOATS`` (a
[C, N] block) whatever the number of queries. :class:`ExactIndex` keeps one
database loaded for many searches (eval.py, query.py). Metrics are small pure functions over the
labels of each query's neighbours.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from deepranking.cli import UserError, pick_device


# Per-chunk budget for the [C, N] float32 distance block: 2**26 floats = 256 MB, whatever
# the number of queries (C = budget // N rows at a time, at least one).
CHUNK_FLOATS = 1 << 26


def _as_tensor(x, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
    return t.to(device)


class ExactIndex:
    """Exact Euclidean k-NN against one database, searched many times after one load.

    The database stays float32 on ``device`` (no copy of a float32 CPU array) and its
    squared norms are computed once. Each search works through the queries in chunks
    of C rows so that the [C, N] distance block stays within ``chunk_floats`` floats.
    Ties (equal float32 distances) are broken by the lower database index, so results
    do not depend on the chunk size or the device.
    """

    def __init__(self, database, device=None, chunk_floats: int = CHUNK_FLOATS):
        self.device = pick_device("auto" if device is None else device)
        self.db = _as_tensor(database, self.device)  # [N, d] float32
        if self.db.ndim != 2:
            raise ValueError(f"database must be [N, d], got shape {tuple(self.db.shape)}")
        self.db_sq = (self.db * self.db).sum(1)  # [N]
        self.chunk_floats = chunk_floats

    def __len__(self) -> int:
        return int(self.db.shape[0])

    def search(self, queries, k: int, exclude_rows=None, largest: bool = False,
               chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest (or, with ``largest``, farthest) database rows of each query.

        queries: [Q, d] (numpy or torch). exclude_rows: int [Q], a database row never
        returned for that query (-1: none) — the query itself in train-vs-train search.
        Returns (dist [Q, k] float32 Euclidean, idx [Q, k] int64), sorted by distance.
        """
        q_all = _as_tensor(queries, self.device)
        n, d = self.db.shape
        if q_all.ndim != 2 or q_all.shape[1] != d:
            raise UserError(f"query dimension {q_all.shape[-1]} does not match database dimension {d}")
        excluded = None
        if exclude_rows is not None:
            excluded = torch.as_tensor(np.asarray(exclude_rows, dtype=np.int64)).to(self.device)  # [Q]
            if excluded.shape != (q_all.shape[0],):
                raise ValueError("exclude_rows needs one database row (or -1) per query")
        available = n - 1 if excluded is not None and bool((excluded >= 0).any()) else n
        if k < 1 or k > available:
            raise UserError(f"k={k} is out of range: the database has {available} candidate(s) per query")
        chunk = chunk_size or max(1, self.chunk_floats // n)
        out_d = np.empty((q_all.shape[0], k), dtype=np.float32)
        out_i = np.empty((q_all.shape[0], k), dtype=np.int64)
        # A few extra candidates so that a stable re-sort can fix tie order at the k boundary.
        extra = min(available - k, 8)
        for start in range(0, q_all.shape[0], chunk):
            q = q_all[start:start + chunk]  # [C, d]
            # ||x||^2 - 2 q.x + ||q||^2 in one [C, N] buffer (float32 matmul: a float64 copy
            # of a 100k x 4096 database would cost 3 GB and twice the time).
            sq = torch.addmm(self.db_sq, q, self.db.T, beta=1.0, alpha=-2.0)  # [C, N]
            sq.add_((q * q).sum(1, keepdim=True)).clamp_(min=0.0)
            if excluded is not None:
                rows = excluded[start:start + chunk]
                hit = torch.nonzero(rows >= 0).flatten()
                sq[hit, rows[hit]] = -float("inf") if largest else float("inf")
            vals, idx = torch.topk(sq, k + extra, dim=1, largest=largest, sorted=True)
            # Stable ordering: by distance, then by database index.
            vals64 = vals.to(torch.float64).cpu().numpy()
            idx_np = idx.cpu().numpy()
            sign = -1.0 if largest else 1.0
            perm = np.lexsort((idx_np, sign * vals64), axis=1)[:, :k]
            idx_np = np.take_along_axis(idx_np, perm, axis=1)
            vals_np = np.take_along_axis(vals64, perm, axis=1)
            # More entries tied with the k-th value than the k + extra candidates hold (e.g. many
            # duplicate images): topk picked an arbitrary subset of them, so sort those rows fully.
            kth = vals[:, k - 1 : k]
            reach = ((sq >= kth) if largest else (sq <= kth)).sum(1)  # [C]
            for r in torch.nonzero(reach > k + extra).flatten().tolist():
                row_vals, row_idx = torch.sort(sq[r], descending=largest, stable=True)
                idx_np[r] = row_idx[:k].cpu().numpy()
                vals_np[r] = row_vals[:k].to(torch.float64).cpu().numpy()
            out_i[start:start + q.shape[0]] = idx_np
            out_d[start:start + q.shape[0]] = np.sqrt(vals_np).astype(np.float32)
        return out_d, out_i


def knn_search(
    queries,
    database,
    k: int,
    chunk_size: int | None = None,
    exclude_self: bool = False,
    device=None,
    largest: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One search with a throw-away :class:`ExactIndex` (see there).

    queries: [Q, d], database: [N, d]. ``exclude_self``: query i is database row i
    (train-vs-train), which is never returned. ``chunk_size``: queries per matrix
    product (default: as many as fit the index's memory budget).
    """
    index = ExactIndex(database, device)
    exclude_rows = None
    if exclude_self:
        if len(queries) != len(index):
            raise ValueError("exclude_self needs the queries to be the database")
        exclude_rows = np.arange(len(index))
    return index.search(queries, k, exclude_rows=exclude_rows, largest=largest, chunk_size=chunk_size)


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

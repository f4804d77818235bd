"""Exact nearest-neighbour search and retrieval metrics (the one place for both).

Search is DINO-``eval_knn``-style: chunked matrix products + ``topk`` in torch,
on the GPU when there is one, with memory bounded by ``CHUNK_FLOATS`` (a
[C, N] block) whatever the number of queries. The candidates' distances are then
recomputed exactly from the vectors (||q - x||, not the expanded formula) and re-ranked,
so results are the exact top-k, ties to the lower index (see :class:`ExactIndex`).
:class:`ExactIndex` keeps one database loaded for many searches (eval.py, query.py).
Metrics are small pure functions over the labels of each query's neighbours.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from deepranking.cli import UserError
from deepranking.runtime import pick_device


# Per-chunk budget for the [C, N] float32 distance block: 2**26 floats = 256 MB, whatever
# the number of queries (C = budget // N rows at a time, at least one).
CHUNK_FLOATS = 1 << 26

# Candidates beyond k taken from each block's top-k, so that the exact re-ranking can fix
# the order the float32 expanded formula got wrong near the k-th neighbour.
SLACK = 16

_U32 = 2.0 ** -24  # float32 unit roundoff

# Unit roundoff of a float32 matrix product at each torch.get_float32_matmul_precision().
_MATMUL_ROUNDOFF = {"highest": _U32, "high": 2.0 ** -11, "medium": 2.0 ** -8}


def _as_tensor(x, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
    return t.to(device)


def _dot_error_factor(d: int) -> float:
    """Relative error bound of a float32 dot product of length d (plus the added norm).

    The classic worst case gamma_n = n u / (1 - n u), any summation order. Under reduced
    matmul precision (TF32 / bfloat16) that bound is useless for long vectors, and a
    statistical one (8 sqrt(n) u) is used instead.
    """
    u = _MATMUL_ROUNDOFF.get(torch.get_float32_matmul_precision(), 2.0 ** -8)
    n = d + 2
    if n * u < 0.01:
        return n * u / (1 - n * u)
    return 8 * math.sqrt(n) * u


_GROUP = 64  # columns per group in _block_topk


def _block_topk(score: torch.Tensor, want: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(score, want, dim=1, largest=False, sorted=True)`` of a [C, N] block, faster.

    The row is cut into groups of _GROUP columns; any of the ``want`` smallest values lies
    in one of the ``want`` groups of smallest minimum (each of those holds a value no
    larger), or in the last, partial group. So a fast min over groups, a top-k of the
    group minima and one of those groups' values replace a top-k over the whole row.
    What is left out is never smaller than the last value returned, as with topk.
    """
    c, n = score.shape
    groups = n // _GROUP
    if want * _GROUP * 4 > n:  # too few groups for it to pay
        return torch.topk(score, want, dim=1, largest=False, sorted=True)
    full = groups * _GROUP
    group_min = score[:, :full].view(c, groups, _GROUP).amin(2)  # [C, G]
    best = torch.topk(group_min, want, dim=1, largest=False, sorted=False).indices  # [C, want]
    cols = (best[:, :, None] * _GROUP + torch.arange(_GROUP, device=score.device)).view(c, want * _GROUP)
    if full < n:
        cols = torch.cat([cols, torch.arange(full, n, device=score.device).expand(c, -1)], 1)
    vals, pos = torch.topk(score.gather(1, cols), want, dim=1, largest=False, sorted=True)
    return vals, cols.gather(1, pos)


class ExactIndex:
    """Exact Euclidean k-NN against one database, searched many times after one load.

    The database stays float32 on ``device`` (no copy of a float32 CPU array) and its
    squared norms are computed once. Each search works through the queries in chunks
    of C rows so that the [C, N] score block stays within ``chunk_floats`` floats.

    Per block: one ``addmm`` gives ||x||^2 - 2 q.x (the query's own norm, the same along a
    row, is left out), ``topk`` takes k + SLACK candidates, and those candidates' distances
    are recomputed exactly as ||q - x|| from the vectors (float32 difference, float64 sum),
    so a vector's distance to itself is 0 and small distances between large vectors keep
    their digits. The result is sorted by that exact float32 distance, ties broken by the
    lower database index. A row is accepted only if a bound on the expanded formula's
    float32 error proves that no vector left out could come before its k-th neighbour;
    other rows (many equal or nearly equal distances) take 4x more candidates, up to the
    whole database. So results are the exact top-k whatever the chunk size or device
    (under a reduced ``torch.set_float32_matmul_precision`` the bound is a statistical one).
    """

    def __init__(self, database, device=None, chunk_floats: int = CHUNK_FLOATS):
        self.device = pick_device("auto" if device is None else device)
        self.db = _as_tensor(database, self.device)  # [N, d] float32
        if self.db.ndim != 2:
            raise ValueError(f"database must be [N, d], got shape {tuple(self.db.shape)}")
        self.chunk_floats = chunk_floats
        n, d = self.db.shape
        # float32 (a float64 pass costs 10x more at 4096-d); its error is in search's bound.
        self.db_sq = torch.linalg.vector_norm(self.db, dim=1) ** 2  # [N]
        # The largest ||x||^2 (for the error bound), an upper bound despite rounding.
        self._max_sq = float(self.db_sq.max()) * (1 + 2 * _dot_error_factor(d)) if n else 0.0

    def __len__(self) -> int:
        return int(self.db.shape[0])

    def search(self, queries, k: int, exclude_rows=None, largest: bool = False,
               chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest (or, with ``largest``, farthest) database rows of each query.

        queries: [Q, d] (numpy or torch). exclude_rows: int [Q], a database row never
        returned for that query (-1: none) — the query itself in train-vs-train search.
        Returns (dist [Q, k] float32 Euclidean distances, recomputed exactly from the
        vectors, idx [Q, k] int64), sorted by distance (the largest first for ``largest``),
        equal distances by database index.
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
        # Scores are kept "smaller is better": sign * (||x||^2 - 2 q.x).
        sign = -1.0 if largest else 1.0
        gamma = _dot_error_factor(d)
        r = math.sqrt(self._max_sq)
        # One [C, N] block for every chunk: a fresh 256 MB allocation per chunk costs its page faults again.
        block = torch.empty((min(chunk, q_all.shape[0]), n), dtype=torch.float32, device=self.device)
        for start in range(0, q_all.shape[0], chunk):
            q = q_all[start:start + chunk]  # [C, d]
            c = q.shape[0]
            score = torch.addmm(self.db_sq, q, self.db.T, beta=sign, alpha=-2.0 * sign, out=block[:c])  # [C, N]
            per_row = torch.full((c,), n, dtype=torch.int64, device=self.device)  # candidates per row
            if excluded is not None:
                rows = excluded[start:start + chunk]
                hit = torch.nonzero(rows >= 0).flatten()
                score[hit, rows[hit]] = float("inf")
                per_row[hit] -= 1
            q_sq = torch.linalg.vector_norm(q, dim=1, dtype=torch.float64) ** 2  # [C]
            qn = q_sq.sqrt()
            # |computed score - exact score| <= err: the float32 dot product (2 gamma |q| |x|),
            # the float32 squared norm (~2 gamma |x|^2) and the roundings of the sums.
            err = 1.01 * (gamma * 2 * (qn * r + self._max_sq) + 3 * _U32 * (self._max_sq + 2 * qn * r + q_sq)) + 1e-30
            dist, idx = self._select(q, score, q_sq, err, per_row, k, sign)
            out_d[start:start + c] = dist.cpu().numpy()
            out_i[start:start + c] = idx.cpu().numpy()
        return out_d, out_i

    def _select(self, q, score, q_sq, err, per_row, k: int, sign: float):
        """Exact top-k of each row of the [C, N] score block: (dist [C, k] float32, idx [C, k])."""
        c, n = score.shape
        want = min(k + SLACK, n)
        vals, cand = _block_topk(score, want)
        dist, idx, ok = self._rank(q, vals, cand, q_sq, err, per_row, k, sign)
        group = max(1, c // 8)  # rows re-searched at a time: a copy of at most 1/8 of the block
        while want < n:
            todo = torch.nonzero(~ok).flatten()
            if todo.numel() == 0:
                break
            want = min(4 * want, n)
            for g in range(0, todo.numel(), group):
                rows = todo[g:g + group]
                vals, cand = torch.topk(score.index_select(0, rows), want, dim=1, largest=False, sorted=True)
                d_r, i_r, ok_r = self._rank(q[rows], vals, cand, q_sq[rows], err[rows], per_row[rows], k, sign)
                dist[rows], idx[rows], ok[rows] = d_r, i_r, ok_r
        return dist, idx

    def _rank(self, q, vals, cand, q_sq, err, per_row, k: int, sign: float):
        """Exact distances of the candidates [R, K] of the queries q [R, d], the first k by
        (distance, index), and whether the row is proven complete (bool [R])."""
        dist64 = self._exact_dist(q, cand)  # [R, K] float64
        key = dist64.float() * sign
        key[torch.isinf(vals)] = float("inf")  # excluded rows never come first
        # Order by (key, index): sort by index, then a stable sort by key.
        _, perm = torch.sort(cand, dim=1)
        key = key.gather(1, perm)
        key, perm2 = torch.sort(key, dim=1, stable=True)
        top = perm.gather(1, perm2[:, :k])
        idx = cand.gather(1, top)
        dist = dist64.gather(1, top).float()
        kth_sq = dist64.gather(1, top[:, k - 1:k]).squeeze(1) ** 2  # exact k-th squared distance
        # Anything left out scored >= vals[:, -1], so its exact sign * ||q - x||^2 is at least this:
        bound = vals[:, -1].double() + sign * q_sq - err
        margin = 16 * _U32 * kth_sq + 1e-30  # float32 rounding of the distances compared
        ok = (bound > sign * kth_sq + margin) | (vals.shape[1] >= per_row)
        return dist, idx, ok

    def _exact_dist(self, q, cand) -> torch.Tensor:
        """float64 [R, K]: ||q_r - db[cand[r, j]]||, float32 difference, float64 sum of squares."""
        r, kk = cand.shape
        d = q.shape[1]
        out = torch.empty((r, kk), dtype=torch.float64, device=q.device)
        per = max(1, (self.chunk_floats // 16) // max(d, 1))  # vectors gathered at a time
        if kk <= per:
            step = per // kk
            for a in range(0, r, step):
                x = self.db[cand[a:a + step]]  # [s, K, d]
                x.sub_(q[a:a + step, None, :])
                out[a:a + step] = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64)
        else:  # very many candidates (many ties): a row in pieces
            for a in range(r):
                for b in range(0, kk, per):
                    x = self.db[cand[a, b:b + per]]  # [s, d]
                    x.sub_(q[a])
                    out[a, b:b + per] = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64)
        return out


def pair_distance(a, b) -> float:
    """||a - b|| of two embeddings [d] exactly as ExactIndex.search returns a neighbour's
    distance (float32 difference, float64 sum of squares, rounded to float32), so
    get_distance.py prints the digits query.py and eval.py print for the same pair."""
    x = _as_tensor(a, "cpu") - _as_tensor(b, "cpu")  # [d] float32
    return float(torch.linalg.vector_norm(x, dtype=torch.float64).float())


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
    """bool [Q, K]: neighbour j of query i has query i's label.

    Every metric below goes through here, so the shapes are checked here: one label per
    row of neighbours (numpy would broadcast a single label over every row), and at least
    one query (a mean over none would be NaN, not a score).
    """
    q = np.asarray(query_labels)
    nb = np.asarray(neighbour_labels)
    if q.ndim != 1 or nb.ndim != 2 or len(q) != nb.shape[0]:
        raise ValueError(f"{q.shape} query labels for neighbour labels of shape {nb.shape}: expected [Q] and [Q, K]")
    if len(q) == 0:
        raise ValueError("no queries to score")
    return nb == q[:, None]


def precision_at_k(query_labels, neighbour_labels, k: int) -> float:
    """Mean over queries of the fraction of the first k neighbours sharing the query's class."""
    nb = np.asarray(neighbour_labels)
    _check_k(nb, k)
    return float(matches(query_labels, nb[:, :k]).mean())


def precision_at_k_curve(query_labels, neighbour_labels, ks: Sequence[int]) -> list[float]:
    """precision_at_k for each k in ``ks`` (one pass over the match matrix)."""
    nb = np.asarray(neighbour_labels)
    for k in ks:
        _check_k(nb, k)
    cum = np.cumsum(matches(query_labels, nb), axis=1)
    return [float((cum[:, k - 1] / k).mean()) for k in ks]


def hit_at_k(query_labels, neighbour_labels, k: int) -> float:
    """Fraction of queries with at least one same-class neighbour among the first k.

    This is what the classic TinyImageNet code reported as "accuracy at k=30".
    """
    nb = np.asarray(neighbour_labels)
    _check_k(nb, k)
    return float(matches(query_labels, nb[:, :k]).any(axis=1).mean())


def _r_array(r_per_query, n_queries: int) -> np.ndarray:
    r = np.asarray(r_per_query, dtype=np.int64)
    if r.shape != (n_queries,):
        raise ValueError(f"need one R per query ({n_queries}), got shape {r.shape}")
    return r


def _check_depth(nb: np.ndarray, r: np.ndarray, what: str) -> None:
    if len(r) and (r > nb.shape[1]).any():
        raise ValueError(f"{what} needs {int(r.max())} neighbours, got {nb.shape[1]}")


def _mean_over_scored(values: np.ndarray) -> float:
    """Mean of the finite values (queries with R >= 1); NaN when no query is scored."""
    scored = values[~np.isnan(values)]
    return float(scored.mean()) if len(scored) else float("nan")


def recall_at_1_per_query(query_labels, neighbour_labels, r_per_query=None) -> np.ndarray:
    """float [Q]: 1.0 if the nearest neighbour shares the query's class, else 0.0; NaN where R = 0."""
    nb = np.asarray(neighbour_labels)
    _check_k(nb, 1)
    out = matches(query_labels, nb[:, :1])[:, 0].astype(np.float64)
    if r_per_query is not None:
        out[_r_array(r_per_query, len(out)) <= 0] = np.nan
    return out


def recall_at_1(query_labels, neighbour_labels, r_per_query=None) -> float:
    """Recall@1 (Musgrave et al. 2020's "precision at 1"): fraction of queries whose nearest
    neighbour shares their class.

    With ``r_per_query`` (R_i, see :func:`map_at_r`), queries with R_i = 0 — no other item of
    their class in the database — are left out, as in Musgrave et al. (pytorch-metric-learning's
    "lone" queries); NaN if every query is such. Without it, every query counts.
    """
    return _mean_over_scored(recall_at_1_per_query(query_labels, neighbour_labels, r_per_query))


def r_precision_per_query(query_labels, neighbour_labels, r_per_query) -> np.ndarray:
    """float [Q]: (same-class items among the first R_i neighbours) / R_i; NaN where R_i = 0."""
    nb = np.asarray(neighbour_labels)
    r = _r_array(r_per_query, nb.shape[0])
    _check_depth(nb, r, "R-precision")
    m = matches(query_labels, nb)  # [Q, K]
    within_r = np.arange(1, nb.shape[1] + 1)[None, :] <= r[:, None]
    hits = (m & within_r).sum(1)
    return np.where(r > 0, hits / np.maximum(r, 1), np.nan)


def r_precision(query_labels, neighbour_labels, r_per_query) -> float:
    """R-precision (Musgrave et al. 2020, "A Metric Learning Reality Check").

    R_i = number of OTHER items of query i's class in the database (its own row excluded in
    leave-one-out search); R-precision_i = (same-class items among its R_i nearest) / R_i.
    Mean over the queries with R_i >= 1 (the others are left out; NaN if none is left).
    Needs at least max(R_i) neighbours per query.
    """
    return _mean_over_scored(r_precision_per_query(query_labels, neighbour_labels, r_per_query))


def map_at_r_per_query(query_labels, neighbour_labels, r_per_query) -> np.ndarray:
    """float [Q]: AP@R_i = (1/R_i) * sum_{j<=R_i} P@j * [neighbour j same class]; NaN where R_i = 0."""
    nb = np.asarray(neighbour_labels)
    r = _r_array(r_per_query, nb.shape[0])
    _check_depth(nb, r, "MAP@R")
    m = matches(query_labels, nb).astype(np.float64)  # [Q, K]
    j = np.arange(1, nb.shape[1] + 1)
    prec = np.cumsum(m, axis=1) / j  # P@j
    within_r = j[None, :] <= r[:, None]
    return np.where(r > 0, (prec * m * within_r).sum(1) / np.maximum(r, 1), np.nan)


def map_at_r(query_labels, neighbour_labels, r_per_query) -> float:
    """MAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check").

    R_i = number of other database items of query i's class (self excluded where it
    applies); needs at least max(R_i) neighbours. For each query:
    AP@R_i = (1/R_i) * sum_{j<=R_i} P@j * [neighbour j relevant], P@j the precision of the
    first j neighbours. Mean over the queries with R_i >= 1 (the others are left out, as in
    Musgrave et al.; NaN if none is left).
    """
    return _mean_over_scored(map_at_r_per_query(query_labels, neighbour_labels, r_per_query))


# Graded relevance (a class hierarchy): the gain of a neighbour of the query's class, of another class
# under the same parent, of anything else. Linear gains, as Jarvelin & Kekalainen's DCG.
GAIN_SAME_CLASS, GAIN_SAME_PARENT = 2.0, 1.0


def graded_gains(query_labels, neighbour_labels, query_parents, neighbour_parents) -> np.ndarray:
    """float [Q, K]: GAIN_SAME_CLASS for a neighbour of the query's class, GAIN_SAME_PARENT for one of
    another class with the same parent, 0 otherwise."""
    same_class = matches(query_labels, neighbour_labels)
    same_parent = matches(query_parents, neighbour_parents)
    return np.where(same_class, GAIN_SAME_CLASS, np.where(same_parent, GAIN_SAME_PARENT, 0.0))


def ndcg_at_k_per_query(gains, n_same_class, n_same_parent, k: int) -> np.ndarray:
    """float [Q]: NDCG@k = DCG@k / ideal DCG@k, DCG@k = sum_{j<=k} gain_j / log2(j + 1).

    ``gains`` [Q, >= k] (:func:`graded_gains`); the ideal ranking of query i puts its
    ``n_same_class[i]`` other items of its class first, then its ``n_same_parent[i]`` items of
    sibling classes (same parent, other class). NaN where the ideal DCG is 0 (nothing relevant).
    """
    g = np.asarray(gains, dtype=np.float64)
    _check_k(g, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]
    dcg = (g[:, :k] * discount).sum(1)
    pos = np.arange(k)[None, :]
    c = np.asarray(n_same_class, dtype=np.int64)[:, None]
    p = np.asarray(n_same_parent, dtype=np.int64)[:, None]
    ideal = np.where(pos < c, GAIN_SAME_CLASS, np.where(pos < c + p, GAIN_SAME_PARENT, 0.0))
    idcg = (ideal * discount).sum(1)
    return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)


def precision_at_k_per_query(query_labels, neighbour_labels, k: int) -> np.ndarray:
    """float [Q]: fraction of each query's first k neighbours sharing its class."""
    nb = np.asarray(neighbour_labels)
    _check_k(nb, k)
    return matches(query_labels, nb[:, :k]).mean(1)


def standard_error(per_query) -> float:
    """Standard error of a mean over queries: sample std (ddof 1) / sqrt(Q); nan for Q < 2.

    A metric from 1,000 queries moves by about this much with another draw of the
    queries alone, so two figures closer than ~2 standard errors are not different.
    """
    v = np.asarray(per_query, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def per_class_mean(query_labels, per_query, column: str = "precision_at_k"):
    """pandas DataFrame (class, n_queries, <column>): the mean of a per-query value by class, best first."""
    import pandas as pd

    df = pd.DataFrame({"class": np.asarray(query_labels).astype(str), "p": np.asarray(per_query, dtype=np.float64)})
    table = df.groupby("class").agg(n_queries=("p", "size"), p=("p", "mean")).reset_index()
    table = table.rename(columns={"p": column})
    return table.sort_values([column, "class"], ascending=[False, True]).reset_index(drop=True)


def per_class_precision(query_labels, neighbour_labels, k: int):
    """pandas DataFrame (class, n_queries, precision_at_k), sorted best first."""
    return per_class_mean(query_labels, precision_at_k_per_query(query_labels, neighbour_labels, k))


def mean_pairwise_distance(emb, max_rows: int = 2000, seed: int = 0) -> float:
    """Mean Euclidean distance between distinct rows of ``emb`` [N, d] (float64), over a seeded
    sample of at most ``max_rows`` rows; 0.0 for fewer than 2 rows. A collapse check. Only the
    sampled rows are read (``emb`` may be a database.Database)."""
    n = len(emb)
    if n < 2:
        return 0.0
    rows = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False)) if n > max_rows else slice(None)
    x = np.asarray(emb[rows], dtype=np.float64)
    t = torch.from_numpy(x)
    d = torch.cdist(t, t, compute_mode="donot_use_mm_for_euclid_dist")  # [n, n], exact differences
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def triplet_accuracy(q, p, n) -> float:
    """Fraction of triplets ranked correctly: D(q, p) < D(q, n) (Euclidean)."""
    q, p, n = (np.asarray(a, dtype=np.float64) for a in (q, p, n))
    if not all(np.isfinite(a).all() for a in (q, p, n)):  # a NaN distance compares False: "wrong", silently
        raise ValueError("triplet embeddings contain NaN or infinity")
    return float((np.linalg.norm(q - p, axis=1) < np.linalg.norm(q - n, axis=1)).mean())

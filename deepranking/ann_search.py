"""Optional approximate nearest-neighbour search: cluster the database, search the nearest clusters.

The classic Keras Deep Ranking tools clustered the database embeddings and
compared a query only with the members of its nearest clusters. FAISS's
``IndexIVFFlat`` is that idea done well: k-means gives ``nlist`` centroids,
every database row is stored in the inverted list of its nearest centroid, and
a query scans only the ``nprobe`` lists whose centroids are nearest to it.

FAISS is an optional dependency (``pip install faiss-cpu``), imported lazily.
Exact search (:func:`retrieval.knn_search`) stays the default: with
``--ann auto`` FAISS is used only when it is installed AND the database has more
than :data:`AUTO_MIN_ROWS` rows, where exact search starts to cost real time.

Distances returned here are Euclidean (FAISS reports squared L2; we take the
square root) so they mean the same as :func:`retrieval.knn_search`'s. Ties are
the one difference even with every list probed: exact search puts equal distances
in database-row order, FAISS in the order of its inverted lists.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from deepranking.cli import UserError

ANN_CHOICES = ("auto", "exact", "faiss")
AUTO_MIN_ROWS = 200_000  # below this, exact search on a CPU answers in well under a second
INSTALL_HINT = "install it with: pip install faiss-cpu (or use --ann exact)"
DEFAULT_NPROBE = 16


def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def require_faiss():
    """Return the faiss module, or raise UserError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise UserError(f"approximate search needs the optional package faiss; {INSTALL_HINT}")
    return faiss


def choose_backend(ann: str, n_rows: int) -> str:
    """Resolve ``--ann`` to "exact" or "faiss".

    ``auto``: FAISS only when installed and the database has > AUTO_MIN_ROWS rows.
    ``faiss``: FAISS, or UserError with the install command if it is missing.
    """
    if ann not in ANN_CHOICES:
        raise UserError(f"unknown --ann {ann!r} (choose from {', '.join(ANN_CHOICES)})")
    if ann == "exact":
        return "exact"
    if ann == "faiss":
        require_faiss()
        return "faiss"
    return "faiss" if n_rows > AUTO_MIN_ROWS and faiss_available() else "exact"


def default_nlist(n_rows: int) -> int:
    """About 4 * sqrt(N) clusters (FAISS's rule of thumb), at least 1 and at most N / 39.

    FAISS's k-means wants >= 39 training points per centroid.
    """
    if n_rows < 1:
        raise ValueError("empty database")
    return max(1, min(int(4 * math.sqrt(n_rows)), n_rows // 39))


def build_ivf_index(database: np.ndarray, nlist: int | None = None, seed: int = 0, max_train: int | None = None):
    """Train and fill an IndexIVFFlat (L2) over ``database`` float32 [N, D].

    k-means trains on at most ``max_train`` rows (default 256 per centroid, as FAISS
    itself samples), drawn with ``seed`` so that the index is reproducible.
    """
    faiss = require_faiss()
    xb = np.ascontiguousarray(database, dtype=np.float32)  # [N, D]
    n, d = xb.shape
    nlist = default_nlist(n) if nlist is None else int(nlist)
    if not 1 <= nlist <= n:
        raise UserError(f"nlist must be between 1 and the database size {n}, got {nlist}")
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    index.cp.seed = int(seed)
    max_train = 256 * nlist if max_train is None else int(max_train)
    if n > max_train:
        rng = np.random.default_rng(seed)
        train = xb[np.sort(rng.choice(n, size=max_train, replace=False))]
    else:
        train = xb
    index.train(train)
    index.add(xb)
    return index


def ivf_search(index, queries: np.ndarray, k: int, nprobe: int = DEFAULT_NPROBE) -> tuple[np.ndarray, np.ndarray]:
    """Search ``queries`` float32 [Q, D]; returns (Euclidean dist [Q, k] ascending, idx int64 [Q, k]).

    Rows with fewer than k candidates in the probed lists are padded with
    dist=inf, idx=-1 (FAISS's convention).
    """
    index.nprobe = int(max(1, min(nprobe, index.nlist)))
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    sq, idx = index.search(xq, int(k))  # squared L2 [Q, k], int64 [Q, k]
    dist = np.sqrt(np.maximum(sq, 0.0), dtype=np.float32)
    dist[idx < 0] = np.inf
    return dist, idx.astype(np.int64, copy=False)


def load_or_build_index(index_path: str | os.PathLike | None, database: np.ndarray, database_id: str | None,
                        nlist: int | None = None, seed: int = 0):
    """Reuse a saved index built from the same database file; else build (and save).

    Building IVF over a large database takes seconds to minutes (k-means), so
    query.py can keep it beside the embeddings with ``--index PATH``. ``database_id``
    (saved_index.database_id: the file's size, mtime, inode and model) is written to
    ``PATH.key`` beside the index: a database replaced by another of as many rows, even
    one copied with an older mtime, is rebuilt, never searched with the old vectors.
    """
    faiss = require_faiss()
    key_file = None if index_path is None else Path(str(index_path) + ".key")
    stamp = json.dumps({"database": database_id, "nlist": nlist, "seed": seed}, sort_keys=True)
    if index_path is not None and database_id is not None and Path(index_path).is_file() and key_file.is_file() \
            and key_file.read_text(encoding="utf-8") == stamp:
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise UserError(f"cannot read FAISS index {index_path}: {str(exc).strip().splitlines()[0]}")
        if index.ntotal == len(database) and index.d == database.shape[1]:
            return index
    index = build_ivf_index(database, nlist=nlist, seed=seed)
    if index_path is not None:
        from deepranking.file_io import atomic_path, atomic_write_text

        key_file.unlink(missing_ok=True)  # never a new index beside the old key, even after a crash here
        with atomic_path(index_path, suffix=".faiss") as tmp:
            faiss.write_index(index, str(tmp))
        if database_id is not None:
            atomic_write_text(key_file, stamp)
    return index


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k ([Q, k] int arrays)."""
    if approx_idx.shape[0] != exact_idx.shape[0]:
        raise ValueError("different numbers of queries")
    k = exact_idx.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e, assume_unique=True)) for a, e in zip(approx_idx, exact_idx)]
    return float(np.sum(hits)) / (k * len(exact_idx)) if len(exact_idx) else float("nan")

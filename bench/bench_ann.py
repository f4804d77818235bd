"""Recall and speed of FAISS cluster search (ann_search.py) against exact search (retrieval.ExactIndex).

    python bench/bench_ann.py                      # 1,000,000 x 128 random + clustered databases
    python bench/bench_ann.py --embeddings train_embedding.txt [--test-embeddings test_embedding.txt]

For each database: exact top-k of every query (the ground truth), then an
IndexIVFFlat with ``--nlist`` clusters searched at each ``--nprobe``; prints
recall@k (share of the exact top-k found) and the speed-up of the search step.
Index building (k-means + assignment) is a one-off cost, reported separately.

"random" is the worst case for clustering: points spread uniformly over the
unit sphere have no clusters to find. "clustered" (a mixture of tight Gaussian
blobs, as trained embeddings of many classes are) is the case the idea is for.
Needs ``pip install faiss-cpu``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import comma_list  # also puts the repo on sys.path

from deepranking import argtypes, cli  # noqa: E402
from deepranking.cli import UserError  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=argtypes.positive_int, default=1_000_000, help="synthetic database rows")
    p.add_argument("--dim", type=argtypes.positive_int, default=128, help="synthetic embedding dimension")
    p.add_argument("--queries", type=argtypes.positive_int, default=1000, help="queries per database")
    p.add_argument("--k", type=argtypes.positive_int, default=30, help="neighbours per query (recall@k)")
    p.add_argument("--nlist", type=argtypes.positive_int, default=1024, help="IVF clusters")
    p.add_argument("--nprobe", type=comma_list(argtypes.positive_int), default="1,8,32",
                   help="comma-separated clusters searched per query")
    p.add_argument("--datasets", default="random,clustered", help="synthetic databases: random, clustered")
    p.add_argument("--embeddings", type=Path, default=None,
                   help="also benchmark a real embedding file (the database)")
    p.add_argument("--test-embeddings", type=Path, default=None,
                   help="queries for --embeddings (default: --queries rows held out of the database)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the held-out queries and k-means")
    return p


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [n, d] unit rows: uniform on the sphere, or 1,000 tight blobs."""
    if kind == "random":
        return unit_rows(rng.standard_normal((n, d), dtype=np.float32))
    if kind == "clustered":
        centres = unit_rows(rng.standard_normal((1000, d), dtype=np.float32))
        x = centres[rng.integers(0, len(centres), n)]
        x += rng.standard_normal((n, d), dtype=np.float32) * np.float32(0.4 / np.sqrt(d))
        return unit_rows(x)
    raise UserError(f"unknown dataset {kind!r} (random, clustered)")


def hold_out(x: np.ndarray, q: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into (database, queries) so that no query is in the database."""
    if q >= len(x):
        raise UserError(f"need more than {q} rows to hold out {q} queries, got {len(x)}")
    pick = np.zeros(len(x), dtype=bool)
    pick[rng.choice(len(x), q, replace=False)] = True
    return x[~pick], x[pick]


def bench_one(name: str, database: np.ndarray, queries: np.ndarray, args, nprobes: list[int]) -> list[dict]:
    """Rows: exact search (retrieval.ExactIndex, query.py's exact path), then IVF per nprobe.

    speed-up is relative to the exact search, its neighbours the ground truth for recall.
    """
    from deepranking.ann_search import build_ivf_index, ivf_search, recall_at_k
    from deepranking.retrieval import ExactIndex

    k = min(args.k, len(database))
    common = dict(db=name, q=len(queries), n=len(database), d=database.shape[1])
    exact = ExactIndex(database, "cpu")
    exact.search(queries[:8], k)  # warm-up
    start = time.perf_counter()
    _, exact_idx = exact.search(queries, k)
    exact_s = time.perf_counter() - start
    rows = [dict(common, method="exact (ExactIndex)", build_s=0.0, search_s=exact_s, recall=1.0, speedup=1.0)]
    nlist = min(args.nlist, max(1, len(database) // 39))
    start = time.perf_counter()
    index = build_ivf_index(database, nlist=nlist, seed=args.seed)
    build_s = time.perf_counter() - start
    for nprobe in nprobes:
        ivf_search(index, queries[:8], k, nprobe)  # warm-up
        start = time.perf_counter()
        _, idx = ivf_search(index, queries, k, nprobe)
        s = time.perf_counter() - start
        rows.append(dict(common, method=f"ivf{nlist} nprobe={nprobe}", build_s=build_s, search_s=s,
                         recall=recall_at_k(idx, exact_idx), speedup=exact_s / s))
    return rows


def print_table(rows: list[dict], k: int, file=sys.stdout) -> None:
    head = f"{'database':<12} {'rows x dim':>15} {'method':<24} {'build s':>8} {'search s':>9} " \
           f"{'ms/query':>9} {'speed-up':>9} {'recall@' + str(k):>10}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        print(f"{r['db']:<12} {r['n']:>9,} x {r['d']:<4} {r['method']:<24} {r['build_s']:>8.1f} "
              f"{r['search_s']:>9.3f} {1000 * r['search_s'] / r['q']:>9.3f} {r['speedup']:>8.1f}x {r['recall']:>10.3f}", file=file)


def main(args) -> None:
    from deepranking.ann_search import require_faiss

    faiss = require_faiss()
    import torch

    nprobes = args.nprobe
    rng = np.random.default_rng(args.seed)
    print(f"{torch.get_num_threads()} torch threads, {faiss.omp_get_max_threads()} faiss threads; "
          f"{args.queries} queries, k={args.k}", file=sys.stderr)
    rows = []
    for kind in [s.strip() for s in args.datasets.split(",") if s.strip()]:
        data = synthetic(kind, args.rows + args.queries, args.dim, rng)
        database, queries = hold_out(data, args.queries, rng)
        del data
        rows += bench_one(kind, database, queries, args, nprobes)
        print_table(rows[-1 - len(nprobes):], args.k, file=sys.stderr)
        print(file=sys.stderr)
    if args.embeddings is not None:
        from deepranking.embedding_io import read_embeddings

        db = read_embeddings(args.embeddings).emb
        if args.test_embeddings is not None:
            database, queries = db, read_embeddings(args.test_embeddings).emb[: args.queries]
        else:
            database, queries = hold_out(db, min(args.queries, len(db) // 10), rng)
        rows += bench_one(args.embeddings.name, database, queries, args, nprobes)
    print()
    print_table(rows, args.k)


if __name__ == "__main__":
    cli.run(main, get_args_parser())

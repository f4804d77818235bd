"""Exact kNN: retrieval.ExactIndex against FAISS's exact IndexFlatL2, in one process.

    python bench/bench_knn_faiss.py [--queries 2000] [--rows 100000] [--k 30]
                                    [--dims 32,64,128,256,512,1024,4096] [--threads N]

For each dimension, draws float32 random unit vectors (seeded; queries and database
independent) and searches the same arrays, one after the other, with the same number of
threads (``--threads``, default torch's):

- ours: ``ExactIndex(database, "cpu").search(queries, k)`` (chunked float32 matmul,
  top-k of k + slack per block, exact re-ranking of the candidates);
- faiss: ``IndexFlatL2(d)``, ``add(database)``, ``search(queries, k)``.

Each method is timed from its index build to its answer (best of ``--repeat``, the two
methods taking turns), with the
peak resident memory of the process during its search (bench_common.PeakRSS: the whole
process, and in brackets the growth above what it held before). Prints per dimension
seconds, ratio = faiss seconds / our seconds (the target is >= 0.8), the fraction of
queries whose neighbour sets are identical (queries where they differ are checked against a
float64 reference: who has the exact set), and the largest difference between the two
methods' distances.

FAISS is an optional comparison, not a project dependency: without it (``pip install
faiss-cpu``) this says so and times ours alone.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench_common import PeakRSS, comma_list  # also puts the repo on sys.path

from deepranking import argtypes, cli  # noqa: E402
from deepranking.cli import UserError  # noqa: E402

DIMS = [32, 64, 128, 256, 512, 1024, 4096]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=argtypes.positive_int, default=2000, help="query vectors")
    p.add_argument("--rows", type=argtypes.positive_int, default=100_000, help="database vectors")
    p.add_argument("--dims", type=comma_list(argtypes.positive_int), default=DIMS, help="comma-separated dimensions")
    p.add_argument("--k", type=argtypes.positive_int, default=30, help="neighbours per query")
    p.add_argument("--threads", type=argtypes.positive_int, default=None,
                   help="threads for both methods (default: torch.get_num_threads())")
    p.add_argument("--repeat", type=argtypes.positive_int, default=1, help="timed runs per method (the best is kept)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def unit_vectors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [n, d] rows of unit length, built in row blocks (no full-size temporary)."""
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 4096):
        block = rng.standard_normal((min(4096, n - s), d), dtype=np.float32)
        x[s:s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def timed(methods: dict, repeat: int) -> dict:
    """{name: (best seconds, PeakRSS of its first run, result of its last run)}.

    The methods take turns, in alternating order, so that a burst of load from other
    processes falls on both rather than on one method's every run.
    """
    best = {name: float("inf") for name in methods}
    mem, out = {}, {}
    names = list(methods)
    for r in range(repeat):
        for name in (names if r % 2 == 0 else names[::-1]):
            with PeakRSS() as m:
                t0 = time.perf_counter()
                out[name] = methods[name]()
                best[name] = min(best[name], time.perf_counter() - t0)
            mem.setdefault(name, m)
            del m
    return {name: (best[name], mem[name], out[name]) for name in methods}


def identical_sets(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of queries whose neighbour index sets are the same."""
    return float((np.sort(a, axis=1) == np.sort(b, axis=1)).all(axis=1).mean())


def exact_sets(q: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    """int64 [Q, k] sorted: the k nearest rows of each query by float64 difference-form
    distance rounded to float32 (ties to the lower index: ExactIndex's order), a database
    block at a time (for a few queries)."""
    d = np.empty((len(q), len(db)))
    for s in range(0, len(db), 8192):
        x = db[s:s + 8192].astype(np.float64)
        d[:, s:s + len(x)] = np.sqrt(((q.astype(np.float64)[:, None, :] - x[None]) ** 2).sum(-1))
    return np.sort(np.argsort(d.astype(np.float32), axis=1, kind="stable")[:, :k], axis=1)


def main(args) -> None:
    import torch

    if args.k > args.rows:
        raise UserError(f"--k {args.k} is larger than --rows {args.rows}")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss is not installed (an optional comparison, not a project dependency): timing ours alone; "
              "`.venv/bin/pip install faiss-cpu` to compare", file=sys.stderr)
    else:
        faiss.omp_set_num_threads(threads)

    print(f"exact kNN: {args.queries} queries x {args.rows} database rows, k={args.k}, float32 unit vectors, "
          f"{threads} thread(s), CPU, best of {args.repeat}; ratio = faiss s / ours s (target >= 0.8)")
    head = (f"{'dim':>5} {'ours s':>8} {'faiss s':>8} {'ratio':>6} {'same sets':>9} {'max |dd|':>9} "
            f"{'ours peak MB':>16} {'faiss peak MB':>16}")
    print(head, flush=True)
    for dim in args.dims:
        print(bench_dim(dim, args, faiss), flush=True)


def bench_dim(dim: int, args, faiss) -> str:
    """The table row of one dimension (its arrays are freed on return)."""
    from deepranking.retrieval import ExactIndex

    rng = np.random.default_rng([args.seed, dim])
    db = unit_vectors(args.rows, dim, rng)
    q = unit_vectors(args.queries, dim, rng)
    methods = {"ours": lambda: ExactIndex(db, "cpu").search(q, args.k)}
    if faiss is not None:
        def faiss_search():
            index = faiss.IndexFlatL2(dim)
            index.add(db)
            return index.search(q, args.k)

        methods["faiss"] = faiss_search
    res = timed(methods, args.repeat)
    ours_s, ours_mem, (ours_d, ours_i) = res["ours"]
    if faiss is None:
        return f"{dim:>5} {ours_s:>8.2f} {'-':>8} {'-':>6} {'-':>9} {'-':>9} {ours_mem!s:>16} {'-':>16}"
    faiss_s, faiss_mem, (f_sq, f_i) = res["faiss"]
    max_dd = float(np.abs(np.sqrt(np.maximum(f_sq, 0)) - ours_d).max())
    differ = np.nonzero((np.sort(ours_i, axis=1) != np.sort(f_i, axis=1)).any(axis=1))[0][:20]
    note = ""
    if len(differ):  # who is right: a float64 reference for (up to 20 of) those queries
        ref = exact_sets(q[differ], db, args.k)
        note = (f"  {len(differ)} differing set(s) checked in float64: ours exact in "
                f"{int((np.sort(ours_i[differ], axis=1) == ref).all(axis=1).sum())}, faiss in "
                f"{int((np.sort(f_i[differ], axis=1) == ref).all(axis=1).sum())}")
    return (f"{dim:>5} {ours_s:>8.2f} {faiss_s:>8.2f} {faiss_s / ours_s:>6.2f} {identical_sets(ours_i, f_i):>9.4f} "
            f"{max_dd:>9.2e} {ours_mem!s:>16} {faiss_mem!s:>16}{note}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

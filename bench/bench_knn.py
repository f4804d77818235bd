"""Exact kNN: retrieval.knn_search vs scikit-learn's brute-force NearestNeighbors.

    python bench/bench_knn.py [--queries 10000] [--database 100000] [--dims 4096,128] [--k 30]

For each dimension, draws float32 random unit vectors (seeded; queries and
database independent) and runs each method in its own child process, so that
its time and peak memory (the child's ru_maxrss) are its own:

- ours: ``retrieval.knn_search(queries, database, k)`` (chunked float32 matmul + top-k);
- sklearn: ``NearestNeighbors(algorithm="brute", metric="euclidean").fit(db).kneighbors(q, k)``,
  what the classic evaluation code used.

Prints seconds, peak RSS (and the RSS of the data alone, before the search),
the speed-up, and how often the neighbour index sets agree (per-query set
overlap; float ties may differ rarely). scikit-learn is not a project
dependency: ``pip install scikit-learn`` to run the comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import comma_list  # also puts the repo on sys.path

from deepranking import argtypes, cli  # noqa: E402
from deepranking.cli import UserError  # noqa: E402

METHODS = ("ours", "sklearn")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=argtypes.positive_int, default=10_000, help="query vectors")
    p.add_argument("--database", type=argtypes.positive_int, default=100_000, help="database vectors")
    p.add_argument("--dims", type=comma_list(argtypes.positive_int), default=[4096, 128],
                   help="comma-separated dimensions")
    p.add_argument("--k", type=argtypes.positive_int, default=30, help="neighbours per query")
    p.add_argument("--device", default="cpu", help="device for knn_search (cpu for a like-for-like comparison)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    # Internal: run one method in this (child) process.
    p.add_argument("--child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def unit_vectors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [n, d] rows of unit length, built in row blocks so that no full-size
    temporary inflates the peak RSS measured around the search."""
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 4096):
        block = rng.standard_normal((min(4096, n - s), d), dtype=np.float32)
        x[s:s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_child(args) -> None:
    """Search with one method; save the indices and write {seconds, rss_data_mb, peak_mb} to a JSON file."""
    # Import the method's library first, so that "data" RSS = libraries + vectors, and
    # peak - data = the search's own working memory.
    if args.child == "ours":
        from deepranking import retrieval
    else:
        from sklearn.neighbors import NearestNeighbors
    rng = np.random.default_rng([args.seed, args.dim])
    db = unit_vectors(args.database, args.dim, rng)  # [N, d]
    q = unit_vectors(args.queries, args.dim, rng)  # [Q, d]
    rss_data = maxrss_mb()
    t0 = time.perf_counter()
    if args.child == "ours":
        _, idx = retrieval.knn_search(q, db, args.k, device=args.device)
    else:
        nn = NearestNeighbors(n_neighbors=args.k, algorithm="brute", metric="euclidean").fit(db)
        _, idx = nn.kneighbors(q, n_neighbors=args.k)
    secs = time.perf_counter() - t0
    np.save(args.result.with_suffix(".npy"), idx.astype(np.int64))
    args.result.write_text(json.dumps({"seconds": secs, "rss_data_mb": rss_data, "peak_mb": maxrss_mb()}))


def spawn(method: str, dim: int, args, tmp: Path) -> tuple[dict, np.ndarray]:
    result = tmp / f"{method}_{dim}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--dim", str(dim),
           "--result", str(result), "--queries", str(args.queries), "--database", str(args.database),
           "--k", str(args.k), "--device", args.device, "--seed", str(args.seed)]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text()), np.load(result.with_suffix(".npy"))


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean fraction of shared neighbours per query, fraction of queries with identical sets)."""
    a_s, b_s = np.sort(a, axis=1), np.sort(b, axis=1)
    same_rows = (a_s == b_s).all(axis=1)
    overlap = np.array([len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(a, b)]) / a.shape[1]
    return float(overlap.mean()), float(same_rows.mean())


def main(args) -> None:
    if args.child is not None:
        run_child(args)
        return
    if args.k > args.database:
        raise UserError(f"--k {args.k} is larger than --database {args.database}")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UserError("scikit-learn is not installed (not a project dependency): "
                        "run `.venv/bin/pip install scikit-learn` to benchmark against it")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_knn_") as tmp:
        for dim in args.dims:
            res = {}
            for method in METHODS:
                print(f"  d={dim}: {method} ...", file=sys.stderr, flush=True)
                res[method] = spawn(method, dim, args, Path(tmp))
            overlap, identical = agreement(res["ours"][1], res["sklearn"][1])
            rows.append((dim, res["ours"][0], res["sklearn"][0], overlap, identical))
    print(f"kNN: {args.queries} queries x {args.database} database, k={args.k}, float32 unit vectors, "
          f"knn_search on {args.device}")
    print(f"{'dim':>5} {'method':<8} {'seconds':>9} {'base MB':>9} {'peak MB':>9} {'extra MB':>9}")
    for dim, ours, skl, overlap, identical in rows:
        for name, r in (("ours", ours), ("sklearn", skl)):
            print(f"{dim:>5} {name:<8} {r['seconds']:>9.2f} {r['rss_data_mb']:>9.0f} {r['peak_mb']:>9.0f} "
                  f"{r['peak_mb'] - r['rss_data_mb']:>9.0f}")
        print(f"{dim:>5} speed-up sklearn/ours {skl['seconds'] / ours['seconds']:.2f}x; "
              f"neighbour sets: {overlap:.5f} mean overlap, {identical:.4f} of queries identical")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

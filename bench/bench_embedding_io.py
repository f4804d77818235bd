"""Embedding files: embedding_io's text writer/reader vs np.savetxt + pandas.read_csv.

    python bench/bench_embedding_io.py [--rows 100000] [--dim 4096]

Draws ``--rows`` float32 unit vectors of ``--dim`` values (what the network
outputs) and times, in a temporary folder:

1. baseline: ``np.savetxt(fmt="%.8e", delimiter=",")`` (values only) +
   ``pandas.read_csv(header=None, engine="c")`` cast to float32, on the first
   ``--baseline-rows`` rows (default 10,000) and scaled linearly to ``--rows``
   (marked "extrapolated" in the table);
2. ours, text: ``embedding_io.write_embeddings`` / ``read_embeddings`` of a
   ``.csv`` (header, path and label columns included);
3. ours, binary: the same functions with a ``.npy`` name (plus its path/label sidecar).

Prints seconds, file sizes, whether each round trip is exact
(``np.array_equal``), the peak resident memory of this process during each write
and read (bench_common.PeakRSS, as the rise above the RSS before it, which holds the
embeddings themselves; the text writer's worker processes are not counted) and the
speed-ups over the baseline. The default size is a
~5 GB text file; use fewer ``--rows`` on a small machine (time is linear in rows).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import PeakRSS  # also puts the repo on sys.path

from deepranking import argtypes, cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=argtypes.positive_int, default=100_000, help="embeddings (rows)")
    p.add_argument("--dim", type=argtypes.positive_int, default=4096, help="values per embedding")
    p.add_argument("--baseline-rows", type=argtypes.positive_int, default=10_000,
                   help="rows the slow baseline really runs on; its times are scaled to --rows")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def clock(fn):
    """(seconds, fn(), rise of the peak RSS in MB during the call: NaN where not measurable)."""
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        out = fn()
    return time.perf_counter() - t0, out, mem.extra_mb


def files_size(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def main(args) -> None:
    import pandas as pd

    from deepranking import embedding_io

    rng = np.random.default_rng(args.seed)
    emb = rng.standard_normal((args.rows, args.dim), dtype=np.float32)  # [N, d]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_emb_io_") as tmp:
        tmp = Path(tmp)
        paths = [str(tmp / "images" / f"c{i % 200}" / f"img_{i}.JPEG") for i in range(args.rows)]
        labels = [f"c{i % 200}" for i in range(args.rows)]

        base = tmp / "baseline.txt"
        nb = min(args.baseline_rows, args.rows)
        scale = args.rows / nb
        print(f"  baseline write ({nb} rows) ...", file=sys.stderr, flush=True)
        w, _, wm = clock(lambda: np.savetxt(base, emb[:nb], fmt="%.8e", delimiter=","))
        print("  baseline read ...", file=sys.stderr, flush=True)
        r, back, rm = clock(lambda: pd.read_csv(base, header=None, engine="c").to_numpy(dtype=np.float32))
        name = "np.savetxt + pandas.read_csv" + (f" (x{scale:.3g} extrapolated)" if nb < args.rows else "")
        # memory scales with the rows read like the time does (the writer's is a constant buffer)
        rows.append((name, w * scale, r * scale, files_size(base) * scale, np.array_equal(back, emb[:nb]),
                     wm, rm * scale))
        base.unlink()
        del back

        for name, file in (("embedding_io text (.csv)", tmp / "emb.csv"), ("embedding_io .npy", tmp / "emb.npy")):
            print(f"  {name} ...", file=sys.stderr, flush=True)
            w, _, wm = clock(lambda: embedding_io.write_embeddings(file, paths, labels, emb, progress=False))
            r, back, rm = clock(lambda: embedding_io.read_embeddings(file, progress=False))
            size = files_size(file, embedding_io.meta_path(file)) if file.suffix == ".npy" else files_size(file)
            ok = np.array_equal(back.emb, emb) and list(back.paths) == paths and \
                [str(x) for x in back.labels] == labels
            rows.append((name, w, r, size, ok, wm, rm))
            file.unlink()
            del back
    print(f"embedding files: {args.rows} rows x {args.dim} float32 values")
    print(f"{'method':<44} {'write s':>9} {'read s':>9} {'total s':>9} {'size MB':>9} {'exact':>6} "
          f"{'write +MB':>10} {'read +MB':>9}")
    for name, w, r, size, ok, wm, rm in rows:
        print(f"{name:<44} {w:>9.2f} {r:>9.2f} {w + r:>9.2f} {size / 1e6:>9.1f} {str(ok):>6} {wm:>10.0f} {rm:>9.0f}")
    bw, br = rows[0][1:3]
    for name, w, r, *_ in rows[1:]:
        print(f"{name}: write {bw / w:.1f}x, read {br / r:.1f}x, total {(bw + br) / (w + r):.1f}x faster than baseline")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

"""Time to first result of query.py: cold (the first query builds the saved index) and warm (it is reused).

    python bench/bench_query_start.py [--rows 100000] [--dim 128] [--ann exact] [--workdir DIR]

Writes a synthetic database (seeded random unit rows, as a text file through
embedding_io.write_embeddings, recording the model of a tiny resnet18 checkpoint with
``embedding_dim = --dim``) and one query image, then runs ``python query.py ... --top 10``
as a user would, three times in fresh processes:

- cold: no ``<db>.index/`` yet: parse the text, save the index, search;
- warm: the saved index is reused (the matrix memory-mapped, no parse);
- file: ``--no-saved-index`` (what every query cost before the saved index).

Each figure is the process's wall time (Python start, imports, model load and query
embedding included: what a user waits for) and query.py's own "load" time (database
+ index only).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_common  # noqa: F401  (puts the repository root on sys.path)

REPO = Path(__file__).resolve().parents[1]


def make_inputs(work: Path, rows: int, dim: int) -> tuple[Path, Path, Path]:
    import torch
    from PIL import Image

    import deep_rank_net as drn
    from deepranking.checkpoint import load_checkpoint, model_fingerprint, model_record, write_checkpoint
    from deepranking.embedding_io import write_embeddings
    from deepranking.preprocessing import Preprocessing

    torch.manual_seed(0)
    ckpt = work / "net.model"
    model = drn.DeepRankNet(arch="resnet18", embedding_dim=dim, weights="none")
    spec = Preprocessing(image_size=32, cache_size=32)
    write_checkpoint(ckpt, {**model_record(model, spec), "epoch": 0, "step": 0, "args": {}})
    loaded = load_checkpoint(ckpt)
    fingerprint = model_fingerprint(loaded, drn.model_from_checkpoint(loaded, "cpu")[1].to_dict(), ckpt)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(rows, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    paths = [str(work / "images" / f"c{i % 100:03d}" / f"{i}.jpg") for i in range(rows)]
    db = work / "database.txt"
    write_embeddings(db, paths, [f"c{i % 100:03d}" for i in range(rows)], emb, progress=False, model=fingerprint)
    img = work / "query.jpg"
    Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(img)
    return ckpt, db, img


def run_query(ckpt: Path, db: Path, img: Path, ann: str, *extra: str) -> tuple[float, float, str]:
    cmd = [sys.executable, str(REPO / "query.py"), "--model", str(ckpt), "--embeddings", str(db), "--top", "10",
           "--device", "cpu", "--ann", ann, str(img), *extra]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"query.py failed: {result.stderr.strip()}")
    match = re.search(r"load ([0-9.]+) s", result.stderr)
    return wall, float(match.group(1)) if match else float("nan"), result.stderr.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--ann", choices=("exact", "faiss"), default="exact")
    p.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temp folder)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_query_start_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        ckpt, db, img = make_inputs(work, args.rows, args.dim)
        shutil.rmtree(Path(str(db) + ".index"), ignore_errors=True)
        print(f"database {args.rows} x {args.dim} text, {db.stat().st_size / 1e6:.0f} MB "
              f"(written in {time.perf_counter() - t:.1f} s); --ann {args.ann}")
        for name, extra in (("cold", ()), ("warm", ()), ("file", ("--no-saved-index",))):
            wall, load, line = run_query(ckpt, db, img, args.ann, *extra)
            print(f"{name:>4}: time to first result {wall:6.2f} s  (query.py load {load:5.2f} s)   | {line}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

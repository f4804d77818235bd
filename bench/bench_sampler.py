"""Speed of triplet_sampler.py on a TinyImageNet-sized listing vs the classic sampler.

    python bench/bench_sampler.py [--classes 200] [--per-class 500] [--baseline-queries 1000]

Creates ``classes x per-class`` EMPTY files laid out like TinyImageNet
(``train/<wnid>/images/<wnid>_<i>.JPEG``; the sampler never opens images) in a
temporary folder, then times the whole command (listing + sampling + CSV
write, through ``triplet_sampler.main``) at 1x1 and 2x2 triplets per query,
and each run's peak resident memory (bench_common.PeakRSS).

Baseline: the classic sampler's shape: one query at a time, the DataFrame
grown row by row with ``pd.concat``, and every negative drawn by shuffling all
image indices. It runs on ``--baseline-queries`` queries (1x1) and is
extrapolated linearly to the full listing; the real cost grows faster (each
concat copies the whole frame), so the printed ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import PeakRSS  # also puts the repo on sys.path

from deepranking import argtypes, cli  # noqa: E402
from deepranking import image_data  # noqa: E402
import triplet_sampler  # noqa: E402

TARGETS = {(1, 1): 5.0, (2, 2): 10.0}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=argtypes.positive_int, default=200, help="class folders")
    p.add_argument("--per-class", type=argtypes.positive_int, default=500, help="files per class")
    p.add_argument("--baseline-queries", type=argtypes.positive_int, default=1000,
                   help="queries the classic baseline runs on before extrapolating")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def make_listing(root: Path, classes: int, per_class: int) -> Path:
    """``root/train/<wnid>/images/<wnid>_<i>.JPEG``, all empty; returns ``root``."""
    for c in range(classes):
        wnid = f"n{c:08d}"
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{wnid}_{i}.JPEG").touch()
    return root


def classic_sample(paths: list[str], labels: np.ndarray, n_queries: int, rng: np.random.Generator):
    """The classic 1x1 sampler: row-by-row DataFrame growth, a full shuffle per negative."""
    import pandas as pd

    df = pd.DataFrame(columns=["query", "positive", "negative"])
    all_idx = np.arange(len(paths))
    for qi in range(n_queries):
        same = np.flatnonzero(labels == labels[qi])
        pos = qi
        while pos == qi:
            pos = int(rng.choice(same))
        shuffled = rng.permutation(all_idx)
        neg = int(next(j for j in shuffled if labels[j] != labels[qi]))
        row = pd.DataFrame([[paths[qi], paths[pos], paths[neg]]], columns=df.columns)
        df = pd.concat([df, row], ignore_index=True)
    return df


def time_sampler(data_dir: Path, out: Path, num_pos: int, num_neg: int, seed: int) -> tuple[float, str, PeakRSS]:
    args = triplet_sampler.get_args_parser().parse_args(
        ["--data-dir", str(data_dir), "--num_pos_images", str(num_pos), "--num_neg_images", str(num_neg),
         "--output", str(out), "--seed", str(seed), "--force"])
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf), PeakRSS() as mem:
        triplet_sampler.main(args)
    return time.perf_counter() - t0, buf.getvalue().strip(), mem


def main(args) -> None:
    total = args.classes * args.per_class
    with tempfile.TemporaryDirectory(prefix="bench_sampler_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        root = make_listing(tmp / "tiny-imagenet-200", args.classes, args.per_class)
        print(f"created {total} empty files in {time.perf_counter() - t0:.1f} s (not timed below)")

        results = {}
        for num_pos, num_neg in TARGETS:
            seconds, msg, mem = time_sampler(root, tmp / f"t{num_pos}x{num_neg}.csv", num_pos, num_neg, args.seed)
            results[num_pos, num_neg] = seconds
            target = TARGETS[num_pos, num_neg]
            verdict = "ok" if seconds < target else "SLOWER THAN TARGET"
            print(f"triplet_sampler {num_pos}x{num_neg}: {seconds:6.2f} s  (target < {target:.0f} s: "
                  f"{verdict}), peak RSS {mem}  [{msg}]")

        listing = image_data.list_class_folder(root / "train")
        nq = min(args.baseline_queries, total)
        t0 = time.perf_counter()
        with PeakRSS() as classic_mem:
            df = classic_sample(listing.paths, listing.labels, nq, np.random.default_rng(args.seed))
        t_classic = time.perf_counter() - t0
        assert len(df) == nq
    extrapolated = t_classic * total / nq
    print(f"classic sampler, {nq} queries 1x1: {t_classic:.2f} s -> {extrapolated:.0f} s for {total} "
          f"(linear extrapolation; a lower bound), peak RSS {classic_mem} for the {nq}")
    print(f"speed-up at 1x1: {extrapolated / results[1, 1]:.0f}x (at least)")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

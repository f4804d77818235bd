"""Reading images from the decoded-image cache vs decoding JPEGs each time.

    python bench/bench_cache.py [--images 10000] [--size 64] [--batch 256]

Writes ``--images`` random ``--size`` px JPEGs (TinyImageNet-like) to a
temporary folder, then times:

1. classic decode: ``Image.open(p).convert('RGB')`` + ``np.asarray`` for every
   image (what a Dataset.__getitem__ does every epoch);
2. building the cache once (image_cache.cache_images, threaded decode);
3. one epoch from the warm cache: every image read in random batches of
   ``--batch`` rows (fancy indexing of the memmap, as train_net.py does).

Prints the times, each step's peak resident memory (bench_common.PeakRSS: the
whole process, and its rise during the step) and the speed-up of 3 over 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench_common import PeakRSS  # also puts the repo on sys.path

from deepranking import argtypes, cli  # noqa: E402
from deepranking import image_cache  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=argtypes.positive_int, default=10_000, help="JPEGs to write")
    p.add_argument("--size", type=argtypes.positive_int, default=64, help="image side in pixels")
    p.add_argument("--batch", type=argtypes.positive_int, default=256, help="rows per cache read")
    p.add_argument("--workers", type=argtypes.positive_int, default=None,
                   help="decode threads for the cache build (default: image_cache's choice)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def write_jpegs(folder: Path, n: int, size: int, rng: np.random.Generator) -> list[str]:
    """``n`` JPEGs of smooth random colour fields (compress like photos, not like noise)."""
    paths = []
    base = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    for i in range(n):
        im = Image.fromarray(base[i]).resize((size, size), Image.BILINEAR)
        p = folder / f"img_{i:05d}.JPEG"
        im.save(p, quality=90)
        paths.append(str(p))
    return paths


def main(args) -> None:
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        paths = write_jpegs(tmp / "img", args.images, args.size, rng)

        t0 = time.perf_counter()
        checksum_pil = 0
        with PeakRSS() as mem_pil:
            for p in paths:
                checksum_pil += int(np.asarray(Image.open(p).convert("RGB"))[0, 0, 0])
        t_pil = time.perf_counter() - t0

        t0 = time.perf_counter()
        with PeakRSS() as mem_build:
            arr = image_cache.cache_images(paths, args.size, cache_dir=tmp / "cache", progress=False,
                                           num_workers=args.workers)
        t_build = time.perf_counter() - t0
        del arr  # the warm read below maps the cache afresh

        t0 = time.perf_counter()
        with PeakRSS() as mem_read:
            arr = image_cache.cache_images(paths, args.size, cache_dir=tmp / "cache", progress=False)
            order = rng.permutation(len(paths))
            checksum_cache = 0
            for lo in range(0, len(order), args.batch):
                batch = arr[np.sort(order[lo:lo + args.batch])]      # uint8 [B, s, s, 3]
                checksum_cache += int(batch[:, 0, 0, 0].astype(np.int64).sum())
        t_read = time.perf_counter() - t0
        del arr
        assert checksum_cache == checksum_pil, "cache rows differ from direct decode"

    n = args.images
    print(f"{n} JPEGs of {args.size}x{args.size}, batches of {args.batch}")
    print(f"classic PIL decode (open+convert+asarray): {t_pil:8.3f} s  ({n / t_pil:10.0f} img/s)  peak RSS {mem_pil}")
    print(f"cache build (threaded decode + write):     {t_build:8.3f} s  ({n / t_build:10.0f} img/s)  "
          f"peak RSS {mem_build}")
    print(f"warm cache read (key check + random batches): {t_read:5.3f} s  ({n / t_read:10.0f} img/s)  "
          f"peak RSS {mem_read}")
    print(f"speed-up of a warm-cache epoch over classic decode: {t_pil / t_read:.1f}x")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

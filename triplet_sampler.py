"""Sample (query, positive, negative) triplets from a class-folder dataset.

Classic interface, same CSV users know (header ``query,positive,negative``; a
query gets ``num_pos_images x num_neg_images`` consecutive rows)::

    python triplet_sampler.py --training 1 --num_pos_images 1 --num_neg_images 1
    python triplet_sampler.py --training 0 --num_pos_images 2 --num_neg_images 2

For every query image: N positives drawn without replacement from its own class
(never the query itself); for each positive, M negatives drawn uniformly from
all images outside the query's class. Everything is vectorised with NumPy on
integer indices into the (class-sorted) image list, so a TinyImageNet-sized
dataset (100,000 images) takes seconds, and the same ``--seed`` gives a
byte-identical CSV.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepranking import argtypes, cli, file_io
from deepranking import image_data
from deepranking.cli import UserError

DEFAULT_OUTPUT = {1: "training_triplet_sample.csv", 0: "val_triplet_sample.csv"}
# Row-chunk bound (elements) for the random-keys path of the positive sampler.
_KEYS_CHUNK_ELEMENTS = 1 << 22


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Sample query/positive/negative triplets from a TinyImageNet folder "
        "(or any folder of class folders) into a triplet CSV.")
    p.add_argument("--training", type=int, choices=(0, 1), default=1,
                   help="1: sample the train split, 0: the val split (default 1)")
    p.add_argument("--num_pos_images", "--num-pos-images", dest="num_pos_images",
                   type=argtypes.positive_int, default=1,
                   help="positives per query, drawn without replacement from its class (default 1)")
    p.add_argument("--num_neg_images", "--num-neg-images", dest="num_neg_images",
                   type=argtypes.positive_int, default=1,
                   help="negatives per (query, positive) pair, from other classes (default 1)")
    p.add_argument("--data-dir", default="tiny-imagenet-200",
                   help="TinyImageNet root (with train/ and val/) or a plain folder of class "
                   "folders, used as the train split (default tiny-imagenet-200)")
    p.add_argument("--output", default=None,
                   help="output CSV (default training_triplet_sample.csv or "
                   "val_triplet_sample.csv by split); paths in it are relative to its folder")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--val-fraction", type=argtypes.fraction, default=0.0,
                   help="hold out about this fraction of each class's images as queries of a second "
                   "CSV <output stem>_heldout.csv; held-out images never appear in the main CSV "
                   f"(default 0: no held-out file); {image_data.HELDOUT_RULE}")
    return p


# ----------------------------------------------------------------------------
# Sampling on integer indices (pure functions, no file access)
# ----------------------------------------------------------------------------


@dataclass
class Triplets:
    """Row-aligned int64 index arrays [R] into the image list, plus sampling notes."""

    query: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    short_classes: np.ndarray  # labels of query classes with fewer than num_pos + 1 images


def class_blocks(labels: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(counts [C], starts [C]) of the contiguous class blocks of sorted ``labels``."""
    counts = np.bincount(labels, minlength=num_classes or 0).astype(np.int64)
    starts = np.cumsum(counts) - counts
    return counts, starts


def sample_distinct(n: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """For each row i, min(k, n[i]) distinct offsets uniform in [0, n[i]).

    Returns int64 [len(n), k], padded with -1 where n[i] < k. Rows with
    k <= n/2 draw with replacement and redraw only the colliding entries (few
    rounds, O(k) per row); the others argsort random keys (O(n) <= O(2k) per row).
    """
    n = np.asarray(n, dtype=np.int64)
    out = np.full((len(n), k), -1, dtype=np.int64)
    sparse = 2 * k <= n
    rows = np.flatnonzero(sparse)
    if len(rows):
        nr = n[rows, None]
        off = (rng.random((len(rows), k)) * nr).astype(np.int64)
        todo = np.arange(len(rows))
        while len(todo) and k > 1:
            sub = off[todo]
            order = np.argsort(sub, axis=1, kind="stable")
            srt = np.take_along_axis(sub, order, axis=1)
            # Later copies of a value (in sorted order) are redrawn; the first copy stays.
            dup_sorted = np.zeros_like(srt, dtype=bool)
            dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
            has_dup = dup_sorted.any(axis=1)
            if not has_dup.any():
                break
            r, c = np.nonzero(dup_sorted)
            pos = order[r, c]
            sub[r, pos] = (rng.random(len(r)) * nr[todo[r], 0]).astype(np.int64)
            off[todo] = sub
            todo = todo[has_dup]
        out[rows] = off
    dense = np.flatnonzero(~sparse)
    for size in np.unique(n[dense]):
        group = dense[n[dense] == size]
        take = int(min(k, size))
        step = max(1, _KEYS_CHUNK_ELEMENTS // max(int(size), 1))
        for i in range(0, len(group), step):
            g = group[i:i + step]
            keys = rng.random((len(g), int(size)))
            out[g, :take] = np.argsort(keys, axis=1)[:, :take]
    return out


def sample_triplets(labels: np.ndarray, num_pos: int, num_neg: int, rng: np.random.Generator,
                    query_mask: np.ndarray | None = None) -> Triplets:
    """Sample triplets over the pool of images with sorted ``labels`` [T].

    Queries are the images where ``query_mask`` is true (default: all) whose
    class has >= 2 images. Each query gets min(num_pos, class size - 1)
    positives (distinct, never the query) and num_neg negatives per positive,
    uniform over the T - class size images of other classes. Rows are grouped
    by query (in index order), then by positive.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and np.any(labels[1:] < labels[:-1]):
        raise ValueError("labels must be sorted (contiguous class blocks)")
    total = len(labels)
    counts, starts = class_blocks(labels)
    if query_mask is None:
        query_mask = np.ones(total, dtype=bool)
    q = np.flatnonzero(query_mask & (counts[labels] >= 2))
    qc = labels[q]
    if len(q) and np.any(total - counts[qc] <= 0):
        raise UserError("need images of at least 2 classes to draw negatives")
    # Positives: offsets among the class's other size-1 images, mapped past the query.
    within = q - starts[qc]                                     # [Q] query's index in its class
    off = sample_distinct(counts[qc] - 1, num_pos, rng)          # [Q, num_pos], -1 = none
    pos = starts[qc, None] + off + (off >= within[:, None])      # [Q, num_pos]
    valid = (off >= 0).ravel()
    q_pairs = np.repeat(q, num_pos)[valid]                       # [P]
    p_pairs = pos.ravel()[valid]                                 # [P]
    # Negatives: uniform over [0, T - s) mapped past the query's class block.
    q_rows = np.repeat(q_pairs, num_neg)                         # [R = P * num_neg]
    p_rows = np.repeat(p_pairs, num_neg)
    c_rows = labels[q_rows]
    u = (rng.random(len(q_rows)) * (total - counts[c_rows])).astype(np.int64)
    n_rows = u + counts[c_rows] * (u >= starts[c_rows])
    short = np.unique(qc[counts[qc] - 1 < num_pos])
    return Triplets(q_rows, p_rows, n_rows, short)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def heldout_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_heldout.csv")


def _warn_small_classes(images: image_data.ImageList) -> None:
    counts = np.bincount(images.labels, minlength=len(images.class_names))
    small = [f"{images.class_names[c]} ({counts[c]})" for c in np.flatnonzero(counts < 2)]
    if small:
        shown = ", ".join(small[:10]) + (" ..." if len(small) > 10 else "")
        cli.warn(f"skipped {len(small)} class(es) with fewer than 2 images as queries "
                       f"(no positive possible; their images still serve as negatives): {shown}")


def _note_short_classes(images: image_data.ImageList, short: np.ndarray, num_pos: int) -> None:
    if len(short):
        counts = np.bincount(images.labels, minlength=len(images.class_names))
        smallest = int(counts[short].min())
        names = ", ".join(images.class_names[c] for c in short[:5]) + (" ..." if len(short) > 5 else "")
        cli.warn(f"--num_pos_images {num_pos} is more than {len(short)} class(es) can give "
                       f"(smallest has {smallest} images: {smallest - 1} positives per query); "
                       f"their queries take all other images of their class: {names}")


# Peak bytes per triplet row while sampling and writing (index columns, their sorted copies and
# the CSV text): measured 775 (813 MB peak for 991,200 rows against 45 MB for 600), rounded up.
BYTES_PER_ROW = 800


def available_memory() -> int | None:
    """Bytes of memory available to this process now (Linux/macOS), or None if unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_output_size(labels: np.ndarray, num_pos: int, num_neg: int) -> None:
    """Refuse, before any work, a CSV that cannot fit in memory (instead of a MemoryError later)."""
    counts = np.bincount(labels)
    rows = int((counts * np.minimum(num_pos, np.maximum(counts - 1, 0))).sum()) * num_neg
    need, free = rows * BYTES_PER_ROW, available_memory()
    if free is not None and need > free:
        raise UserError(f"--num_pos_images {num_pos} x --num_neg_images {num_neg} makes {rows:,} triplet rows "
                        f"(~{need / 2**30:.1f} GiB while sampling), more than the {free / 2**30:.1f} GiB of memory "
                        "available; use smaller numbers")


def main(args) -> None:
    split = "train" if args.training == 1 else "val"
    output = Path(args.output or DEFAULT_OUTPUT[args.training])
    file_io.check_output_path(output, args.force, "output CSV")
    held_out = heldout_path(output) if args.val_fraction > 0 else None
    if held_out is not None:
        file_io.check_output_path(held_out, args.force, "held-out CSV")
    split_dir = image_data.resolve_split_dir(args.data_dir, split)
    images = image_data.list_class_folder(split_dir)
    labels = images.labels
    if len(images.class_names) < 2:
        raise UserError(f"need at least 2 classes to draw negatives, found 1 in {split_dir}")
    if np.bincount(labels).max() < 2:
        raise UserError(f"every class in {split_dir} has a single image; no positive can be drawn")
    _warn_small_classes(images)
    check_output_size(labels, args.num_pos_images, args.num_neg_images)
    paths = images.paths
    rng = np.random.default_rng(args.seed)

    if held_out is None:
        trip = sample_triplets(labels, args.num_pos_images, args.num_neg_images, rng)
        _note_short_classes(images, trip.short_classes, args.num_pos_images)
        n = image_data.write_triplet_rows(output, paths, trip.query, trip.positive, trip.negative)
        print(f"wrote {n} triplets ({len(np.unique(trip.query))} queries) to {output}")
        return

    hold = image_data.heldout_images(paths, args.val_fraction)
    if not hold.any():
        # A header-only CSV would be rejected by every later stage: refuse before writing anything.
        raise UserError(f"--val-fraction {args.val_fraction} holds out no image (every class keeps at least "
                        f"{image_data.HELDOUT_KEEP} images, and none in {split_dir} has more); use 0")
    keep = np.flatnonzero(~hold)
    # Main CSV: sampled inside the kept images only, so held-out ones appear nowhere in it.
    main_t = sample_triplets(labels[keep], args.num_pos_images, args.num_neg_images, rng)
    # Held-out CSV: held-out queries; positives/negatives from the whole split.
    held_t = sample_triplets(labels, args.num_pos_images, args.num_neg_images, rng, query_mask=hold)
    _note_short_classes(images, np.union1d(main_t.short_classes, held_t.short_classes),
                        args.num_pos_images)
    # main_t indexes the kept images; keep[...] maps back to the full list.
    n_main, n_held = image_data.write_triplet_files(paths, [
        (output, keep[main_t.query], keep[main_t.positive], keep[main_t.negative]),
        (held_out, held_t.query, held_t.positive, held_t.negative)])
    print(f"wrote {n_main} triplets ({len(np.unique(main_t.query))} queries) to {output}")
    print(f"wrote {n_held} held-out triplets ({int(hold.sum())} queries) to {held_out}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

"""Write a real sample dataset (Fashion-MNIST) in TinyImageNet's exact layout.

The repository bundles a small class-balanced subset of Fashion-MNIST
(``sample_data/fashion_mnist_sample.npz``: 60 train + 15 val images per class,
28x28 grey), so the whole pipeline can run on real images with no download.
The Debian package ``dataset-fashion-mnist`` provides the full dataset
(60,000 train + 10,000 t10k images) for larger runs and benchmarks.

Output (``--output ROOT``), the layout of ``tiny-imagenet-200`` itself::

    ROOT/wnids.txt                              one id per line (fm0_tshirt_top, ...)
    ROOT/words.txt                              id TAB human name
    ROOT/train/<wnid>/images/<wnid>_<i>.JPEG    S x S RGB JPEG
    ROOT/train/<wnid>/<wnid>_boxes.txt          file TAB 0 TAB 0 TAB S-1 TAB S-1
    ROOT/val/images/val_<i>.JPEG                classes in a seeded shuffled order
    ROOT/val/val_annotations.txt                file TAB wnid TAB 0 TAB 0 TAB S-1 TAB S-1

Examples::

    python make_sample_data.py --output data/fashion-tin                    # bundled subset
    python make_sample_data.py --output data/fashion-full --source debian   # all 70,000 images
    python make_sample_data.py --build-bundle --force                       # rebuild the bundle
    python make_sample_data.py --output data/fm200 --source debian --tints 20 \
        --train-per-class 500 --val-per-class 50          # TinyImageNet's size: 200 classes, 110,000 images
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import re
import shutil
import struct
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from deepranking import argtypes, cli, file_io, image_data
from deepranking.cli import UserError

REPO_DIR = Path(__file__).resolve().parent
BUNDLE_PATH = REPO_DIR / "sample_data" / "fashion_mnist_sample.npz"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_HINT = "install it with: apt-get install -y dataset-fashion-mnist (or use --source bundled)"

# Label order of Fashion-MNIST (index = label in the IDX files).
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# IDX file stems: Fashion-MNIST's train split -> our train, t10k -> our val.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
BUNDLE_TRAIN_PER_CLASS = 60
BUNDLE_VAL_PER_CLASS = 15
BUNDLE_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "class_names")
JPEG_QUALITY = 95
TINT_BLOCK = 8192  # images tinted at a time (their float64 product: ~150 MB at 28 px)


# ----------------------------------------------------------------------------
# Reading the sources
# ----------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or plain) as a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read IDX file {path}: {exc}")
    # Header: 0x00 0x00, type 0x08 (unsigned byte), ndim, then ndim big-endian uint32 sizes.
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] == 0:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"IDX file {path} is truncated (incomplete header)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise UserError(
            f"IDX file {path} holds {len(data) - header} bytes of data, expected {expected} for shape {dims}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist_idx(folder: str | os.PathLike = DEBIAN_DIR) -> dict:
    """Load Fashion-MNIST from a folder of IDX files (Debian's by default).

    Returns ``{"train_images": uint8 [60000, 28, 28], "train_labels": uint8 [60000],
    "val_images": uint8 [10000, 28, 28], "val_labels": uint8 [10000],
    "class_names": list[str]}`` (t10k becomes val).
    """
    folder = Path(folder)
    stems = [s for pair in IDX_FILES.values() for s in pair]
    found = {s: _find_idx(folder, s) for s in stems} if folder.is_dir() else {}
    missing = [s + ".gz" for s in stems if found.get(s) is None]
    if missing:
        where = f"in {folder}" if folder.is_dir() else f"({folder} does not exist)"
        raise UserError(
            f"Fashion-MNIST IDX files not found {where}: missing {', '.join(missing)}; {DEBIAN_HINT}"
        )
    out: dict = {"class_names": list(FASHION_MNIST_CLASSES)}
    for split, (img_stem, lab_stem) in IDX_FILES.items():
        images, labels = read_idx(found[img_stem]), read_idx(found[lab_stem])
        if images.ndim != 3 or labels.ndim != 1:
            raise UserError(
                f"{found[img_stem]} / {found[lab_stem]}: expected images [N, H, W] and labels [N], "
                f"got shapes {images.shape} and {labels.shape}"
            )
        if len(images) != len(labels):
            raise UserError(
                f"{found[img_stem]} holds {len(images)} images but {found[lab_stem]} {len(labels)} labels"
            )
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    _check_dataset(out, str(folder))
    return out


def load_bundle(path: str | os.PathLike = BUNDLE_PATH) -> dict:
    """Load the bundled sample (same dict as :func:`load_fashion_mnist_idx`)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise UserError(f"bundled sample not found: {path} (rebuild it with: python make_sample_data.py --build-bundle)")
    file_io.check_input_file(path, "bundled sample")  # there, but a folder, a broken link, unreadable
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in BUNDLE_KEYS if k not in z.files]
            if missing:
                raise UserError(f"{path} is not a sample bundle: missing {', '.join(missing)}")
            out = {k: z[k] for k in BUNDLE_KEYS}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read sample bundle {path}: {exc}")
    out["class_names"] = [str(c) for c in out["class_names"]]
    _check_dataset(out, str(path))
    return out


def _check_dataset(data: dict, source: str) -> None:
    """Shapes, dtypes and label range of a loaded dataset dict."""
    n_classes = len(data["class_names"])
    for split in ("train", "val"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{source}: {split} images must be uint8 [N, H, W] with labels [N], "
                f"got {images.dtype} {images.shape} and {labels.shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise UserError(f"{source}: {split} labels must lie in 0..{n_classes - 1}, found {labels.max()}")


def load_source(source: str) -> tuple[dict, str]:
    """Resolve ``--source`` (bundled, debian, an IDX folder or an .npz); return (data, description)."""
    if source == "bundled":
        return load_bundle(BUNDLE_PATH), f"bundled sample {BUNDLE_PATH}"
    if source == "debian":
        return load_fashion_mnist_idx(DEBIAN_DIR), f"Debian dataset-fashion-mnist ({DEBIAN_DIR})"
    path = Path(source)
    if path.suffix == ".npz":
        return load_bundle(path), f"sample bundle {path}"
    return load_fashion_mnist_idx(path), f"IDX folder {path}"


# ----------------------------------------------------------------------------
# Subsets
# ----------------------------------------------------------------------------


def select_per_class(labels: np.ndarray, per_class: int | None, n_classes: int,
                     rng: np.random.Generator, what: str) -> np.ndarray:
    """Indices of ``per_class`` images of every class (all when None), class-major.

    Within a class the chosen indices keep the source order, so a subset is a
    stable, seeded sample. Raises UserError if a class has too few images.
    """
    chosen = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if per_class is None:
            chosen.append(idx)
            continue
        if len(idx) < per_class:
            raise UserError(
                f"requested {per_class} {what} images per class, but class {c} has only {len(idx)} "
                f"in this source (ask for at most {len(idx)}, or use --source debian for more)"
            )
        chosen.append(np.sort(rng.choice(idx, size=per_class, replace=False)))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def subset(data: dict, train_per_class: int | None, val_per_class: int | None, seed: int) -> dict:
    """A seeded class-balanced subset of ``data`` (None = every image of the split)."""
    n_classes = len(data["class_names"])
    out = {"class_names": list(data["class_names"])}
    for k, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        # A separate stream per split: the val choice does not depend on the train count.
        rng = np.random.default_rng((seed, k))
        idx = select_per_class(data[f"{split}_labels"], per_class, n_classes, rng, split)
        out[f"{split}_images"] = data[f"{split}_images"][idx]
        out[f"{split}_labels"] = data[f"{split}_labels"][idx]
        out[f"{split}_source_index"] = idx
    return out


def tint_count(value: str) -> int:
    """argparse type of --tints: 0 (the grey images) or at least 2 (one tint would only colour them all red)."""
    count = argtypes.non_negative_int(value)
    if count == 1:
        raise cli.arg_error("0 (grey images) or at least 2: one tint would colour every image red and add no classes")
    return count


def tint_colours(n_tints: int) -> np.ndarray:
    """float [n_tints, 3] in [0, 1]: fully saturated hues evenly spaced around the colour wheel."""
    import colorsys

    return np.array([colorsys.hsv_to_rgb(t / n_tints, 1.0, 1.0) for t in range(n_tints)])


def tinted_subset(data: dict, n_tints: int, train_per_class: int | None, val_per_class: int | None,
                  seed: int) -> dict:
    """``n_tints`` colour classes of every class: a fine-grained task (TinyImageNet's 200 classes from 10 × 20).

    Class ``c * n_tints + t`` ("Coat hue 036") holds ``per_class`` images of class c (a seeded choice
    without repeats, drawn anew for each tint, so one grey image may appear in several tints but
    never twice in one), grey value times the t-th hue (:func:`tint_colours`): uint8 [N, H, W, 3].
    Train images still come from the source's train split and val from its val split.
    ``parent_names``: each class's garment, the parent in the hierarchy.csv the layout writes.
    """
    colours = tint_colours(n_tints)  # [T, 3]
    n_classes = len(data["class_names"])
    out = {"class_names": [f"{name} hue {round(360 * t / n_tints):03d}"
                           for name in data["class_names"] for t in range(n_tints)],
           "parent_names": [name for name in data["class_names"] for _ in range(n_tints)]}  # the garment
    for k, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        rng = np.random.default_rng((seed, k, n_tints))
        grey, labels = data[f"{split}_images"], data[f"{split}_labels"].astype(np.int64)
        source = [select_per_class(labels, per_class, n_classes, rng, split) for _ in range(n_tints)]
        # One uint8 array filled a block of rows at a time: a list of per-tint arrays joined at the end,
        # and each tint's float64 product whole, held 2x the result more (4.7 GB at a million images).
        images = np.empty((sum(map(len, source)), *grey.shape[1:3], 3), dtype=np.uint8)
        row = 0
        for t, idx in enumerate(source):
            for a in range(0, len(idx), TINT_BLOCK):
                part = grey[idx[a:a + TINT_BLOCK]]
                rgb = part if grey.ndim == 4 else np.repeat(part[..., None], 3, axis=-1)  # [n, H, W, 3]
                images[row:row + len(rgb)] = np.rint(rgb * colours[t]).astype(np.uint8)
                row += len(rgb)
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = np.concatenate([labels[idx] * n_tints + t for t, idx in enumerate(source)])
        out[f"{split}_source_index"] = np.concatenate(source)
    return out


# ----------------------------------------------------------------------------
# Writing the TinyImageNet layout
# ----------------------------------------------------------------------------


def make_wnids(class_names: Sequence[str], prefix: str = "fm") -> list[str]:
    """Filesystem-safe ids sortable by class index: ``fm0_tshirt_top``, ``fm1_trouser``, ..."""
    width = len(str(max(len(class_names) - 1, 0)))
    wnids = []
    for i, name in enumerate(class_names):
        slug = re.sub(r"[-'’]", "", str(name).lower())
        slug = re.sub(r"[^a-z0-9]+", "_", slug).strip("_") or "class"
        wnids.append(f"{prefix}{i:0{width}d}_{slug}")
    return wnids


def check_output_root(root: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing non-empty ROOT unless ``force``; never replace a non-dataset folder."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"output exists and is not a folder: {root}")
    if root.is_dir() and any(root.iterdir()):
        if not force:
            raise UserError(f"output folder already exists and is not empty: {root} (use --force to replace it)")
        if not (root / "wnids.txt").is_file():
            # --force deletes the old folder; only do that to a dataset root.
            raise UserError(
                f"refusing to replace {root}: it is not empty and holds no wnids.txt, "
                "so it does not look like a dataset written by this script (remove it yourself)"
            )
    return root


def _encode_jpeg(image: np.ndarray, path: str, size: int, quality: int) -> None:
    """uint8 [H, W] grey or [H, W, 3] RGB -> size x size RGB JPEG (bicubic resize)."""
    from PIL import Image

    im = Image.fromarray(image)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    im.convert("RGB").save(path, "JPEG", quality=quality)


def _write_images(jobs: list[tuple[np.ndarray, str]], size: int, quality: int,
                  workers: int, progress: bool) -> None:
    """Encode (image, path) jobs in a thread pool (PIL releases the GIL while resizing/encoding)."""
    chunk = 256
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]

    def run_chunk(part):
        for image, path in part:
            _encode_jpeg(image, path, size, quality)
        return len(part)

    with cli.progress(total=len(jobs), desc="writing JPEGs", unit="img", enabled=progress,
                      mininterval=0.5) as bar:
        if workers <= 1:
            for part in chunks:
                bar.update(run_chunk(part))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for n in pool.map(run_chunk, chunks):
                    bar.update(n)


def write_tiny_imagenet_layout(
    root: str | os.PathLike,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    class_names: Sequence[str],
    size: int = 64,
    seed: int = 0,
    *,
    force: bool = False,
    wnid_prefix: str = "fm",
    quality: int = JPEG_QUALITY,
    workers: int | None = None,
    progress: bool = True,
    parents: Sequence[str] | None = None,
) -> list[str]:
    """Write images in TinyImageNet's layout under ``root``; return the wnids.

    train_images / val_images: uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB),
    resized to ``size`` x ``size`` with bicubic interpolation and saved as RGB
    JPEG. Labels: int [N] indexing ``class_names``. Train images of a class are
    numbered in the given order; val images are numbered in an order shuffled
    with ``seed`` (classes interleaved, as in the real val split). ``parents``: each class's
    parent (a group of classes), written as ``hierarchy.csv`` (``class,parent``, class = wnid)
    for eval.py's graded relevance.

    The dataset is built in a temporary sibling folder and moved into place at
    the end, so a failure leaves any existing ``root`` untouched. An existing
    non-empty ``root`` is refused unless ``force`` (and then only if it holds a
    wnids.txt).
    """
    root = check_output_root(root, force)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    wnids = make_wnids(class_names, wnid_prefix)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = file_io.make_temporary(root, folder=True)  # .<root>.<pid>.<random>.tmp; a killed run's is removed
    try:
        (tmp / "wnids.txt").write_text("".join(w + "\n" for w in wnids), encoding="utf-8")
        (tmp / "words.txt").write_text(
            "".join(f"{w}\t{name}\n" for w, name in zip(wnids, class_names)), encoding="utf-8"
        )
        if parents is not None:
            _write_hierarchy(tmp / image_data.HIERARCHY_FILE, wnids, parents)
        jobs = _train_jobs(tmp, wnids, train_images, train_labels, size)
        jobs += _val_jobs(tmp, wnids, val_images, val_labels, size, seed)
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        _write_images(jobs, size, quality, workers, progress)
        _move_into_place(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return wnids


def _write_hierarchy(path: Path, wnids: list[str], parents: Sequence[str]) -> None:
    """``class,parent`` rows, one per class (image_data.read_class_hierarchy reads them)."""
    import csv

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", "parent"])
    writer.writerows(zip(wnids, parents))
    path.write_text(text.getvalue(), encoding="utf-8")


def _train_jobs(tmp: Path, wnids: list[str], images: np.ndarray, labels: np.ndarray,
                size: int) -> list[tuple[np.ndarray, str]]:
    """train/<wnid>/images/ folders and boxes files; returns the (image, JPEG path) pairs to write."""
    last = size - 1
    jobs: list[tuple[np.ndarray, str]] = []
    for c, wnid in enumerate(wnids):
        class_dir = tmp / "train" / wnid
        (class_dir / "images").mkdir(parents=True)
        idx = np.flatnonzero(labels == c)
        names = [f"{wnid}_{i}.JPEG" for i in range(len(idx))]
        # The whole image is the object: one box covering it, as TinyImageNet's boxes.txt.
        (class_dir / f"{wnid}_boxes.txt").write_text(
            "".join(f"{n}\t0\t0\t{last}\t{last}\n" for n in names), encoding="utf-8"
        )
        jobs.extend((images[j], str(class_dir / "images" / n)) for j, n in zip(idx, names))
    return jobs


def _val_jobs(tmp: Path, wnids: list[str], images: np.ndarray, labels: np.ndarray, size: int,
              seed: int) -> list[tuple[np.ndarray, str]]:
    """val/images/ and val_annotations.txt, numbered in a seeded shuffle (classes interleaved, as the
    real val split); returns the (image, JPEG path) pairs to write."""
    last = size - 1
    (tmp / "val" / "images").mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    lines, jobs = [], []
    for i, j in enumerate(order):
        name = f"val_{i}.JPEG"
        lines.append(f"{name}\t{wnids[labels[j]]}\t0\t0\t{last}\t{last}\n")
        jobs.append((images[j], str(tmp / "val" / "images" / name)))
    (tmp / "val" / "val_annotations.txt").write_text("".join(lines), encoding="utf-8")
    return jobs


def _move_into_place(tmp: Path, root: Path) -> None:
    """Replace ``root`` (absent, empty, or an old dataset) by the finished ``tmp`` folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the dataset a normal folder mode
    old = None
    if root.exists():
        old = root.parent / f"{file_io.temp_prefix(root)}old.tmp"  # a temporary of root too
        os.replace(root, old)
    os.replace(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# The bundle
# ----------------------------------------------------------------------------


def save_npz_deterministic(path: str | os.PathLike, arrays: dict) -> None:
    """Like ``np.savez_compressed`` but byte-reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def build_bundle(data: dict, path: str | os.PathLike, train_per_class: int, val_per_class: int,
                 seed: int, force: bool) -> dict:
    """Write the seeded class-balanced sample bundle (.npz) atomically; return its arrays."""
    path = file_io.check_output_path(path, force, "sample bundle")
    sample = subset(data, train_per_class, val_per_class, seed)
    arrays = {
        "train_images": sample["train_images"],                      # uint8 [N, 28, 28]
        "train_labels": sample["train_labels"].astype(np.uint8),      # uint8 [N]
        "val_images": sample["val_images"],                          # uint8 [M, 28, 28]
        "val_labels": sample["val_labels"].astype(np.uint8),          # uint8 [M]
        "class_names": np.array(sample["class_names"], dtype=str),    # unicode [10]
        # Provenance: row in Fashion-MNIST's train / t10k files.
        "train_source_index": sample["train_source_index"].astype(np.int32),
        "val_source_index": sample["val_source_index"].astype(np.int32),
    }
    with file_io.atomic_path(path) as tmp:
        save_npz_deterministic(tmp, arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the bundle is a shared, committed file
    return arrays


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def count_or_all(value: str) -> int | None:
    """argparse type: a positive integer, or 'all' (None)."""
    if value.lower() == "all":
        return None
    return argtypes.positive_int(value)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write Fashion-MNIST (bundled sample or the Debian package) in TinyImageNet's layout.",
    )
    p.add_argument("--output", default=None,
                   help="dataset root to write (like tiny-imagenet-200/); with --build-bundle, the .npz to "
                        f"write (default {BUNDLE_PATH.relative_to(REPO_DIR)})")
    p.add_argument("--source", default=None,
                   help="'bundled' (sample_data/fashion_mnist_sample.npz, 60+15 images per class), "
                        "'debian' (/usr/share/datasets/fashion-mnist, 6000+1000 per class), a folder of "
                        "Fashion-MNIST IDX files, or an .npz bundle; default: bundled "
                        "(debian with --build-bundle)")
    p.add_argument("--train-per-class", type=count_or_all, default=None,
                   help="train images per class, or 'all' (default: all the source has; 60 with --build-bundle)")
    p.add_argument("--val-per-class", type=count_or_all, default=None,
                   help="val images per class, or 'all' (default: all the source has; 15 with --build-bundle)")
    p.add_argument("--size", type=argtypes.positive_int, default=64,
                   help="side of the written square RGB JPEGs in pixels (28 px upsampled, bicubic; default 64)")
    p.add_argument("--quality", type=int, default=JPEG_QUALITY, choices=range(1, 101), metavar="1..100",
                   help="JPEG quality (default 95)")
    p.add_argument("--workers", type=argtypes.positive_int, default=min(8, os.cpu_count() or 1),
                   help="threads encoding JPEGs (default: CPU count, at most 8)")
    p.add_argument("--tints", type=tint_count, default=0,
                   help="make N colour classes of every class (Fashion-MNIST x 20 = TinyImageNet's 200 classes, "
                        "a fine-grained task); --train/--val-per-class then count images per tinted class")
    p.add_argument("--seed", type=argtypes.seed, default=0,
                   help="seed of the subset choice and of the val order (same seed -> identical files; default 0)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output (a dataset folder holding wnids.txt, or the bundle)")
    p.add_argument("--build-bundle", action="store_true",
                   help="instead of a dataset folder, (re)build the bundled .npz sample from --source")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(args) -> None:
    start = time.perf_counter()
    if args.build_bundle:
        source = args.source or "debian"
        if source == "bundled":
            raise UserError("--build-bundle needs the full dataset: use --source debian or an IDX folder")
        output = Path(args.output) if args.output else BUNDLE_PATH
        file_io.check_output_path(output, args.force, "sample bundle")
        data, desc = load_source(source)
        n_train = args.train_per_class or BUNDLE_TRAIN_PER_CLASS
        n_val = args.val_per_class or BUNDLE_VAL_PER_CLASS
        arrays = build_bundle(data, output, n_train, n_val, args.seed, args.force)
        print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB): {len(arrays['train_labels'])} train + "
              f"{len(arrays['val_labels'])} val images from {desc}, seed {args.seed}")
        return
    if not args.output:
        raise UserError("--output is required (the dataset folder to write)")
    root = check_output_root(args.output, args.force)
    data, desc = load_source(args.source or "bundled")
    if args.tints:
        data = tinted_subset(data, args.tints, args.train_per_class, args.val_per_class, args.seed)
    else:
        data = subset(data, args.train_per_class, args.val_per_class, args.seed)
    wnids = write_tiny_imagenet_layout(
        root, data["train_images"], data["train_labels"], data["val_images"], data["val_labels"],
        data["class_names"], size=args.size, seed=args.seed, force=args.force,
        quality=args.quality, workers=args.workers, progress=not args.no_progress,
        parents=data.get("parent_names"),
    )
    print(f"wrote {root}: {len(data['train_labels'])} train + {len(data['val_labels'])} val images, "
          f"{len(wnids)} classes, {args.size}x{args.size} RGB JPEG, from {desc} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

"""The one place that reads image datasets and triplet files.

Layouts accepted everywhere (class name = folder name):

* TinyImageNet: ``<root>/train/<wnid>/images/*.JPEG`` and, after
  ``transform_validation.py``, ``<root>/val/<wnid>/images/*.JPEG``;
* a folder of class folders: ``<root>/<class>/images/*`` or ``<root>/<class>/*``.

Triplet CSV (shared by every stage): header ``query,positive,negative``, one
triplet per row; relative paths are relative to the CSV file's own folder,
absolute paths are kept as they are.

Unreadable images: every stage decodes the images it needs *before* work starts
(see :mod:`image_cache`) and fails with the list of bad paths; nothing is
skipped silently.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


from deepranking.cli import UserError, check_input_file

# Lower-case extensions; matching is case-insensitive (TinyImageNet uses .JPEG).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
TRIPLET_COLUMNS = ("query", "positive", "negative")
SPLITS = ("train", "val")


def is_image_file(name: str | os.PathLike) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class ImageList:
    """Images of a class-folder dataset, sorted by (class name, file path).

    paths: absolute path strings, length N
    labels: int64 array [N], index into ``class_names``
    class_names: sorted folder names
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def label_names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels]


def _class_images(class_dir: Path) -> list[str]:
    """Image files of one class folder: ``<class>/images/*`` if present, else ``<class>/*``."""
    images_dir = class_dir / "images"
    source = images_dir if images_dir.is_dir() else class_dir
    with os.scandir(source) as entries:
        names = sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))
    return [str(source / n) for n in names]


def list_class_folder(root: str | os.PathLike, min_images: int = 1) -> ImageList:
    """List a folder of class folders.

    Classes with fewer than ``min_images`` images are skipped with one warning
    naming them. Raises UserError if the folder is missing or holds no images.
    """
    root = Path(root).resolve()
    if not root.exists():
        raise UserError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"dataset path is not a folder: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    class_names: list[str] = []
    too_small: list[str] = []
    for class_dir in class_dirs:
        files = _class_images(class_dir)
        if not files:
            continue
        if len(files) < min_images:
            too_small.append(f"{class_dir.name} ({len(files)})")
            continue
        label = len(class_names)
        class_names.append(class_dir.name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if too_small:
        shown = ", ".join(too_small[:10]) + (" ..." if len(too_small) > 10 else "")
        warnings.warn(
            f"skipped {len(too_small)} class(es) with fewer than {min_images} images: {shown}",
            stacklevel=2,
        )
    if not paths:
        loose = [p.name for p in root.iterdir() if p.is_file() and is_image_file(p.name)]
        hint = (
            " (it holds loose images; put them in one sub-folder per class)" if loose else ""
        )
        raise UserError(f"no class folders with images found in {root}{hint}")
    return ImageList(paths=paths, labels=np.asarray(labels, dtype=np.int64), class_names=class_names)


def resolve_split_dir(data_dir: str | os.PathLike, split: str) -> Path:
    """The folder of class folders for ``split`` ("train" or "val").

    ``<data_dir>/<split>`` when it exists (TinyImageNet layout). A plain folder of
    class folders (no ``train``/``val`` sub-folders) serves as the train split.
    A TinyImageNet val folder that has not been restructured yet is an error
    that says to run transform_validation.py.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    split_dir = root / split
    if split_dir.is_dir():
        if split == "val" and (split_dir / "val_annotations.txt").exists():
            raise UserError(
                f"{split_dir} is still in TinyImageNet's original layout; "
                f"run: python transform_validation.py --data-dir {root}"
            )
        return split_dir
    has_split_dirs = any((root / s).is_dir() for s in SPLITS)
    if split == "train" and not has_split_dirs:
        return root
    raise UserError(f"no '{split}' folder in {root}")


def label_from_path(path: str | os.PathLike) -> str:
    """Class name of an image from its folder (``<class>/images/x`` or ``<class>/x``)."""
    parent = Path(path).parent
    if parent.name == "images":
        parent = parent.parent
    return parent.name


# ----------------------------------------------------------------------------
# Triplet CSV
# ----------------------------------------------------------------------------


def _relative_to_csv(path: str, csv_dir: Path) -> str:
    """Path written into a CSV: relative to the CSV's folder when on the same drive."""
    try:
        return os.path.relpath(path, csv_dir)
    except ValueError:  # different drive on Windows
        return str(Path(path).resolve())


def _relative_paths(paths: Sequence[str], csv_dir: Path) -> np.ndarray:
    """object [N]: ``_relative_to_csv`` of each path, computed once per folder (relpath is slow)."""
    split = [os.path.split(os.path.abspath(p)) for p in paths]
    rel_dirs = {d: _relative_to_csv(d, csv_dir) for d in {d for d, _ in split}}
    return np.array([name if rel_dirs[d] == "." else os.path.join(rel_dirs[d], name)
                     for d, name in split], dtype=object)


def write_triplet_csv(
    csv_path: str | os.PathLike,
    query: Sequence[str],
    positive: Sequence[str],
    negative: Sequence[str],
) -> int:
    """Write triplets atomically; paths become relative to the CSV's folder.

    ``query``/``positive``/``negative`` are equal-length sequences of paths
    (absolute, or relative to the current directory). Returns the row count.
    """
    if not (len(query) == len(positive) == len(negative)):
        raise ValueError("query, positive and negative must have the same length")
    # Map each distinct path once (a query repeats num_pos * num_neg times).
    uniq, inverse = np.unique(
        np.concatenate([np.asarray(query, dtype=object), np.asarray(positive, dtype=object),
                        np.asarray(negative, dtype=object)]).astype(str),
        return_inverse=True,
    )
    return write_triplet_rows(csv_path, uniq, *inverse.reshape(3, len(query)))


def write_triplet_rows(
    csv_path: str | os.PathLike,
    paths: Sequence[str],
    query: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
) -> int:
    """Like write_triplet_csv, with rows given as int indices [R] into ``paths`` [N].

    Each path is made relative to the CSV's folder once, however many rows
    use it (the sampler's fast path). Returns the row count R.
    """
    from deepranking.cli import atomic_path

    idx = np.stack([np.asarray(query), np.asarray(positive), np.asarray(negative)]).astype(np.int64)  # [3, R]
    csv_dir = Path(csv_path).resolve().parent
    used, inverse = np.unique(idx, return_inverse=True)
    rel = _relative_paths([paths[i] for i in used], csv_dir)
    if any("," in r or '"' in r or "\n" in r for r in rel):
        raise UserError("image paths containing commas, quotes or newlines are not supported in triplet CSVs")
    n = idx.shape[1]
    cols = rel[inverse.reshape(3, n)]
    lines = map(",".join, zip(cols[0], cols[1], cols[2]))
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(",".join(TRIPLET_COLUMNS) + "\n")
            if n:
                f.write("\n".join(lines))
                f.write("\n")
    return n


def read_triplet_csv(csv_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a triplet CSV; return (query, positive, negative) arrays of absolute paths.

    Raises UserError for a missing, empty or malformed file (wrong header, wrong
    column count, empty cells). Files are not opened here; callers decode them
    up front (image_cache) and report any missing or corrupt one by path.
    """
    import pandas as pd

    csv_path = check_input_file(csv_path, "triplet CSV", allow_empty=False)
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, engine="c")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"malformed triplet CSV {csv_path}: {str(exc).strip()}")
    except pd.errors.EmptyDataError:
        raise UserError(f"triplet CSV is empty: {csv_path}")
    if tuple(df.columns) != TRIPLET_COLUMNS:
        raise UserError(
            f"triplet CSV {csv_path} must have the header 'query,positive,negative', "
            f"found {','.join(map(str, df.columns))!r}"
        )
    if len(df) == 0:
        raise UserError(f"triplet CSV has a header but no triplets: {csv_path}")
    empty = (df == "").any(axis=1).to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0]) + 2  # 1-based, after the header
        raise UserError(f"malformed triplet CSV {csv_path}: empty cell on line {row}")
    base = csv_path.resolve().parent
    out = []
    for col in TRIPLET_COLUMNS:
        values = df[col].to_numpy(dtype=object)
        uniq, inverse = np.unique(values.astype(str), return_inverse=True)
        resolved = np.array([os.path.normpath(os.path.join(base, p)) for p in uniq], dtype=object)
        out.append(resolved[inverse])
    return out[0], out[1], out[2]


# ----------------------------------------------------------------------------
# Training data: triplets over the cached images
# ----------------------------------------------------------------------------


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes (a resumed run must train on the very same triplet CSV)."""
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class TripletData:
    """The training input: unique image paths [N] and triplets as indices into them.

    train: int64 [T, 3] (query, positive, negative); val: [V, 3] or None;
    fingerprint: {"triplets": sha1, "val_triplets": sha1 or None} of the CSVs read.
    """

    paths: np.ndarray
    train: np.ndarray
    val: np.ndarray | None
    fingerprint: dict


def split_by_query(trip: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) [T]: a seeded ``fraction`` of the query images goes to val."""
    queries = np.unique(trip[:, 0])
    n_val = max(1, int(round(fraction * len(queries))))
    held = np.random.default_rng([seed, 7919]).choice(queries, size=n_val, replace=False)
    val = np.isin(trip[:, 0], held)
    if val.all():
        raise UserError(f"--val-fraction {fraction} leaves no training triplets")
    return ~val, val


def load_triplet_data(train_csv: Path, val_csv: Path | None, val_fraction: float, seed: int) -> TripletData:
    """Read the CSV(s) once; ``val_fraction`` > 0 holds out queries of the training CSV instead."""
    train_cols = read_triplet_csv(train_csv)
    val_cols = read_triplet_csv(val_csv) if val_csv is not None else None
    all_paths = np.concatenate(list(train_cols) + (list(val_cols) if val_cols is not None else []))
    paths, inverse = np.unique(all_paths.astype(str), return_inverse=True)
    t = len(train_cols[0])
    train = inverse[:3 * t].reshape(3, t).T.copy()
    val = inverse[3 * t:].reshape(3, -1).T.copy() if val_cols is not None else None
    if val_fraction > 0:
        keep, held = split_by_query(train, val_fraction, seed)
        train, val = train[keep], train[held]
    fingerprint = {"triplets": file_fingerprint(train_csv),
                   "val_triplets": file_fingerprint(val_csv) if val_csv is not None else None}
    return TripletData(paths, train, val, fingerprint)


def label_ids(paths: Sequence[str]) -> tuple[np.ndarray, int]:
    """Integer class id [N] of each image path from its folder name, and the number of classes."""
    names = np.array([label_from_path(p) for p in paths])
    uniq, ids = np.unique(names, return_inverse=True)
    return ids.astype(np.int64), len(uniq)


def check_labels_usable(trip: np.ndarray, labels: np.ndarray, n_classes: int, min_fit: float = 0.9) -> None:
    """Mining and the class loss need folder classes: q and p share one and n does not, for ``min_fit`` of the rows."""
    lq, lp, ln = labels[trip[:, 0]], labels[trip[:, 1]], labels[trip[:, 2]]
    fit = float(((lq == lp) & (lq != ln)).mean())
    if n_classes < 2 or fit < min_fit:
        raise UserError("--mining and --id-loss-weight need class labels from folder names; this CSV has none "
                        f"({n_classes} folder(s), {fit:.0%} of triplets fit them) — use --mining none "
                        "--id-loss-weight 0")


def epoch_batches(n_triplets: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> list[np.ndarray]:
    """This rank's batches of triplet indices for ``epoch``: a seeded permutation cut into batches.

    The last batch may be partial (it is trained, not dropped). Every rank sees
    the same global order and takes every ``world``-th batch; the first batches
    are repeated to give all ranks the same step count (DDP syncs every step).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n_triplets)
    batches = [perm[i:i + batch_size] for i in range(0, n_triplets, batch_size)]
    batches += batches[:(-len(batches)) % world]
    return batches[rank::world]


class EpochBatchSampler:
    """Yields this rank's batches (arrays of triplet indices) of the current epoch, minus ``skip`` done ones.

    Iterated in the main process, so ``set_epoch`` works with persistent workers.
    """

    def __init__(self, n_triplets: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.args = (n_triplets, batch_size, seed)
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def batches(self) -> list[np.ndarray]:
        n, b, seed = self.args
        return epoch_batches(n, b, seed, self.epoch, self.rank, self.world)[self.skip:]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class TripletImages:
    """dataset[batch] = (uint8 images [3b, H, W, 3]: queries, positives, negatives; their image ids [3b]).

    ``images`` is the memory-mapped cache [N, H, W, 3]; workers only gather rows, so no
    image is decoded during training. A worker never receives the cache itself: pickling
    (the spawn and forkserver start methods) sends the file's path and shape, and the
    worker maps the file again on first use (a pickled memmap would be a full copy).
    """

    def __init__(self, images: np.ndarray, triplets: np.ndarray):
        self.triplets = triplets  # [T, 3]
        self._rows = images  # [N, H, W, 3]
        self._file = getattr(images, "filename", None) if isinstance(images, np.memmap) else None
        self._shape = tuple(images.shape)
        self._offset = int(getattr(images, "offset", 0) or 0)

    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.memmap(self._file, dtype=np.uint8, mode="r", shape=self._shape, offset=self._offset)
        return self._rows

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._file is not None:
            state["_rows"] = None  # reopened by path in the worker
        return state

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, batch: np.ndarray) -> tuple:
        import torch

        order = self.triplets[batch].T.reshape(-1)  # [3b]: queries, then positives, then negatives
        return torch.from_numpy(np.ascontiguousarray(self.rows()[order])), torch.from_numpy(order)

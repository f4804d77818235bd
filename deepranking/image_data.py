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
from PIL import Image, UnidentifiedImageError

from deepranking.cli import UserError, check_input_file

# Lower-case extensions; matching is case-insensitive (TinyImageNet uses .JPEG).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
TRIPLET_COLUMNS = ("query", "positive", "negative")
SPLITS = ("train", "val")


class UnreadableImageError(UserError):
    """An image file that PIL cannot decode; the message names the path."""


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


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB (grey, palette, RGBA and CMYK included).

    Raises UnreadableImageError naming the path if the file cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "RGB":
                return im.copy()
            if im.mode in ("P", "LA", "PA") or (im.mode == "RGBA"):
                # Composite transparency on white rather than on black garbage.
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImageError(f"image not found: {path}")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImageError(f"cannot read image {path}: {exc}")


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

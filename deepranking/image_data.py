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
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


from deepranking.cli import UserError
from deepranking.file_io import check_input_file, first_long_row

# Lower-case extensions; matching is case-insensitive (TinyImageNet uses .JPEG).
# Formats every Pillow build reads (a bad file among them is reported when decoded):
_CORE_IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
# Photo formats that only some Pillow builds (or plugins) read. They are listed too, so that
# list_class_folder refuses them by path when this Pillow has no reader, instead of dropping them.
_PLUGIN_IMAGE_EXTENSIONS = frozenset(
    {".jfif", ".jpe", ".pnm", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k"}
)
IMAGE_EXTENSIONS = _CORE_IMAGE_EXTENSIONS | _PLUGIN_IMAGE_EXTENSIONS
# Paths shown in a listing error.
_MAX_LISTED = 10
TRIPLET_COLUMNS = ("query", "positive", "negative")
SPLITS = ("train", "val")


def is_image_file(name: str | os.PathLike) -> bool:
    """True if the name has an image extension (``IMAGE_EXTENSIONS``, any case)."""
    return Path(os.fsdecode(name)).suffix.lower() in IMAGE_EXTENSIONS


def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` for a message: bytes that are not valid UTF-8 shown as ``\\xff`` escapes.

    On Linux a file name that is not UTF-8 arrives as a str with lone surrogates
    (``os.listdir`` decodes with ``surrogateescape``); printed as it is, it raises
    UnicodeEncodeError. Valid non-ASCII characters are kept.
    """
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _pillow_reads(ext: str) -> bool:
    """True if this Pillow (with the plugins registered so far) has a reader for ``ext`` files."""
    if ext in _CORE_IMAGE_EXTENSIONS:
        return True
    from PIL import Image

    return Image.registered_extensions().get(ext) in Image.OPEN


def _shown_paths(paths: Sequence[str]) -> str:
    shown = "\n  ".join(display_path(p) for p in paths[:_MAX_LISTED])
    more = f"\n  ... and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


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


def not_regular(path: str | os.PathLike) -> str | None:
    """What an image path is when it is no regular file ("a FIFO", "a socket", ...),
    links followed; None for a regular file, and for a missing file or dangling link (the stage
    that decodes it reports it as missing). Only stat is called: nothing is opened."""
    from deepranking.file_io import special_file_kind

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else special_file_kind(mode)


def regular_images(paths: Sequence[str], where: str) -> list[str]:
    """``paths`` less those that are no regular file (a FIFO, a socket, a device: reading one would
    block forever or never end), which are named in one warning and never opened."""
    kinds = [not_regular(p) for p in paths]
    warn_not_regular([(p, k) for p, k in zip(paths, kinds) if k is not None], where)
    return [p for p, k in zip(paths, kinds) if k is None]


def warn_not_regular(skipped: Sequence[tuple[str, str]], where: str) -> None:
    """One warning naming the (path, what it is) entries named like images that were skipped unread."""
    from deepranking.cli import warn

    if skipped:
        shown = ", ".join(f"{display_path(p)} ({kind})" for p, kind in skipped[:_MAX_LISTED])
        more = f" and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
        warn(f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} in {where} named like an image but "
             f"not a regular file (never opened): {shown}{more}")


def _image_names(folder: Path, skipped: list | None = None) -> list[str]:
    """Image files in ``folder``: regular files, links to one, and dangling links (the image cache then
    reports those as missing). Other entries named like images (a FIFO, a socket, a device) go to
    ``skipped`` as (path, what it is), never opened."""
    names = []
    with os.scandir(folder) as entries:
        for e in entries:
            if not is_image_file(e.name) or e.is_dir():
                continue
            kind = None if e.is_file() else not_regular(e.path)  # None: a regular file or a dangling link
            if kind is None:
                names.append(e.name)
            elif skipped is not None:
                skipped.append((e.path, kind))
    return sorted(names)


def _images_below(folder: Path, skip: str | None = None) -> int:
    """How many image files lie in the sub-folders of ``folder`` (any depth; ``skip``: one not counted)."""
    with os.scandir(folder) as entries:
        subs = [e.path for e in entries if e.is_dir(follow_symlinks=False) and e.name != skip]
    return sum(is_image_file(name) for sub in subs for _, _, names in os.walk(sub) for name in names)


def _class_images(class_dir: Path, skipped: list) -> tuple[list[str], int, int]:
    """Image files of one class folder: ``<class>/images/*`` if present, else ``<class>/*``;
    and how many image files that leaves out beside ``images/`` and in deeper sub-folders
    (for warnings: a class is read from one folder, not recursively). Entries of the folder
    read that are named like images but are no regular file are added to ``skipped``."""
    images_dir = class_dir / "images"
    if not images_dir.is_dir():
        return [str(class_dir / n) for n in _image_names(class_dir, skipped)], 0, _images_below(class_dir)
    nested = _images_below(class_dir, skip="images") + _images_below(images_dir)
    return [str(images_dir / n) for n in _image_names(images_dir, skipped)], len(_image_names(class_dir)), nested


def list_class_folder(root: str | os.PathLike, min_images: int = 1) -> ImageList:
    """List a folder of class folders.

    Classes with fewer than ``min_images`` images are skipped with one warning
    naming them, and so are class folders with no image file (``cli.warn``), and
    entries named like images that are no regular file (a FIFO: never opened).
    Raises UserError, naming the files, if the folder is missing or holds no
    images, if some image files are in a format this Pillow cannot read
    (``.heic`` without a plugin, ...), or if some paths are not valid UTF-8
    (the triplet CSV and embedding files that hold them are UTF-8 text).
    """
    root = Path(root).resolve()
    if not root.exists():
        raise UserError(f"dataset folder not found: {display_path(root)}")
    if not root.is_dir():
        raise UserError(f"dataset folder is a file, not a folder: {display_path(root)}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    class_names: list[str] = []
    too_small: list[str] = []
    empty: list[str] = []
    beside: list[str] = []  # classes with images left out next to their images/ folder
    nested: list[str] = []  # classes with images left out in sub-folders
    not_files: list[tuple[str, str]] = []  # (path, what it is): named like an image, but no regular file
    for class_dir in class_dirs:
        files, left_out, below = _class_images(class_dir, not_files)
        if left_out:
            beside.append(f"{display_path(class_dir.name)} ({left_out})")
        if below:
            nested.append(f"{display_path(class_dir.name)} ({below})")
        if not files:
            empty.append(display_path(class_dir.name))
            continue
        if len(files) < min_images:
            too_small.append(f"{display_path(class_dir.name)} ({len(files)})")
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
        raise UserError(f"no class folders with images found in {display_path(root)}{hint}")
    _warn_left_out(root, beside, nested, empty, not_files)
    _check_listed(root, paths)
    return ImageList(paths=paths, labels=np.asarray(labels, dtype=np.int64), class_names=class_names)


def _warn_left_out(root: Path, beside: list[str], nested: list[str], empty: list[str],
                   not_files: list[tuple[str, str]]) -> None:
    """list_class_folder's warnings about what it did not list (each names up to 10)."""
    from deepranking.cli import warn

    def shown(items: list[str]) -> str:
        return ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")

    if beside:
        warn(f"left out the image files beside the images/ folder of {len(beside)} class(es) (a class with an "
             f"images/ folder is read from it alone, as in TinyImageNet): {shown(beside)}")
    if nested:
        warn(f"left out the image files in sub-folders of {len(nested)} class(es) (a class is read from its own "
             f"folder, or its images/ folder, not from folders below; move them up to include them): "
             f"{shown(nested)}")
    if empty:
        warn(f"skipped {len(empty)} class folder(s) with no image files in {display_path(root)}: {shown(empty)}")
    warn_not_regular(not_files, display_path(root))


def _check_listed(root: Path, paths: list[str]) -> None:
    """UserError naming the listed files no later stage could use (before any work starts)."""
    bad = [p for p in paths if not _is_utf8(p)]  # class names are part of the paths
    if bad:
        raise UserError(
            f"{len(bad)} image path(s) in {display_path(root)} are not valid UTF-8 and cannot be "
            f"written to the UTF-8 triplet CSV and embedding files; rename them "
            f"(e.g. convmv -f latin1 -t utf8 -r --notest <folder>):{_shown_paths(bad)}")
    exts = {os.path.splitext(p)[1].lower() for p in paths}
    no_reader = sorted(e for e in exts if not _pillow_reads(e))
    if no_reader:
        bad = [p for p in paths if os.path.splitext(p)[1].lower() in no_reader]
        raise UserError(
            f"{len(bad)} image file(s) in {display_path(root)} cannot be read: this Pillow has no "
            f"reader for {', '.join(no_reader)} files (convert them to JPEG or PNG, or remove "
            f"them):{_shown_paths(bad)}")


def image_stamps(paths: Sequence[str]) -> np.ndarray:
    """int64 [N, 2]: (size in bytes, modification time in ns) of each image — how a database
    update (update_database.py) tells a changed image from an unchanged one."""
    out = np.empty((len(paths), 2), dtype=np.int64)
    for i, p in enumerate(paths):
        st = os.stat(p)
        out[i] = (st.st_size, st.st_mtime_ns)
    return out


def has_val_split(train_dir: str | os.PathLike | None) -> bool | None:
    """Whether the dataset whose train split is the class folder ``train_dir`` (as resolve_split_dir
    gives it, and embedding files record it) has a val split beside it, as TinyImageNet's layout
    does; a plain folder of class folders has none. None when ``train_dir`` is unknown or gone."""
    if train_dir is None or not Path(train_dir).is_dir():
        return None
    train_dir = Path(train_dir)
    return train_dir.name == "train" and (train_dir.parent / "val").is_dir()


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
        raise UserError(f"dataset folder {'is a file, not a folder' if root.exists() else 'not found'}: {root}")
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
# Held-out images (--val-fraction)
# ----------------------------------------------------------------------------

HELDOUT_KEEP = 2  # images of each class never held out: a query and its positive stay in training
# The rule as the --val-fraction help texts state it (heldout_images is its one implementation).
HELDOUT_RULE = (f"an image is held out when the SHA-1 of '<class folder>/<file name>' (first 8 bytes, read as a "
                f"fraction of 2**64) is below the fraction; each class of more than {HELDOUT_KEEP} images gives at "
                f"least 1 and keeps at least {HELDOUT_KEEP}; so the same images are held out whatever the program, "
                f"--seed or data folder")


def _class_and_key(path: str | os.PathLike) -> tuple[str, str]:
    absolute = os.path.abspath(os.fsdecode(path))
    label = label_from_path(absolute)
    return label, f"{label}/{os.path.basename(absolute)}"


def image_key(path: str | os.PathLike) -> str:
    """The name an image is held out by: ``<class>/<file name>`` (class: :func:`label_from_path` of
    the absolute path), the same for a relative or absolute spelling and wherever the data lies."""
    return _class_and_key(path)[1]


def _key_number(key: str) -> int:
    """The first 8 bytes of SHA-1(key) as a big-endian integer in [0, 2**64)."""
    import hashlib

    return int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")


def heldout_images(paths: Sequence[str | os.PathLike], fraction: float) -> np.ndarray:
    """bool [N]: which of the distinct images ``paths`` are held out for validation (``--val-fraction``).

    The one rule of every program (triplet_sampler.py, train_net.py, import_triplets.py):
    with h = the first 8 bytes of SHA-1(:func:`image_key`) / 2**64, an image is held out
    when h < ``fraction``, so each image is decided by its own name, not by a seed, its
    position or which other images a program sees. Within each class (by
    :func:`label_from_path`), at most n - HELDOUT_KEEP images are held out (a class of
    HELDOUT_KEEP or fewer gives none) and, when ``fraction`` > 0, at least 1: the
    lowest-h images where the threshold gives too few, the highest-h ones kept back
    where it gives too many. About ``fraction`` of each class's images result.
    """
    held = np.zeros(len(paths), dtype=bool)
    if fraction <= 0:
        return held
    keys, by_class = [], {}
    for i, p in enumerate(paths):
        label, key = _class_and_key(p)
        keys.append(key)
        by_class.setdefault(label, []).append(i)
    numbers = [_key_number(k) for k in keys]
    limit = fraction * 2.0 ** 64  # int < float compares exactly
    for rows in by_class.values():
        most = len(rows) - HELDOUT_KEEP
        if most < 1:
            continue
        below = sum(numbers[i] < limit for i in rows)
        first = sorted(rows, key=lambda i: (numbers[i], keys[i], i))[:min(max(below, 1), most)]
        held[first] = True
    return held


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
    """Like write_triplet_csv, with rows given as int indices [R] into ``paths`` [N]. Returns R."""
    return write_triplet_files(paths, [(csv_path, query, positive, negative)])[0]


def write_triplet_files(paths: Sequence[str], files: Sequence[tuple]) -> list[int]:
    """Triplet CSVs that belong together (a main CSV and its held-out one), all or none.

    ``files``: (csv path, query, positive, negative) with int indices [R] into ``paths`` [N].
    Every file's rows are checked before any is written, then they are written to temporary
    names and renamed together (file_io.atomic_paths): a path no CSV can hold leaves the earlier
    pair as it was, never a new main CSV beside an old held-out one. Each path is made
    relative to its CSV's folder once, however many rows use it. Returns the row counts.
    """
    from deepranking.file_io import atomic_paths

    texts = []
    for csv_path, query, positive, negative in files:
        idx = np.stack([np.asarray(query), np.asarray(positive), np.asarray(negative)]).astype(np.int64)  # [3, R]
        used, inverse = np.unique(idx, return_inverse=True)
        rel = _relative_paths([paths[i] for i in used], Path(csv_path).resolve().parent)
        if any("," in r or '"' in r or "\n" in r for r in rel):
            raise UserError("image paths containing commas, quotes or newlines are not supported in triplet CSVs")
        cols = rel[inverse.reshape(3, idx.shape[1])]
        rows = "".join(f"{line}\n" for line in map(",".join, zip(cols[0], cols[1], cols[2])))
        texts.append((rows, idx.shape[1]))  # the header is written apart: no second copy of the rows
    with atomic_paths([f[0] for f in files]) as tmps:
        for tmp, (rows, _) in zip(tmps, texts):
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(",".join(TRIPLET_COLUMNS) + "\n")
                f.write(rows)
    return [n for _, n in texts]


def read_triplet_csv(csv_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a triplet CSV; return (query, positive, negative) arrays of absolute paths.

    Raises UserError for a missing, empty or malformed file (wrong header, wrong
    column count, empty cells). Files are not opened here; callers decode them
    up front (image_cache) and report any missing or corrupt one by path.
    """
    import pandas as pd

    csv_path = check_input_file(csv_path, "triplet CSV", allow_empty=False)
    try:
        with warnings.catch_warnings():
            # index_col=False: every row longer than the header would otherwise make pandas
            # take its first column as the index and shift the rest into query/positive/negative
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, engine="c", index_col=False)
    except pd.errors.ParserWarning:
        raise UserError(f"malformed triplet CSV {csv_path}: line {first_long_row(csv_path, len(TRIPLET_COLUMNS))} has more "
                        f"fields than the header's {len(TRIPLET_COLUMNS)} (query,positive,negative)")
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
    for col, what in ((1, "positive"), (2, "negative")):
        # D(q, q) = 0: a positive that is the query is "ranked right" by any model, a negative that is
        # the query by none, so validation accuracy would count them as 1 or 0 whatever was learnt
        same = out[0] == out[col]
        if same.any():
            raise UserError(f"triplet CSV {csv_path}: {int(same.sum())} triplet(s) use the query image as its own "
                            f"{what}, the first on line {int(np.flatnonzero(same)[0]) + 2}; such a triplet "
                            f"measures and teaches nothing: sample the CSV again (triplet_sampler.py never does this)")
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


def split_by_query(trip: np.ndarray, paths: Sequence[str], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) [T] of triplets [T, 3] of indices into ``paths``: the query images
    that :func:`heldout_images` holds out (among the distinct query images); val = the triplets
    they are the query of; train = the triplets that use none of them in any role, so validation
    scores queries training never saw (as triplet_sampler.py --val-fraction). The triplets left
    out of both are counted in a warning; val may be empty (a caller's decision)."""
    from deepranking.cli import warn

    queries = np.unique(trip[:, 0])
    held = queries[heldout_images([paths[i] for i in queries], fraction)]
    val = np.isin(trip[:, 0], held)
    train = ~np.isin(trip, held).any(axis=1)
    if not train.any():
        raise UserError(f"--val-fraction {fraction} leaves no training triplets (every triplet uses a held-out "
                        f"query image); use a smaller fraction")
    unused = int((~train & ~val).sum())
    if unused:
        warn(f"--val-fraction: {unused} of {len(trip)} training triplets use a held-out query image as positive "
             f"or negative and are left out of training, so validation never scores an image training saw")
    return train, val


def load_triplet_data(train_csv: Path, val_csv: Path | None, val_fraction: float) -> TripletData:
    """Read the CSV(s) once; ``val_fraction`` > 0 holds out queries of the training CSV instead
    (:func:`split_by_query`)."""
    train_cols = read_triplet_csv(train_csv)
    val_cols = read_triplet_csv(val_csv) if val_csv is not None else None
    all_paths = np.concatenate(list(train_cols) + (list(val_cols) if val_cols is not None else []))
    # np.unique's sorted unique paths and inverse, from the Python strings: np.unique itself works on a
    # fixed-width copy, 4 bytes x the longest path for every cell, sorted copies on top (5 GB of peak
    # memory for a million triplets); this holds one fixed-width array of the unique paths.
    unique = sorted(set(all_paths.tolist()))
    row = {p: i for i, p in enumerate(unique)}
    inverse = np.fromiter((row[p] for p in all_paths.tolist()), dtype=np.intp, count=len(all_paths))
    paths = np.array(unique, dtype=str)
    del row
    t = len(train_cols[0])
    train = inverse[:3 * t].reshape(3, t).T.copy()
    val = inverse[3 * t:].reshape(3, -1).T.copy() if val_cols is not None else None
    if val_fraction > 0:
        keep, held = split_by_query(train, paths, val_fraction)
        if not held.any():
            raise UserError(f"--val-fraction {val_fraction} holds out no query image of {train_csv}: every class "
                            f"keeps at least {HELDOUT_KEEP} of its query images, and none has more; give a "
                            f"validation CSV with --val-triplets")
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
    total = -(-len(batches) // world) * world  # cyclic padding: even 2 batches fill 8 ranks
    batches = [batches[i % len(batches)] for i in range(total)]
    return batches[rank::world]


def worker_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: a terminal's Ctrl-C is for the main process (it stops after the step,
    with a checkpoint); a worker killed by it would end the run with "worker exited unexpectedly".
    SIGTERM is left to torch, which gives every worker its own handler (a clean exit when the
    main process ends its workers) before this function runs."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


class CachedImageRows:
    """The decoded-image cache [N, H, W, 3] of a training dataset, pickled by path.

    A worker never receives the cache itself: pickling (the spawn and forkserver start
    methods) sends the memmap's file, shape and offset, and :meth:`rows` maps the file
    again on first use (a pickled memmap would be a full copy). An in-memory array
    (not a memmap) is pickled as it is.
    """

    def __init__(self, images: np.ndarray):
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


class TripletImages(CachedImageRows):
    """dataset[batch] = (uint8 images [3b, H, W, 3]: queries, positives, negatives; their image ids [3b]).

    ``images`` is the memory-mapped cache [N, H, W, 3]; workers only gather rows, so no
    image is decoded during training; it is pickled by path (:class:`CachedImageRows`).
    """

    def __init__(self, images: np.ndarray, triplets: np.ndarray):
        self.triplets = triplets  # [T, 3]
        super().__init__(images)

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, batch: np.ndarray) -> tuple:
        import torch

        order = self.triplets[batch].T.reshape(-1)  # [3b]: queries, then positives, then negatives
        return torch.from_numpy(np.ascontiguousarray(self.rows()[order])), torch.from_numpy(order)


# ----------------------------------------------------------------------------
# Class-balanced batches: P classes x K images
# ----------------------------------------------------------------------------


class TooFewClassesError(UserError, ValueError):
    """PK batches asked for more classes than the images have (a UserError: the CLI prints one line)."""


def _class_chunks(rng: np.random.Generator, members: np.ndarray, k: int) -> np.ndarray:
    """One class's images cut into chunks of ``k`` [m, k], in a random order.

    Every image is in a chunk. A partial last chunk is filled with other images of
    the class (drawn without replacement, so no chunk repeats an image); a class
    with fewer than ``k`` images gives one chunk: all of them, plus ``k - n``
    drawn again with replacement.
    """
    n = len(members)
    perm = rng.permutation(members)
    if n < k:
        return np.concatenate([perm, rng.choice(members, k - n, replace=True)])[None, :]
    r = n % k
    if r:
        perm = np.concatenate([perm, rng.choice(perm[:n - r], k - r, replace=False)])
    return perm.reshape(-1, k)


def pk_batches(labels: np.ndarray, p: int, k: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
               images: np.ndarray | None = None) -> list[np.ndarray]:
    """This rank's P x K batches of IMAGE indices for ``epoch`` (int64 [p * k] each: K images of class 1, ...).

    ``labels`` [N]: class id of each image; ``images``: the image ids to draw from
    (default all N; e.g. only the training images of the triplet CSV).

    An epoch cuts every class into chunks of K images (``_class_chunks``) and deals
    them out, P chunks of P different classes per batch, ``B = ceil(sum_c
    ceil(n_c / K) / P)`` batches rounded up to a multiple of ``world`` (about N / (P K)).
    Classes are drawn with probability proportional to their chunks left, and a
    class with as many chunks left as batches is always drawn, so every chunk,
    hence every image, is used once per epoch, unless one class holds more than
    1/P of the chunks (then its surplus, other images each epoch, waits for the
    next epoch). When fewer than P classes have chunks left (the last batches),
    classes already dealt out are drawn again with fresh chunks. Classes with
    fewer than K images repeat images inside their chunk (with replacement).

    Seeded by (seed, epoch): every rank builds the same global list and takes
    every ``world``-th batch, so ranks have the same step count and disjoint batches.
    """
    p, k, world = int(p), int(k), int(world)
    if p < 1 or k < 1:
        raise ValueError(f"PK batches need P >= 1 and K >= 1, got P={p}, K={k}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    classes, members = _class_members(labels, images, p)
    rng = np.random.default_rng([seed, epoch, 0x504B])  # "PK": its own stream, apart from epoch_batches'
    chunks = [_class_chunks(rng, m, k) for m in members]  # [C] arrays [m_c, k]
    used = np.zeros(len(classes), dtype=np.int64)
    left = np.array([len(c) for c in chunks], dtype=np.int64)
    n_batches = -(-int(left.sum()) // p)
    n_batches += (-n_batches) % world
    batches = []
    for b in range(n_batches):
        rounds = n_batches - b  # batches still to deal, this one included
        if (left > 0).sum() < p:  # refill: fresh chunks for classes already dealt out, picked at random
            empty = np.flatnonzero(left == 0)
            for c in rng.choice(empty, p - int((left > 0).sum()), replace=False):
                chunks[c], used[c] = _class_chunks(rng, members[c], k), 0
                left[c] = len(chunks[c])
        u = 1.0 - rng.random(len(classes))  # (0, 1]
        # Efraimidis-Spirakis keys: the top P are a draw proportional to the chunks left; classes that
        # must be drawn in every remaining batch to be dealt out come first (random among themselves).
        key = np.where(left > 0, np.log(u) / np.maximum(left, 1), -np.inf)
        key = np.where(left >= rounds, 1.0 + u, key)
        top = np.argpartition(-key, p - 1)[:p]
        top = top[np.argsort(-key[top], kind="stable")]
        batches.append(np.concatenate([chunks[c][used[c]] for c in top]))
        used[top] += 1
        left[top] -= 1
    return batches[rank::world]


def _class_members(labels: np.ndarray, images: np.ndarray | None, p: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(class ids [C], the image ids of each class [C arrays]) of ``images`` (default all), in id order;
    TooFewClassesError when fewer than ``p`` classes are there."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    ids = np.arange(len(labels), dtype=np.int64) if images is None else np.unique(np.asarray(images, dtype=np.int64))
    classes, inverse = np.unique(labels[ids], return_inverse=True)
    if len(classes) < p:
        raise TooFewClassesError(f"P x K batches need at least P={p} classes, but the training images have "
                                 f"{len(classes)}; use fewer classes per batch (--pk-classes)")
    order = np.argsort(inverse, kind="stable")
    return classes, np.split(ids[order], np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1])


class PKBatchSampler:
    """Yields this rank's P x K batches (int64 arrays of IMAGE indices, [P*K]) of the current epoch,
    minus ``skip`` done ones; the interface of :class:`EpochBatchSampler` (see :func:`pk_batches`).

    ``labels`` [N]: class id of every image (``label_ids``); ``images``: the image ids to
    draw from (default all). Raises TooFewClassesError (a ValueError and UserError)
    when the images have fewer than ``p`` classes.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int, rank: int = 0, world: int = 1,
                 images: np.ndarray | None = None):
        self.labels = np.asarray(labels)
        self.images = None if images is None else np.asarray(images, dtype=np.int64)
        self.p, self.k, self.seed = int(p), int(k), seed
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0
        self._cache: tuple[int, list[np.ndarray]] | None = None
        self._epoch_batches()  # fail now (too few classes, bad P/K/rank), not at the first epoch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _epoch_batches(self) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, pk_batches(self.labels, self.p, self.k, self.seed, self.epoch, self.rank,
                                                  self.world, self.images))
        return self._cache[1]

    def batches(self) -> list[np.ndarray]:
        return self._epoch_batches()[self.skip:]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}  # a worker rebuilds the epoch it needs


class PKImages(CachedImageRows):
    """dataset[batch] = (uint8 images [P*K, H, W, 3], their image ids [P*K]) for a batch of image indices.

    ``images`` is the memory-mapped cache [N, H, W, 3]; like :class:`TripletImages` it is
    pickled by path (workers map the file again) and only gathers rows.
    """

    def __len__(self) -> int:
        return self._shape[0]

    def __getitem__(self, batch: np.ndarray) -> tuple:
        import torch

        order = np.asarray(batch, dtype=np.int64)  # [P*K]
        return torch.from_numpy(np.ascontiguousarray(self.rows()[order])), torch.from_numpy(order)


# ----------------------------------------------------------------------------
# Human-readable class names (TinyImageNet's words.txt)
# ----------------------------------------------------------------------------

WORDS_FILE = "words.txt"
_WORDS_SEARCH_DEPTH = 5  # .../ROOT/train/<wnid>/images/<file>: words.txt is 4 folders up


def read_class_names(path: str | os.PathLike, wanted=None) -> dict[str, str]:
    """``wnid -> name`` from a words.txt (lines ``wnid<TAB>name1, name2, ...``): the first synonym.

    ``wanted``: keep only these ids (TinyImageNet's words.txt lists all 82,115 ImageNet ids).
    Blank lines are skipped; a line without a TAB is a UserError naming the file and line.
    """
    path = check_input_file(path, "class-names file (words.txt)")
    keep = None if wanted is None else {str(w) for w in wanted}
    names: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM (Windows editors) is not part of an id
    except UnicodeDecodeError as exc:
        raise UserError(f"class-names file {display_path(path)} is not UTF-8 text ({exc.reason})")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        wnid, tab, rest = line.partition("\t")
        if not tab or not wnid.strip():
            raise UserError(f"{display_path(path)} line {number}: expected 'id<TAB>name, synonym, ...', got {line[:60]!r}")
        wnid = wnid.strip()
        if keep is not None and wnid not in keep:
            continue
        first = rest.split(",")[0].strip()
        if first:
            names[wnid] = first
    return names


def find_dataset_file(image_paths: Sequence[str], name: str) -> Path | None:
    """A dataset-wide file (words.txt, hierarchy.csv) in the folders above the first image (up to 5 levels)."""
    if not len(image_paths):
        return None
    folder = Path(image_paths[0]).parent
    for _ in range(_WORDS_SEARCH_DEPTH):
        candidate = folder / name
        if candidate.is_file():
            return candidate
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


HIERARCHY_FILE = "hierarchy.csv"  # class,parent: graded relevance in eval.py (same class > same parent > other)


def read_class_hierarchy(path: str | os.PathLike) -> dict[str, str]:
    """``class id -> parent`` from a CSV with the header ``class,parent`` (one row per class).

    The class ids are the class folder names (TinyImageNet's wnids); a parent is any text naming
    a group of classes (``Coat`` for ``Coat hue 036``, a WordNet hypernym for a wnid). A missing
    header, an empty field, a row of other than two fields or a class given twice is a UserError
    naming the file and line.
    """
    import csv

    path = check_input_file(path, "class hierarchy file")
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except UnicodeDecodeError as exc:
        raise UserError(f"class hierarchy file {display_path(path)} is not UTF-8 text ({exc.reason})")
    if not rows or [c.strip() for c in rows[0]] != ["class", "parent"]:
        raise UserError(f"class hierarchy file {display_path(path)} must start with the header 'class,parent'")
    parents: dict[str, str] = {}
    for number, row in enumerate(rows[1:], 2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"{display_path(path)} line {number}: expected 'class,parent', got {','.join(row)[:60]!r}")
        cls, parent = row[0].strip(), row[1].strip()
        if cls in parents:
            raise UserError(f"{display_path(path)} line {number}: class {cls!r} is listed twice")
        parents[cls] = parent
    if not parents:
        raise UserError(f"class hierarchy file {display_path(path)} lists no class")
    return parents


def display_name(label, names: dict[str, str]) -> str:
    """The human name of a class id when ``names`` has one, else the id itself."""
    return names.get(str(label), str(label))

"""Embedding files: one self-describing format read and written by every stage.

Text (any name not ending ``.npy``/``.npz``; ``.txt`` by convention) — UTF-8 CSV::

    path,label,e0,e1,...,e{d-1}
    train/n01443537/images/n01443537_0.JPEG,n01443537,0.0123456789,-0.00456123443,...

* ``path`` is relative to the embedding file's own folder (absolute when it lives
  on another drive); :func:`read_embeddings` returns absolute paths.
* ``label`` is the class name, quoted by CSV rules when it holds a comma or a quote.
  Paths and labels may not contain newlines (refused on write).
* then d values, each written as ``'%.9g' % value`` — 9 significant digits, enough
  for every float32 to round-trip exactly. d is read from the header.

Binary companions (same information, ~3x smaller, ~50x faster):

* ``*.npz`` — one ``np.savez`` file with arrays ``emb`` (float32 [N, d]), ``paths``
  (str, relative as above), ``labels`` (str), ``format`` and ``version``.
* ``*.npy`` — the float32 [N, d] matrix, plus a sidecar ``<name>.npy.meta.csv``
  holding ``path,label`` rows.

Speed: text is formatted by a vectorised, exact re-implementation of ``'%.9g'``
(integer arithmetic on the float32 bits, see :func:`format_values`) and parsed with
the pandas C engine, both split over a thread pool (numpy and the pandas parser
release the GIL). See ``bench/bench_embedding_io.py``.
"""

from __future__ import annotations

import csv
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cli_utils import UserError, atomic_path

FORMAT_NAME = "deep-ranking-embeddings"
FORMAT_VERSION = 1
META_SUFFIX = ".meta.csv"  # sidecar of a .npy file: "<name>.npy.meta.csv"

# Rows per formatting / parsing task: big enough to amortise numpy call overhead,
# small enough to keep temporaries (~40 bytes per value) at a few hundred MB.
_WRITE_ROWS_PER_TASK = 256
_READ_BYTES_PER_TASK = 32 << 20
# Below this many values a thread pool costs more than it saves.
_PARALLEL_MIN_VALUES = 2_000_000


@dataclass
class Embeddings:
    """Contents of an embedding file.

    paths: absolute image paths, length N
    labels: object array [N] of class-name strings
    emb: float32 [N, d]
    """

    paths: list[str]
    labels: np.ndarray
    emb: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])


def file_kind(path: str | os.PathLike) -> str:
    """"npz", "npy" or "text", from the file name."""
    name = str(path).lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".npy"):
        return "npy"
    return "text"


def meta_path(npy_path: str | os.PathLike) -> Path:
    """The ``path,label`` sidecar of a ``.npy`` embedding file."""
    return Path(str(npy_path) + META_SUFFIX)


# ----------------------------------------------------------------------------
# Exact vectorised '%.9g'
# ----------------------------------------------------------------------------

_POW5 = np.array([5**i for i in range(17)], dtype=np.int64)
# "0000".."9999" as [10000, 4] ASCII digits, and the trailing-zero count of each.
_DIGITS4 = np.array([list(f"{i:04d}".encode()) for i in range(10000)], dtype=np.uint8)
_TZ4 = np.array([4 if i == 0 else len(f"{i:04d}") - len(f"{i:04d}".rstrip("0")) for i in range(10000)],
                dtype=np.int64)
# Cell layout of one formatted value (bytes kept by a mask, the rest dropped):
# 0 sign | 1 '0' | 2 '.' | 3-5 leading zeros | 6-15 digits with a '.' inside | 16-19 "e-0X" | 20 separator
_CELL = 21
_SLOTS = np.arange(10)


def _exact_scaled(a_mant: np.ndarray, exp2: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """floor and round-half-even of |v| * 10**p, with |v| = a_mant * 2**exp2, 0 <= p <= 16.

    a_mant * 5**p < 2**62 fits int64, so the product is exact; the power of two is
    applied as a shift. Returns (floor, rounded), both int64.
    """
    a = a_mant * _POW5[p]  # exact
    s = exp2 + p  # multiply by 2**s
    k = np.clip(-s, 0, 62)  # right shift where s < 0
    floor = np.where(s >= 0, a << np.clip(s, 0, 40), a >> k)
    rem = a - (floor << k)
    half = np.where(k > 0, np.int64(1) << np.maximum(k - 1, 0), 0)
    up = (k > 0) & ((rem > half) | ((rem == half) & (floor & 1 == 1)))
    return floor, floor + up


def format_values(values: np.ndarray, row_length: int) -> tuple[bytes, np.ndarray]:
    """Format float32 values [R * row_length] as ``'%.9g'``, ``,``-separated, one ``\\n`` per row.

    Byte-for-byte identical to ``",".join('%.9g' % v for v in row) + "\\n"``; returns
    (bytes of all rows, int64 [R + 1] byte offsets of the row starts).

    Values 1e-8 <= |v| < 1e9 and zeros (all of a real embedding) are formatted with
    integer numpy arithmetic: 9 significant digits N = round_half_even(|v| * 10**(8-e))
    computed exactly, then laid out in fixed-width cells and compacted with a mask.
    Anything else (tiny, huge, inf) goes through Python's own '%.9g'.
    """
    v = np.ascontiguousarray(values, dtype=np.float32).ravel()
    n = v.size
    bits = v.view(np.uint32)
    negative = (bits >> 31).astype(bool)
    exp_field = ((bits >> 23) & 0xFF).astype(np.int64)
    mant = (bits & 0x7FFFFF).astype(np.int64) | (1 << 23)
    exp2 = exp_field - 150  # |v| = mant * 2**exp2 for normal numbers
    mag = np.abs(v.astype(np.float64))
    zero = mag == 0
    fast = ((mag >= 1.0001e-8) & (mag < 9.999e8)) | zero
    fast &= exp_field < 255
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.floor(np.log10(np.where(fast & ~zero, mag, 1.0))).astype(np.int64)
    e = np.where(zero, 0, e)
    mant = np.where(fast & ~zero, mant, 0)
    # log10 may be off by one next to powers of ten: fix e until floor(|v| 10**(8-e)) has 9 digits.
    for _ in range(2):
        fl, _r = _exact_scaled(mant, exp2, np.clip(8 - e, 0, 16))
        low = (fl < 10**8) & ~zero
        high = fl >= 10**9
        e = e - low + high
    p = 8 - e
    bad = (p < 0) | (p > 16)
    fl, digits_int = _exact_scaled(mant, exp2, np.clip(p, 0, 16))
    bad |= ((fl < 10**8) | (fl >= 10**9)) & ~zero
    fast &= ~bad
    carry = digits_int == 10**9  # 9.999999995 -> 1.00000000e+1
    digits_int = np.where(carry, 10**8, digits_int)
    e = e + carry
    sci = (e < -4) & ~zero  # '%g' switches to exponent form below 1e-4 (and at >= 1e9: slow path)

    # Nine ASCII digits from a table of four-digit groups; trailing zeros from a second table.
    top = digits_int // 10**8
    mid = (digits_int // 10**4) % 10**4
    low4 = digits_int % 10**4
    digs = np.empty((n, 9), dtype=np.uint8)
    digs[:, 0] = top + 48
    digs[:, 1:5] = _DIGITS4[mid]
    digs[:, 5:9] = _DIGITS4[low4]
    tz = np.where(low4 == 0, 4 + _TZ4[mid], _TZ4[low4])
    last = 8 - tz  # index of the last non-zero digit (0 for zero)
    fixed_pos = (~sci) & (e >= 0)
    fixed_neg = (~sci) & (e < 0)
    # Position of the decimal point among the 10 digit slots; 9 (dropped) if it lives in slot 2.
    q = np.where(fixed_pos, e + 1, np.where(sci, 1, 9))
    last_kept = np.where(fixed_pos, np.maximum(last, e), last)
    point_kept = np.where(fixed_pos, last_kept > e, sci & (last >= 1))

    cells = np.zeros((n, _CELL), dtype=np.uint8)
    keep = np.zeros((n, _CELL), dtype=bool)
    cells[:, 0] = ord("-")
    keep[:, 0] = negative
    cells[:, 1] = ord("0")
    cells[:, 2] = ord(".")
    keep[:, 1] = fixed_neg
    keep[:, 2] = fixed_neg
    cells[:, 3:6] = ord("0")
    keep[:, 3:6] = fixed_neg[:, None] & (np.arange(3)[None, :] < (-e - 1)[:, None])
    digit_index = _SLOTS[None, :] - (_SLOTS[None, :] > q[:, None])  # [n, 10]
    is_point = _SLOTS[None, :] == q[:, None]
    cells[:, 6:16] = np.where(is_point, ord("."), np.take_along_axis(digs, np.minimum(digit_index, 8), axis=1))
    keep[:, 6:16] = np.where(is_point, point_kept[:, None], digit_index <= last_kept[:, None])
    cells[:, 16] = ord("e")
    cells[:, 17] = ord("-")
    cells[:, 18] = ord("0")
    cells[:, 19] = (48 - e).clip(48, 57)  # exponent digit of e-05 .. e-08
    keep[:, 16:20] = sci[:, None]
    cells[:, 20] = ord(",")
    keep[:, 20] = True
    if row_length:
        cells[row_length - 1 :: row_length, 20] = ord("\n")

    slow = np.flatnonzero(~fast)
    for i in slow.tolist():
        text = ("%.9g" % float(v[i])).encode("ascii")
        cells[i, : len(text)] = np.frombuffer(text, dtype=np.uint8)
        keep[i, :20] = False
        keep[i, : len(text)] = True
    out = cells[keep]
    rows = n // row_length if row_length else 0
    per_row = keep.reshape(rows, -1).sum(axis=1) if rows else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(per_row, out=offsets[1:])
    return out.tobytes(), offsets


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def _relative(path: str, base: Path) -> str:
    """Path as stored in an embedding file: relative to its folder, absolute on another drive."""
    absolute = os.path.abspath(path)
    try:
        return os.path.relpath(absolute, base)
    except ValueError:  # another drive on Windows
        return absolute


def _csv_field(text: str) -> str:
    """Quote a field by CSV rules when it needs it."""
    if "\n" in text or "\r" in text:
        raise UserError(f"paths and labels in embedding files may not contain newlines: {text!r}")
    if "," in text or '"' in text or text != text.strip() and text.strip() == "":
        return '"' + text.replace('"', '""') + '"'
    if '"' in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def _check_inputs(paths: Sequence[str], labels: Sequence, emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [N, d], got shape {emb.shape}")
    if len(paths) != emb.shape[0] or len(labels) != emb.shape[0]:
        raise ValueError(f"{len(paths)} paths and {len(labels)} labels for {emb.shape[0]} embeddings")
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise UserError(f"no embeddings to write (shape {emb.shape})")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise UserError(f"embedding of {paths[row]} contains NaN or infinity; refusing to write it")
    return emb


def _row_prefixes(paths: Sequence[str], labels: Sequence, base: Path) -> list[bytes]:
    return [
        f"{_csv_field(_relative(str(p), base))},{_csv_field(str(lab))},".encode("utf-8")
        for p, lab in zip(paths, labels)
    ]


def _format_block(prefixes: list[bytes], block: np.ndarray) -> bytes:
    """Rows ``prefix + values`` of a [R, d] float32 block as bytes."""
    body, offsets = format_values(block, block.shape[1])
    parts = []
    for i, prefix in enumerate(prefixes):
        parts.append(prefix)
        parts.append(body[offsets[i] : offsets[i + 1]])
    return b"".join(parts)


def _workers(n_values: int) -> int:
    if n_values < _PARALLEL_MIN_VALUES:
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _ordered_map(fn, items: list, workers: int) -> Iterator:
    """fn over items in order, with at most ``2 * workers`` results held in memory."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _progress(total: int, desc: str, enabled: bool, unit: str = "row"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, leave=False)


def write_embeddings(
    path: str | os.PathLike,
    paths: Sequence[str],
    labels: Sequence,
    emb: np.ndarray,
    progress: bool = True,
) -> Path:
    """Write embeddings atomically; the format follows the file name (text, .npz or .npy).

    paths: N image paths (absolute, or relative to the current directory)
    labels: N class names (anything; written with ``str``)
    emb: float32 [N, d] (finite values only)
    """
    path = Path(path)
    emb = _check_inputs(paths, labels, emb)
    base = path.resolve().parent
    kind = file_kind(path)
    if kind == "npz":
        rel = np.array([_relative(str(p), base) for p in paths], dtype=str)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a name
                np.savez(f, emb=emb, paths=rel, labels=np.array([str(x) for x in labels], dtype=str),
                         format=np.array(FORMAT_NAME), version=np.array(FORMAT_VERSION))
        return path
    if kind == "npy":
        _write_meta(meta_path(path), paths, labels, base)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb)
        return path

    n, d = emb.shape
    header = ("path,label," + ",".join(f"e{i}" for i in range(d)) + "\n").encode("ascii")
    prefixes = _row_prefixes(paths, labels, base)
    starts = list(range(0, n, _WRITE_ROWS_PER_TASK))
    task = lambda s: _format_block(prefixes[s : s + _WRITE_ROWS_PER_TASK], emb[s : s + _WRITE_ROWS_PER_TASK])
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=1 << 22) as f, \
            _progress(n, f"writing {path.name}", progress) as bar:
        f.write(header)
        for s, chunk in zip(starts, _ordered_map(task, starts, _workers(emb.size))):
            f.write(chunk)
            bar.update(min(_WRITE_ROWS_PER_TASK, n - s))
    return path


def _write_meta(meta: Path, paths: Sequence[str], labels: Sequence, base: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    for p, lab in zip(paths, labels):
        if any(c in str(x) for x in (p, lab) for c in "\r\n"):
            raise UserError(f"paths and labels in embedding files may not contain newlines: {p!r}")
        writer.writerow([_relative(str(p), base), str(lab)])
    with atomic_path(meta) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def _absolute(rel_paths: Sequence[str], base: Path) -> list[str]:
    return [os.path.normpath(os.path.join(base, p)) for p in rel_paths]


def read_embeddings(path: str | os.PathLike, progress: bool = True) -> Embeddings:
    """Read a text, .npz or .npy embedding file; raise UserError on anything malformed."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"embedding file not found: {path}")
    if not path.is_file():
        raise UserError(f"embedding file is not a file: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"embedding file is empty: {path}")
    kind = file_kind(path)
    if kind == "npz":
        result = _read_npz(path)
    elif kind == "npy":
        result = _read_npy(path)
    else:
        result = _read_text(path, progress)
    if len(result) == 0:
        raise UserError(f"embedding file holds no embeddings: {path}")
    if not np.isfinite(result.emb).all():
        row = int(np.flatnonzero(~np.isfinite(result.emb).all(axis=1))[0])
        raise UserError(f"embedding file {path}: row {row + 1} ({result.paths[row]}) has NaN or infinite values")
    return result


def _read_npz(path: Path) -> Embeddings:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"emb", "paths", "labels"} - set(data.files)
            if missing:
                raise UserError(f"malformed embedding file {path}: missing arrays {sorted(missing)}")
            emb, rel, labels = data["emb"], data["paths"], data["labels"]
    except UserError:
        raise
    except Exception as exc:  # zip / npy format errors come in many types
        raise UserError(f"malformed embedding file {path}: {exc}")
    if emb.ndim != 2 or len(rel) != len(emb) or len(labels) != len(emb):
        raise UserError(f"malformed embedding file {path}: emb {emb.shape}, {len(rel)} paths, {len(labels)} labels")
    base = path.resolve().parent
    return Embeddings(_absolute(rel.tolist(), base), np.array(labels.tolist(), dtype=object),
                      np.ascontiguousarray(emb, dtype=np.float32))


def _read_npy(path: Path) -> Embeddings:
    import pandas as pd

    meta = meta_path(path)
    if not meta.is_file():
        raise UserError(f"embedding file {path} has no sidecar {meta.name} (path,label per row)")
    try:
        emb = np.load(path, allow_pickle=False, mmap_mode=None)
    except Exception as exc:
        raise UserError(f"malformed embedding file {path}: {exc}")
    try:
        df = pd.read_csv(meta, dtype=str, keep_default_na=False, engine="c")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"malformed embedding sidecar {meta}: {str(exc).strip()}")
    if list(df.columns) != ["path", "label"]:
        raise UserError(f"embedding sidecar {meta} must have the header 'path,label'")
    if emb.ndim != 2 or len(df) != len(emb):
        raise UserError(f"embedding file {path} holds {emb.shape} values but {meta.name} lists {len(df)} rows")
    return Embeddings(_absolute(df["path"].tolist(), path.resolve().parent),
                      df["label"].to_numpy(dtype=object), np.ascontiguousarray(emb, dtype=np.float32))


def read_header(path: str | os.PathLike) -> int:
    """Check a text embedding file's header; return the dimension d."""
    path = Path(path)
    with open(path, "rb") as f:
        first = f.readline()
    try:
        columns = next(csv.reader([first.decode("utf-8").rstrip("\r\n")]))
    except (UnicodeDecodeError, StopIteration, csv.Error):
        raise UserError(f"malformed embedding file {path}: unreadable header")
    d = len(columns) - 2
    expected = ["path", "label"] + [f"e{i}" for i in range(max(d, 0))]
    if d < 1 or columns != expected:
        shown = ",".join(columns[:5]) + (",..." if len(columns) > 5 else "")
        raise UserError(
            f"malformed embedding file {path}: header must be 'path,label,e0,...,e{{d-1}}', found {shown!r}"
        )
    return d


def _byte_ranges(path: Path, start: int, size: int, step: int) -> list[tuple[int, int]]:
    """Split [start, size) into pieces of about ``step`` bytes that end at a newline."""
    ranges = []
    with open(path, "rb") as f:
        pos = start
        while pos < size:
            end = min(pos + step, size)
            if end < size:
                f.seek(end)
                tail = f.readline()
                end += len(tail)
            ranges.append((pos, end))
            pos = end
    return ranges


def _parse_range(path: Path, d: int, byte_range: tuple[int, int], first_line: int):
    """Parse one newline-aligned byte range of a text embedding file."""
    import pandas as pd

    start, end = byte_range
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    names = ["path", "label"] + [f"e{i}" for i in range(d)]
    # Only the text columns get a dtype: a 4,096-entry float32 dtype map makes pandas' C parser
    # 2x slower than parsing to float64 and casting (exact for values written from float32).
    dtypes = {"path": str, "label": str}
    try:
        df = pd.read_csv(io.BytesIO(data), header=None, names=names, dtype=dtypes, engine="c",
                         keep_default_na=False, na_filter=False, skip_blank_lines=True)
        emb = df.iloc[:, 2:].to_numpy(dtype=np.float32)  # [rows, d]; '' or text here is an error
    except pd.errors.ParserError as exc:
        raise UserError(f"malformed embedding file {path}: {_locate(str(exc), first_line)}")
    except (ValueError, UnicodeDecodeError) as exc:
        line = _first_bad_line(data, d)
        where = f" on line {first_line + line}" if line is not None else ""
        raise UserError(f"malformed embedding file {path}{where}: {str(exc).strip()}")
    return df["path"].tolist(), df["label"].to_numpy(dtype=object), emb


def _locate(message: str, first_line: int) -> str:
    """Rewrite pandas' 'line K' (1-based within a chunk) into the file's line number."""
    import re

    match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if match:
        expected, line, saw = (int(g) for g in match.groups())
        return f"line {first_line + line - 1} has {saw} columns, expected {expected}"
    return message.strip()


def _first_bad_line(data: bytes, d: int) -> int | None:
    """0-based index of the first line of ``data`` that does not parse (slow; errors only)."""
    text = data.decode("utf-8", errors="replace")
    for i, row in enumerate(csv.reader(io.StringIO(text))):
        if not row:
            continue
        if len(row) != d + 2:
            return i
        try:
            [float(x) for x in row[2:]]
        except ValueError:
            return i
    return None


def _read_text(path: Path, progress: bool) -> Embeddings:
    d = read_header(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = len(f.readline())
    if header_len >= size:
        raise UserError(f"embedding file holds no embeddings: {path}")
    ranges = _byte_ranges(path, header_len, size, _READ_BYTES_PER_TASK)
    # Line numbers of each range's first row, for error messages (counted only when needed).
    workers = _workers((size - header_len) // 10)
    results = []
    line_of = _LineCounter(path, ranges)
    task = lambda item: _parse_range(path, d, item[1], line_of(item[0]))
    with _progress(size - header_len, f"reading {path.name}", progress, unit="B") as bar:
        for (a, b), part in zip(ranges, _ordered_map(task, list(enumerate(ranges)), workers)):
            results.append(part)
            bar.update(b - a)
    paths = [p for part in results for p in part[0]]
    if any(p == "" for p in paths):
        raise UserError(f"malformed embedding file {path}: row {paths.index('') + 1} has an empty path")
    labels = np.concatenate([part[1] for part in results]) if results else np.array([], dtype=object)
    emb = np.concatenate([part[2] for part in results]) if len(results) > 1 else results[0][2]
    return Embeddings(_absolute(paths, path.resolve().parent), labels, emb)


class _LineCounter:
    """Line number (1-based, header = 1) where byte range i starts; computed lazily.

    Only error messages need it, and counting newlines costs a pass over the file,
    so the count happens on first use inside the failing task.
    """

    def __init__(self, path: Path, ranges: list[tuple[int, int]]):
        self.path, self.ranges = path, ranges

    def __call__(self, index: int) -> "_LazyLine":
        return _LazyLine(self, index)

    def line(self, index: int) -> int:
        start = self.ranges[index][0]
        with open(self.path, "rb") as f:
            return f.read(start).count(b"\n") + 1


class _LazyLine(int):
    """An int-like first-line number that is only counted when arithmetic needs it."""

    def __new__(cls, counter: _LineCounter, index: int):
        obj = super().__new__(cls, 0)
        obj.counter, obj.index = counter, index
        return obj

    def __add__(self, other):
        return self.counter.line(self.index) + other

    __radd__ = __add__

"""Embedding files: one self-describing format read and written by every stage.

Text (any name not ending ``.npy``/``.npz``; ``.txt`` by convention) — UTF-8 CSV::

    path,label,e0,e1,...,e{d-1}
    train/n01443537/images/n01443537_0.JPEG,n01443537,1.23456789e-02,-4.56123443e-03,...

* ``path`` is relative to the embedding file's own folder (absolute when it lives
  on another drive); :func:`read_embeddings` returns absolute paths.
* ``label`` is the class name, quoted by CSV rules when it holds a comma or a quote.
  Paths and labels may not contain newlines (refused on write), nor be empty (refused on
  write and on read: rows with an empty label would all be one class, scored as matches).
* then d values, each written as ``'%.8e' % value`` (``-1.23456789e-02``) — 9
  significant digits, enough for every float32 to round-trip exactly. d is read from
  the header; readers accept any float syntax (``0.5``, ``5e-1``).

Binary companions (same information, ~3x smaller, ~50x faster):

* ``*.npz`` — one ``np.savez`` file with arrays ``emb`` (float32 [N, d]), ``paths``
  (str, relative as above), ``labels`` (str), ``format`` and ``version``.
* ``*.npy`` — the float32 [N, d] matrix, plus a sidecar ``<name>.npy.meta.csv``
  holding ``path,label`` rows.

Provenance: every file records the model that made it (``checkpoint.model_fingerprint``:
SHA-256 of the weights + the preprocessing record, plus the checkpoint path and step for
humans) and, when written by gen_embeddings.py, its image folder and each image's size and
modification time (what ``update_database.py`` compares). Text and ``.npy`` files keep this
in a companion ``<name>.meta.json`` (so ``pandas.read_csv(path)`` still reads the CSV as-is)
which also holds the data file's size, mtime and SHA-256: a companion that does not describe
the file beside it (a half-replaced pair, a file edited by hand) is ignored with a warning.
``.npz`` files hold the same record as an array ``record`` (JSON text). Files without a
record (older ones) load as "unknown model"; comparisons warn about them
(:func:`check_same_model`).

Speed: text is formatted by a vectorised re-implementation of ``'%.8e'``
(table lookups on the float32 bits, see :func:`format_values`), split over
worker processes for big files, and parsed by pandas' C engine in blocks of rows. See ``bench/bench_embedding_io.py``.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from deepranking.cli import UserError, warn
from deepranking.file_io import atomic_paths, check_input_file, first_long_row, regular_file_problem

FORMAT_NAME = "deep-ranking-embeddings"
FORMAT_VERSION = 1
META_SUFFIX = ".meta.csv"  # sidecar of a .npy file: "<name>.npy.meta.csv"
RECORD_SUFFIX = ".meta.json"  # companion of a text or .npy file: "<name>.meta.json"
RECORD_FORMAT = "deep-ranking-embeddings-record"
RECORD_VERSION = 1

# Work split: tasks big enough to amortise inter-process transfer; formatting itself
# runs 16 rows at a time so its temporaries (~80 bytes per value) stay in the CPU caches.
_WRITE_ROWS_PER_TASK = 512
_FORMAT_ROWS = 16
# Below this many values starting worker processes costs more than it saves.
_PARALLEL_MIN_VALUES = 2_000_000
# Values per pandas call when reading text: 8,192 rows of 4,096 (~1 GB of pandas temporaries).
_READ_BLOCK_VALUES = 2**25


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
    record: dict | None = None  # the provenance record (None: an older file, or a companion that does not fit)
    record_note: str | None = None  # why there is no record

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows) -> np.ndarray:
        """float32 rows of ``emb`` (``e[a:b]``, ``e[int array]``), as a database.Database gives them."""
        return self.emb[rows]

    @property
    def model(self) -> dict | None:
        """The fingerprint of the model that made the file (checkpoint.model_fingerprint), None if unknown."""
        return (self.record or {}).get("model")

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


def record_path(path: str | os.PathLike) -> Path:
    """The provenance companion of a text or ``.npy`` embedding file (``.npz`` files hold it inside)."""
    return Path(str(path) + RECORD_SUFFIX)


def files_of(path: str | os.PathLike) -> list[Path]:
    """Every file that makes up one embedding file, the data file first."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "npz":
        return [path]
    if kind == "npy":
        return [path, meta_path(path), record_path(path)]
    return [path, record_path(path)]


# ----------------------------------------------------------------------------
# Vectorised '%.8e'
# ----------------------------------------------------------------------------
# Every value is one 16-byte cell of four 4-byte words, filled from tables:
#   [sign d0 '.' d1] [d2 d3 d4 d5] [d6 d7 d8 'e'] [esign e1 e2 sep]
# A positive value's sign byte is NUL and is deleted at the end (bytes.replace is much
# faster than boolean indexing). Measured here: ~70 ns per value, against ~370 ns for
# the exact '%.9g' this replaced and ~540 ns for np.savetxt.


def _words(strings: list[str]) -> np.ndarray:
    """4-character ASCII strings as uint32 words whose memory holds exactly those bytes."""
    return np.frombuffer("".join(strings).encode("ascii"), dtype=np.uint32).copy()


# [100 * negative + 10 * d0 + d1]: "\0d.d" or "-d.d"
_LEAD = np.concatenate([_words([f"\0{i // 10}.{i % 10}" for i in range(100)]),
                        _words([f"-{i // 10}.{i % 10}" for i in range(100)])])
_MID = _words([f"{i:04d}" for i in range(10000)])
_TAIL = _words([f"{i:03d}e" for i in range(1000)])
_EXP_OFFSET = 60  # float32 decimal exponents lie in [-45, 38]
_EXP = _words([f"{'-' if e < 0 else '+'}{abs(e):02d}," for e in range(-_EXP_OFFSET, _EXP_OFFSET)])
_P10_OFFSET = 80
_P10 = 10.0 ** np.arange(-_P10_OFFSET, _P10_OFFSET)  # _P10[k + _P10_OFFSET] = 10**k (float64)
# floor(log10(2**(f - 127))) for each float32 exponent field f: the decimal exponent of
# a value is this or one more.
_E_OF_FIELD = np.floor((np.arange(256) - 127) * np.log10(2.0)).astype(np.int64)


def format_values(values: np.ndarray, row_length: int) -> bytes:
    """Format float32 values [R * row_length] as ``'%.8e'``, ``,``-separated, ``\\n`` after each row.

    Byte-for-byte identical to ``"".join(",".join('%.8e' % v for v in row) + "\\n" for row in rows)``:
    9 significant digits, enough for every float32 to round-trip exactly.

    The nine digits are rint(|v| * 10**(8-e)) in float64. Its error (< 1e-15 relative)
    can only change the result when the scaled value lies within 1e-6 of a rounding
    tie; those (about 2 in a million), subnormals, and non-finite values go through
    Python's own '%.8e'.
    """
    v = np.ascontiguousarray(values, dtype=np.float32).ravel()
    n = v.size
    bits = v.view(np.uint32)
    field = (bits >> 23) & 0xFF
    a = np.abs(v).astype(np.float64)
    e = _E_OF_FIELD[field]  # decimal exponent: e <= log10|v| < e + 1
    e += a >= _P10[e + 1 + _P10_OFFSET]
    scaled = a * _P10[8 - e + _P10_OFFSET]  # in [1e8, 1e9)
    r = np.rint(scaled)  # the nine digits, as an exact integer in float64
    zero = a == 0
    slow = (np.abs(scaled - r) > 0.5 - 1e-6) | (r >= 1e9) | (field == 255) | ((field == 0) & ~zero)
    e[zero] = 0
    q7 = np.floor(r / 1e7)  # d0 d1 (division by a power of ten is exact where it divides)
    q3 = np.floor(r / 1e3)  # d0 .. d5
    cells = np.empty((n, 4), dtype=np.uint32)
    cells[:, 0] = _LEAD[(q7 + 100 * (bits >> 31)).astype(np.intp)]
    cells[:, 1] = _MID[(q3 - 1e4 * np.floor(q3 / 1e4)).astype(np.intp)]
    cells[:, 2] = _TAIL[(r - 1e3 * q3).astype(np.intp)]
    cells[:, 3] = _EXP[np.clip(e, -_EXP_OFFSET, _EXP_OFFSET - 1) + _EXP_OFFSET]
    cell_bytes = cells.view(np.uint8)  # [n, 16]
    for i in np.flatnonzero(slow).tolist():
        text = ("%.8e" % float(v[i])).encode("ascii")  # also 'inf', 'nan'
        cell_bytes[i, :15] = 0
        cell_bytes[i, 15 - len(text) : 15] = np.frombuffer(text, dtype=np.uint8)
    if row_length:
        cell_bytes[row_length - 1 :: row_length, 15] = ord("\n")
    return cells.tobytes().replace(b"\0", b"")


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def relative_path(path: str, base: Path) -> str:
    """Path as stored in an embedding file: relative to its folder, absolute on another drive."""
    absolute = os.path.abspath(path)
    try:
        return os.path.relpath(absolute, base)
    except ValueError:  # another drive on Windows
        return absolute


def csv_field(text: str) -> str:
    """Quote a field by CSV rules when it holds a comma or a quote; refuse newlines."""
    if "\n" in text or "\r" in text:
        raise UserError(f"paths and labels in embedding files may not contain newlines: {text!r}")
    if "," in text or '"' in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def _first_empty(values) -> int | None:
    """0-based index of the first empty string among ``values`` (paths or labels), None if none.

    An empty label would silently make all such rows one class "", so every neighbour would
    "match" and eval.py would print perfect scores; an empty path names no image."""
    # compared as objects: a fixed-width str copy would cost 4 bytes x the longest path x N
    empty = np.flatnonzero(np.asarray(values, dtype=object) == "")
    return int(empty[0]) if len(empty) else None


def check_rows(paths: Sequence[str], labels: Sequence) -> None:
    """Refuse an empty path or label before writing: read back, it would be refused."""
    for name, values in (("path", paths), ("label", labels)):
        row = _first_empty(values)
        if row is not None:
            raise UserError(f"embedding row {row + 1} ({paths[row]!r}) has an empty {name}; refusing to write it")


def _check_inputs(paths: Sequence[str], labels: Sequence, emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [N, d], got shape {emb.shape}")
    if len(paths) != emb.shape[0] or len(labels) != emb.shape[0]:
        raise ValueError(f"{len(paths)} paths and {len(labels)} labels for {emb.shape[0]} embeddings")
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise UserError(f"no embeddings to write (shape {emb.shape})")
    check_rows(paths, labels)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise UserError(f"embedding of {paths[row]} contains NaN or infinity; refusing to write it")
    return emb


def _row_prefixes(paths: Sequence[str], labels: Sequence, base: Path) -> list[bytes]:
    return [
        f"{csv_field(relative_path(str(p), base))},{csv_field(str(lab))},".encode("utf-8")
        for p, lab in zip(paths, labels)
    ]


def _format_block(prefixes: list[bytes], block: np.ndarray) -> bytes:
    """Rows ``prefix + values`` of a [R, d] float32 block as bytes."""
    parts = []
    for s in range(0, len(block), _FORMAT_ROWS):  # small pieces keep the temporaries in cache
        rows = format_values(block[s : s + _FORMAT_ROWS], block.shape[1]).split(b"\n")
        parts.extend(prefix + row + b"\n" for prefix, row in zip(prefixes[s : s + _FORMAT_ROWS], rows))
    return b"".join(parts)


def _workers(n_values: int) -> int:
    """Worker processes for a job of ``n_values`` numbers (1: do it in this process)."""
    if n_values < _PARALLEL_MIN_VALUES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def _ordered_map(fn, items: list, workers: int) -> Iterator:
    """``fn(*item)`` for each item, in order, with at most ``2 * workers`` tasks in flight.

    Worker processes, not threads: the formatting and parsing loops hold the GIL for
    much of their time. "forkserver" rather than fork, because the caller may have
    started torch threads (forking a threaded process is unsafe).
    """
    if workers <= 1:
        for item in items:
            yield fn(*item)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _progress(total: int, desc: str, enabled: bool, unit: str = "row"):
    from deepranking.cli import progress

    return progress(total=total, desc=desc, unit=unit, unit_scale=True, enabled=enabled, leave=False)


@dataclass
class EmbeddingFile:
    """One embedding file to write (see :func:`write_embedding_files`).

    model: checkpoint.model_fingerprint of the model that made ``emb`` (None: unknown)
    images: {"root": the image folder listed, "stamps": int64 [N, 2] (size, mtime_ns) per row}
    """

    path: Path
    paths: Sequence[str]
    labels: Sequence
    emb: np.ndarray
    model: dict | None = None
    images: dict | None = None


def write_embeddings(
    path: str | os.PathLike,
    paths: Sequence[str],
    labels: Sequence,
    emb: np.ndarray,
    progress: bool = True,
    model: dict | None = None,
    images: dict | None = None,
) -> Path:
    """Write embeddings atomically; the format follows the file name (text, .npz or .npy).

    paths: N image paths (absolute, or relative to the current directory)
    labels: N class names (anything; written with ``str``)
    emb: float32 [N, d] (finite values only)
    model, images: the provenance record (see :class:`EmbeddingFile`)
    """
    write_embedding_files([EmbeddingFile(Path(path), paths, labels, emb, model, images)], progress=progress)
    return Path(path)


def write_embedding_files(files: Sequence[EmbeddingFile], progress: bool = True,
                          also: Sequence[tuple[Path, Callable[[Path], None]]] = ()) -> None:
    """Write several embedding files as one unit (gen_embeddings.py's train + test pair).

    Every data file and companion is written to a temporary name first; only when all are
    complete are they renamed into place, with Ctrl-C held (``file_io.atomic_paths``). An
    error or interruption before that leaves every existing file as it was. ``also``: more
    files of the unit, (final path, a function that writes it at the temporary path it is
    given) — a database folder's manifest.
    """
    checked = [(f, _check_inputs(f.paths, f.labels, f.emb)) for f in files]
    finals = [p for f in files for p in files_of(f.path)] + [Path(final) for final, _ in also]
    with atomic_paths(finals) as tmps:
        pos = 0
        for f, emb in checked:
            n_files = len(files_of(f.path))
            _write_one(Path(f.path), tmps[pos : pos + n_files], f, emb, progress)
            pos += n_files
        for tmp, (_, write) in zip(tmps[pos:], also):
            write(tmp)


def _record(f: EmbeddingFile, emb: np.ndarray) -> dict:
    images = None
    if f.images is not None:
        stamps = np.asarray(f.images["stamps"], dtype=np.int64).reshape(len(emb), 2)
        images = {"root": str(f.images["root"]), "stamps": stamps.tolist()}
    return {"format": RECORD_FORMAT, "version": RECORD_VERSION, "rows": int(emb.shape[0]),
            "dim": int(emb.shape[1]), "model": f.model, "images": images}


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> dict:
    """What a companion records of its data file: size, mtime (fast check) and SHA-256 (after a copy)."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _file_sha256(path)}


def _write_one(final: Path, tmps: list[Path], f: EmbeddingFile, emb: np.ndarray, progress: bool) -> None:
    """Write one embedding file's data (and companions) into ``tmps`` (the order of files_of(final))."""
    import json

    paths, labels = f.paths, f.labels
    base = final.resolve().parent  # paths are relative to the final file's folder (the temps lie beside it)
    kind = file_kind(final)
    record = _record(f, emb)
    if kind == "npz":
        rel = np.array([relative_path(str(p), base) for p in paths], dtype=str)
        with open(tmps[0], "wb") as fh:  # a file object: savez would append ".npz" to a name
            np.savez(fh, emb=emb, paths=rel, labels=np.array([str(x) for x in labels], dtype=str),
                     format=np.array(FORMAT_NAME), version=np.array(FORMAT_VERSION),
                     record=np.array(json.dumps(record)))
        return
    if kind == "npy":
        _write_meta(tmps[1], paths, labels, base)
        with open(tmps[0], "wb") as fh:
            np.save(fh, emb)
    else:
        _write_text(tmps[0], final.name, paths, labels, emb, base, progress)
    record["data"] = _stamp(tmps[0])  # the rename into place keeps size and mtime
    tmps[-1].write_text(json.dumps(record) + "\n", encoding="utf-8")


def _write_text(target: Path, name: str, paths, labels, emb: np.ndarray, base: Path, progress: bool) -> None:
    n, d = emb.shape
    header = ("path,label," + ",".join(f"e{i}" for i in range(d)) + "\n").encode("ascii")
    prefixes = _row_prefixes(paths, labels, base)
    step = _WRITE_ROWS_PER_TASK
    tasks = [(prefixes[s : s + step], emb[s : s + step]) for s in range(0, n, step)]
    with open(target, "wb", buffering=1 << 22) as f, _progress(n, f"writing {name}", progress) as bar:
        f.write(header)
        for (task_prefixes, _), chunk in zip(tasks, _ordered_map(_format_block, tasks, _workers(emb.size))):
            f.write(chunk)
            bar.update(len(task_prefixes))


def _write_meta(meta: Path, paths: Sequence[str], labels: Sequence, base: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    for p, lab in zip(paths, labels):
        if any(c in str(x) for x in (p, lab) for c in "\r\n"):
            raise UserError(f"paths and labels in embedding files may not contain newlines: {p!r}")
        writer.writerow([relative_path(str(p), base), str(lab)])
    meta.write_text(buf.getvalue(), encoding="utf-8")


# ----------------------------------------------------------------------------
# Provenance records
# ----------------------------------------------------------------------------


def read_record(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """(record, None), or (None, why there is none) for an embedding file; cheap (no data read).

    A text/.npy companion counts only when it describes the data file beside it: same size
    and mtime, or (a copy that did not keep the mtime) the same SHA-256. A record that is not
    JSON, or JSON of the wrong shape (:func:`record_problem`), is an unreadable record: the file
    loads as of an unknown model, as one without a record.
    """
    import json

    path = Path(path)
    if file_kind(path) == "npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "record" not in data.files:
                    return None, f"{path} records no model (written before model fingerprints)"
                record = json.loads(str(data["record"]))
        except (OSError, ValueError) as exc:
            return None, f"{path}: unreadable record ({exc})"
        problem = record_problem(record, companion=False)
        return (None, f"{path}: unreadable record ({problem})") if problem else (record, None)
    companion = record_path(path)
    missing = regular_file_problem(companion)
    if missing == "not found":
        return None, f"{path} records no model (no {companion.name}: written before model fingerprints)"
    if missing:  # there, but nothing to read (a folder, a FIFO: never opened)
        return None, f"{companion}: unreadable record (it {missing})"
    try:
        record = json.loads(companion.read_text(encoding="utf-8"))
        problem = record_problem(record, companion=True)
        if problem:
            return None, f"{companion}: unreadable record ({problem})"
        data = record["data"]
        st = path.stat()
        if not (data["size"] == st.st_size and data["mtime_ns"] == st.st_mtime_ns):
            if data["size"] != st.st_size or data["sha256"] != _file_sha256(path):
                return None, (f"{companion.name} describes another version of {path.name} "
                              f"(half-replaced, or edited since): its model is unknown")
    except (OSError, ValueError) as exc:
        return None, f"{companion}: unreadable ({exc})"
    return record, None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape_problem(value, shape: dict, where: str) -> str | None:
    """The first key of ``value`` (a dict) whose value has not the type ``shape`` gives it: a type,
    or a tuple of them (None stands for JSON null); keys that ``shape`` lacks are not checked."""
    if not isinstance(value, dict):
        return f"{where} is {type(value).__name__}, not an object"
    for key, types in shape.items():
        types = tuple(type(None) if t is None else t for t in (types if isinstance(types, tuple) else (types,)))
        if key not in value:
            if type(None) in types:
                continue
            return f"{where} has no {key!r}"
        v = value[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            return f"{where}.{key} is {type(v).__name__}"
    return None


_RECORD_SHAPE = {"format": str, "rows": int, "dim": int, "model": (dict, None), "images": (dict, None)}
_MODEL_SHAPE = {"id": str, "checkpoint": (str, None), "step": (int, None), "epoch": (int, None),
                "preprocessing": (dict, None)}
_IMAGES_SHAPE = {"root": str, "stamps": list}
_DATA_SHAPE = {"size": int, "mtime_ns": int, "sha256": str}


def record_problem(record, companion: bool) -> str | None:
    """What is wrong with the shape of a provenance record (None: nothing): the types every reader
    relies on (``model.id`` a string, one ``[size, mtime_ns]`` pair of integers per row, ...).
    ``companion``: a ``.meta.json`` beside its data file, which also describes that file (``data``)."""
    problem = _shape_problem(record, _RECORD_SHAPE, "record")
    if problem or record["format"] != RECORD_FORMAT:
        return problem or f"format {record['format']!r} is not {RECORD_FORMAT!r}"
    if record["rows"] < 0 or record["dim"] < 0:
        return f"it counts {record['rows']} rows of {record['dim']} values"
    if record["model"] is not None:
        problem = _shape_problem(record["model"], _MODEL_SHAPE, "model")
    if not problem and record["images"] is not None:
        problem = _shape_problem(record["images"], _IMAGES_SHAPE, "images") or _stamps_problem(
            record["images"]["stamps"], record["rows"])
    if not problem and companion:
        problem = _shape_problem(record.get("data"), _DATA_SHAPE, "data")
    return problem


def _stamps_problem(stamps: list, rows: int) -> str | None:
    """``images.stamps`` must hold one [size, mtime_ns] pair of integers per row."""
    if len(stamps) != rows:
        return f"images.stamps holds {len(stamps)} entries for {rows} rows"
    if not stamps:
        return None
    try:
        pairs = np.asarray(stamps)  # one C pass: a query start reads the record of a 100,000-row database
    except (ValueError, TypeError, OverflowError):  # ragged, or numbers past int64
        pairs = None
    if pairs is not None and pairs.shape == (rows, 2) and pairs.dtype.kind in "iu":
        return None
    bad = next((i for i, s in enumerate(stamps) if not (isinstance(s, list) and len(s) == 2 and all(map(_is_int, s)))),
               0)
    return f"images.stamps[{bad}] is {stamps[bad]!r}, not [size, mtime_ns]"


def describe_model(model: dict | None) -> str:
    """'model 3fa2c1d9e0ab (runs/x.model, step 1200)' or 'an unknown model'."""
    if not model:
        return "an unknown model"
    where = []
    if model.get("checkpoint"):
        where.append(_display(model["checkpoint"]))
    if model.get("step") is not None:
        where.append(f"step {model['step']}")
    return f"model {model['id'][:12]}" + (f" ({', '.join(where)})" if where else "")


def _display(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def check_same_model(name_a: str, model_a: dict | None, name_b: str, model_b: dict | None,
                     hint: str = "regenerate them with one checkpoint (gen_embeddings.py)",
                     notes: Sequence[str | None] = ()) -> None:
    """UserError naming both files and both models when they differ; a warning when one is unknown."""
    if model_a and model_b:
        if model_a["id"] != model_b["id"]:
            raise UserError(f"{name_a} and {name_b} come from different models: {name_a}: "
                            f"{describe_model(model_a)}; {name_b}: {describe_model(model_b)}; {hint}")
        return
    reasons = [n for n in notes if n]
    unknown = [n for n, m in ((name_a, model_a), (name_b, model_b)) if not m]
    warn(f"cannot check that {name_a} and {name_b} come from the same model: "
         + ("; ".join(reasons) if reasons else f"{' and '.join(unknown)} record no model"))


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def _absolute(rel_paths: Sequence[str], base: Path) -> list[str]:
    return [os.path.normpath(os.path.join(base, p)) for p in rel_paths]


def read_embeddings(path: str | os.PathLike, progress: bool = True) -> Embeddings:
    """Read a text, .npz or .npy embedding file; raise UserError on anything malformed."""
    path = check_input_file(path, "embedding file", allow_empty=False)
    kind = file_kind(path)
    if kind == "npz":
        result = _read_npz(path)
    elif kind == "npy":
        result = _read_npy(path)
    else:
        result = _read_text(path, progress)
    if len(result) == 0:
        raise UserError(f"embedding file holds no embeddings: {path}")
    if result.dim == 0:
        raise UserError(f"malformed embedding file {path}: its embeddings have 0 dimensions")
    check_unique_paths(path, result.paths)
    if not np.isfinite(result.emb).all():
        row = int(np.flatnonzero(~np.isfinite(result.emb).all(axis=1))[0])
        raise UserError(f"embedding file {path}: row {row + 1} ({result.paths[row]}) has NaN or infinite values")
    result.record, result.record_note = read_record(path)
    if result.record is not None and (result.record["rows"], result.record["dim"]) != (len(result), result.dim):
        result.record, result.record_note = None, f"the record of {path} describes another file: its model is unknown"
    return result


def check_unique_paths(path: Path, paths: list[str]) -> None:
    """Each image once: a second row of the same image would be a perfect match for the first
    (leave-one-out leaves out only the row itself), which no score may count."""
    n_unique = len(set(paths))  # a set, not np.unique: a fixed-width array pads every row to the longest
    if n_unique == len(paths):
        return
    first_row: dict[str, int] = {}
    for row, p in enumerate(paths):
        if p in first_row:
            raise UserError(f"embedding file {path}: {len(paths) - n_unique} duplicate image row(s), the "
                            f"first {_display(p)} on rows {first_row[p] + 1} and {row + 1}; keep one row per image")
        first_row[p] = row


def _check_arrays(path: Path, emb: np.ndarray, strings: dict[str, np.ndarray]) -> None:
    """Binary files: real-number embeddings, and 1-D arrays of non-empty strings for paths and labels."""
    if emb.dtype.kind not in "fiu":  # complex, bool, strings and records are not embeddings
        raise UserError(f"malformed embedding file {path}: emb holds {emb.dtype} values, not real numbers")
    for name, values in strings.items():
        kinds = "U" if name == "paths" else "Uiu"  # labels may be class numbers (written as text)
        if values.ndim != 1 or values.dtype.kind not in kinds:
            raise UserError(f"malformed embedding file {path}: {name} must be a 1-D array of strings, "
                            f"found {values.dtype} of shape {values.shape}")
    for name, values in strings.items():
        row = _first_empty(values)
        if row is not None:
            raise UserError(f"malformed embedding file {path}: row {row + 1} has an empty {name[:-1]}")


def _as_float32(emb: np.ndarray) -> np.ndarray:
    """A contiguous float32 copy; a value past float32's range becomes inf, which read_embeddings names."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(emb, dtype=np.float32)


def _check_magic(path: Path, magic: bytes, what: str) -> None:
    """np.load reads anything else as a pickle and suggests loading it unsafely: say what it is not."""
    with open(path, "rb") as f:
        if f.read(len(magic)) != magic:
            raise UserError(f"malformed embedding file {path}: not {what}")


def _read_npz(path: Path) -> Embeddings:
    _check_magic(path, b"PK", "a .npz archive (a zip of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"emb", "paths", "labels"} - set(data.files)
            if missing:
                raise UserError(f"malformed embedding file {path}: missing arrays {sorted(missing)}")
            emb, rel, labels = data["emb"], data["paths"], data["labels"]
    except (UserError, MemoryError):  # out of memory is not a malformed file: cli.run says which it is
        raise
    except Exception as exc:  # zip / npy format errors come in many types
        raise UserError(f"malformed embedding file {path}: {exc}")
    _check_arrays(path, emb, {"paths": rel, "labels": labels})
    if emb.ndim != 2 or len(rel) != len(emb) or len(labels) != len(emb):
        raise UserError(f"malformed embedding file {path}: emb {emb.shape}, {len(rel)} paths, {len(labels)} labels")
    base = path.resolve().parent
    return Embeddings(_absolute(rel.tolist(), base), labels.astype(str).astype(object),
                      _as_float32(emb))


def _read_npy(path: Path) -> Embeddings:
    import pandas as pd

    meta = meta_path(path)
    if regular_file_problem(meta) == "not found":
        raise UserError(f"embedding file {path} has no sidecar {meta.name} (path,label per row)")
    check_input_file(meta, "embedding sidecar")
    _check_magic(path, b"\x93NUMPY", "a .npy array")
    try:
        emb = np.load(path, allow_pickle=False, mmap_mode=None)
    except MemoryError:  # a whole matrix larger than memory: cli.run's out-of-memory line, not "malformed"
        raise
    except Exception as exc:
        raise UserError(f"malformed embedding file {path}: {exc}")
    try:
        with warnings.catch_warnings():  # a row longer than the header: see _read_text
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(meta, dtype=str, keep_default_na=False, engine="c", index_col=False)
    except pd.errors.ParserWarning:
        raise UserError(f"malformed embedding sidecar {meta}: line {first_long_row(meta, 2)} has more fields than "
                        f"the header's 2 (path,label)")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"malformed embedding sidecar {meta}: {str(exc).strip()}")
    if list(df.columns) != ["path", "label"]:
        raise UserError(f"embedding sidecar {meta} must have the header 'path,label'")
    _check_arrays(path, emb, {"paths": df["path"].to_numpy(dtype=str), "labels": df["label"].to_numpy(dtype=str)})
    if emb.ndim != 2 or len(df) != len(emb):
        raise UserError(f"embedding file {path} holds an array of shape {emb.shape} but {meta.name} lists "
                        f"{len(df)} rows (expected [{len(df)}, d])")
    return Embeddings(_absolute(df["path"].tolist(), path.resolve().parent),
                      df["label"].to_numpy(dtype=object), _as_float32(emb))


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


def _line_of_row(path: Path, row: int) -> int:
    """1-based file line of data row ``row`` (0-based; blank lines skipped). Errors only."""
    line, seen = 1, -1
    with open(path, "rb") as f:
        f.readline()  # header
        for line, text in enumerate(f, start=2):
            if text.strip():
                seen += 1
                if seen == row:
                    return line
    return line


def _read_text(path: Path, progress: bool) -> Embeddings:
    """pandas C-engine calls on the path, ``_READ_BLOCK_VALUES // d`` rows at a time.

    One call over the whole file peaks at ~8x the float32 matrix (tokens, per-column
    float64 pieces and their concatenation, the consolidated frame): +13.9 GB for
    100,000 x 4,096. Blocks bound the temporaries to ~8x one block; the float32 blocks
    and their concatenation add 2x the result (measured: +3.3 GB in all for that file).
    Each block costs ~0.1 s of pandas overhead per 4,096 columns, so blocks stay large.
    A path is parsed 2x faster than the same bytes given as a file object, so pandas
    reads the path itself. pandas infers each block's column types on its own, so a
    column that is not int or float (bool: "True"; object: any text) is refused in
    every block alike.
    """
    import pandas as pd

    d = read_header(path)
    with open(path, "rb") as f:
        header_bytes = len(f.readline())
        first = next(_first_lines(f, 1))
        if not first.strip():
            raise UserError(f"embedding file holds no embeddings: {path}")
        f.seek(-1, os.SEEK_END)
        cut_short = f.read(1) != b"\n"  # every writer ends rows with one; a copy stopped mid-number does not
    # rows for the progress bar: every '%.8e' value has the same width, so rows are of similar length
    rows_estimate = max(1, round((path.stat().st_size - header_bytes) / len(first)))
    block_rows = max(1, _READ_BLOCK_VALUES // d)
    # Text columns get a dtype, numbers are inferred and cast once: a 4,096-entry float32
    # dtype map makes the C parser 2x slower (the cast is exact for values written from float32).
    try:
        # index_col=False: rows longer than the header would otherwise make pandas take the path
        # column as the index and shift label into path and e0 into label (a ParserWarning, raised)
        reader = pd.read_csv(path, header=0, dtype={"path": str, "label": str}, engine="c", index_col=False,
                             chunksize=block_rows, low_memory=False, keep_default_na=False, na_filter=False,
                             skip_blank_lines=True)
    except UnicodeDecodeError as exc:
        raise UserError(f"malformed embedding file {path}: not UTF-8 text ({exc.reason})")
    blocks, paths, labels = [], [], []
    with reader, _progress(rows_estimate, f"reading {path.name}", progress) as bar, warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        for df in _text_blocks(reader, path, d):
            first_row = len(paths)  # data row number of this block's first row (0-based)
            values = df.iloc[:, 2:]
            if any(not _is_number_dtype(t) for t in values.dtypes):
                raise UserError(f"malformed embedding file {path}: {_describe_bad_cell(path, df, first_row)}")
            with np.errstate(over="ignore"):  # a value past float32 becomes inf, which read_embeddings names
                blocks.append(values.to_numpy(dtype=np.float32))  # [rows, d]
            paths += df["path"].tolist()
            labels.append(df["label"].to_numpy(dtype=object))
            bar.update(len(df))
            del df
    labels = np.concatenate(labels)
    for name, values in (("path", paths), ("label", labels)):
        row = _first_empty(values)
        if row is not None:
            raise UserError(f"malformed embedding file {path}: line {_line_of_row(path, row)} has an empty {name}")
    if cut_short:
        warn(f"{path} does not end with a newline: its last row ({paths[-1]}) may be cut short, as in a copy "
             f"that stopped early, and its last value is read as it stands")
    emb = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)  # [N, d]
    return Embeddings(_absolute(paths, path.resolve().parent), labels, emb)


def _text_blocks(reader, path: Path, d: int):
    """The pandas reader's blocks of ``d + 2`` columns; its parse errors as one-line UserErrors."""
    import pandas as pd

    while True:
        try:
            df = next(reader)
        except StopIteration:
            return
        except pd.errors.ParserWarning:
            raise UserError(f"malformed embedding file {path}: line {first_long_row(path, d + 2)} has more fields "
                            f"than the header's {d + 2} (path,label,e0..e{d - 1})")
        except pd.errors.ParserError as exc:
            raise UserError(f"malformed embedding file {path}: {_locate(str(exc))}")
        except UnicodeDecodeError as exc:
            raise UserError(f"malformed embedding file {path}: not UTF-8 text ({exc.reason})")
        if df.shape[1] != d + 2:
            raise UserError(f"malformed embedding file {path}: {df.shape[1]} columns, expected {d + 2}")
        yield df


def _first_lines(f, n: int):
    for _ in range(n):
        line = f.readline()
        while line and not line.strip():
            line = f.readline()
        yield line


def _locate(message: str) -> str:
    """pandas' "Expected X fields in line K, saw Y" as a one-line message."""
    import re

    match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if match:
        expected, line, saw = (int(g) for g in match.groups())
        return f"line {line} has {saw} columns, expected {expected}"
    return message.strip().splitlines()[-1]


def _is_number_dtype(dtype) -> bool:
    """int or float: what pandas infers for a column of numbers (not bool, not object)."""
    return dtype.kind in "iuf"


def _describe_bad_cell(path: Path, df, first_row: int = 0) -> str:
    """Where the first non-numeric (or missing) value of block ``df`` is: line, column and value.

    ``first_row``: the file's data row number (0-based) of the block's first row.
    """
    import pandas as pd

    for name in df.columns[2:]:
        column = df[name]
        if _is_number_dtype(column.dtype):
            continue
        column = column.astype(str)  # bool columns too: "True" is no number
        bad = pd.to_numeric(column, errors="coerce").isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = column.iloc[row]
            row += first_row
            what = "a missing value (too few columns?)" if value == "" else f"non-numeric value {value!r}"
            return f"line {_line_of_row(path, row)} has {what} in column {name}"
    return "non-numeric values"

"""An embedding database: one file or a folder of shards + a manifest; written as rows are computed,
read by blocks, searched within a memory budget.

A database is what gen_embeddings.py writes and eval.py, query.py and update_database.py read. Two
forms, one reader API (:func:`open` → :class:`FileDatabase` or :class:`ShardedDatabase`: ``len``,
``dim``, ``paths``, ``labels``, ``stamps``, ``model``, ``record``, rows by index or slice, ``blocks``):

* **one file** (text, ``.npz`` or ``.npy``; :mod:`embedding_io`), read whole into memory: the
  classic ``train_embedding.txt``, for collections that fit in memory many times over;
* **a folder of shards** (``gen_embeddings.py --shard-rows N``), for large ones::

      db/manifest.json          what the folder holds; renamed into place last (no manifest, no database)
      db/shard-00000.npy        float32 [n, d] in np.save's format, n <= the manifest's shard_rows
      db/shard-00000.rows.csv   path,label[,size,mtime_ns] of those n rows (paths relative to db/)
      db/ivf-nlist<L>-pq<M>-seed<S>/   FAISS indexes (query.py --ann faiss): trained.faiss, trained.json
                                       and <shard>.faiss per shard

  The manifest (``deep-ranking-database`` v1): ``{"rows", "dim", "shard_rows", "next_shard", "model":
  the checkpoint.model_fingerprint, "images": {"root"} (the class folder listed), "shards": [{"name",
  "rows", "bytes"}, ...]}``; the rows of the database are the shards' rows in that order. A shard is
  written once under a name never used before in the folder (``next_shard`` counts them): an update
  writes new shards and a new manifest, then deletes the shards it replaced, so a reader of the
  previous manifest never sees a shard change under it.

Writing (:class:`Output`): every torchrun rank streams its contiguous range of rows as they are
computed, into its own shards (a folder) or at its offset in one staging ``.npy`` (a file, formatted
by embedding_io at the end); nothing gathers the matrix. Memory: a batch and the file buffer.

Searching (:class:`StreamingIndex`): exact k-NN that reads the database block by block (blocks
sized by the memory budget, :class:`Budget`), searches each with retrieval.ExactIndex and keeps a
running top-k merged by (distance, row) — the neighbours of one ExactIndex over the whole matrix, in
memory that follows the budget instead of the database. :class:`ShardIVF`: FAISS IVF (optionally PQ)
trained on a seeded sample, one index per shard filled from that shard, saved in the folder,
memory-mapped at query time and searched by fan-out.

Growing (:func:`update_folder`): new images become new shards; a shard holding a changed or removed
image is rewritten (changed rows in place); every other shard stays as it is, and so does its index.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from deepranking import cli, distributed, embedding_io, image_cache, retrieval
from deepranking.cli import UserError, warn
from deepranking.file_io import atomic_path, atomic_write_text, check_output_path, probe_writable

FORMAT_NAME = "deep-ranking-database"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"shard-(\d{5,})")
ROWS_SUFFIX = ".rows.csv"
IVF_PREFIX = "ivf-"

# ----------------------------------------------------------------------------
# The memory budget
# ----------------------------------------------------------------------------

BUDGET_ENV = "DEEP_RANK_MEMORY_BUDGET"
AUTO_FRACTION = 0.25  # auto: this share of the memory available now ...
AUTO_MAX = 2 * 10**9  # ... at most 2 GB (decimal, as every size flag): larger blocks buy little
MIN_BUDGET = 10**6
# Bytes per neighbour entry while a block of queries is scored: the running and the new lists
# (float32 distance + int64 row each), their merge, and scoring's label codes and metric arrays.
NEIGHBOUR_BYTES = 128


@dataclass(frozen=True)
class Budget:
    """How a memory budget (bytes) is spent while a database is searched: a quarter on the block of
    database rows in memory, a quarter on the [queries, block rows] distance block, a quarter on
    neighbour lists (and the metrics computed from them), an eighth on query vectors; the rest is
    headroom. Start-up (torch, ~0.5-0.8 GB resident) and the paths and labels of the rows (~150
    bytes a row) come on top."""

    nbytes: int

    def block_rows(self, dim: int) -> int:
        """Database rows read and searched at a time."""
        return max(1, self.nbytes // 4 // (4 * dim))

    @property
    def chunk_floats(self) -> int:
        """retrieval.ExactIndex's [chunk, block rows] distance block, in floats."""
        return max(1, self.nbytes // 16)

    @property
    def neighbours(self) -> int:
        """Neighbour entries ([queries, depth]) held at once: scoring.score_queries' block of queries."""
        return max(1, self.nbytes // 4 // NEIGHBOUR_BYTES)

    def query_rows(self, dim: int) -> int:
        """Query vectors of ``dim`` floats held at once."""
        return max(1, self.nbytes // 8 // (4 * dim))

    def scoring_blocks(self, dim: int) -> dict:
        """scoring.evaluate's block sizes (neighbour_budget, max_block) for queries of ``dim`` floats."""
        return {"neighbour_budget": self.neighbours, "max_block": self.query_rows(dim)}


def budget_flag(value: str) -> int | str:
    """argparse type of --memory-budget: a size (``2G``, ``500M``; at least 1M) or ``auto``."""
    try:
        size = image_cache.parse_size(value)
    except ValueError:
        raise cli.arg_error(f"expected a size such as 2G or 500M, or auto; got {value!r}")
    if size != image_cache.AUTO_BUDGET and size < MIN_BUDGET:
        raise cli.arg_error(f"a memory budget below 1M cannot hold a block of rows; got {value!r}")
    return size


def add_budget_flag(p) -> None:
    """--memory-budget, the same for every program that searches or rewrites a database."""
    p.add_argument("--memory-budget", type=budget_flag, default=None, metavar="SIZE",
                   help=f"working memory for database blocks, distances and neighbour lists (e.g. 2G; default "
                        f"${BUDGET_ENV} or auto = a quarter of the memory available, at most 2G): a database "
                        f"larger than this is read and searched block by block")


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable; the free pages where /proc is missing)."""
    try:
        with builtins.open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return AUTO_MAX * 4


def memory_budget(value: int | str | None = None) -> Budget:
    """The budget of a run: ``value`` (bytes or "auto", from --memory-budget), else $DEEP_RANK_MEMORY_BUDGET,
    else auto."""
    if value is None:
        setting = os.environ.get(BUDGET_ENV, image_cache.AUTO_BUDGET)
        try:
            value = budget_flag(setting)
        except Exception:  # argparse's error type: here a setting of the environment
            raise UserError(f"${BUDGET_ENV}={setting!r} is not a memory budget (e.g. 2G, 500M or auto; at least 1M)")
    if value == image_cache.AUTO_BUDGET:
        value = max(MIN_BUDGET, min(AUTO_MAX, int(AUTO_FRACTION * available_memory())))
    return Budget(int(value))


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


class Database:
    """What every reader uses: ``len``, ``dim``, ``paths`` (absolute), ``labels`` (object [N]),
    ``stamps`` (int64 [N, 2] (size, mtime_ns) of each image, None if not recorded), ``images_root``,
    ``model`` (the fingerprint, None if unknown), ``record_note`` (why not), ``record``; rows as
    float32 arrays by ``db[i]``, ``db[a:b]`` or ``db[int array]``, and :meth:`blocks`."""

    path: Path
    sharded = False

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, rows) -> np.ndarray:
        raise NotImplementedError

    def blocks(self, rows_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [b, d]) for consecutive blocks of at most ``rows_per_block`` rows."""
        for start in range(0, len(self), rows_per_block):
            yield start, self[start:min(len(self), start + rows_per_block)]

    @property
    def images_root(self) -> str | None:
        return ((self.record or {}).get("images") or {}).get("root")


class FileDatabase(Database):
    """One embedding file, read whole (embedding_io.read_embeddings); ``emb`` is its matrix."""

    def __init__(self, path: str | os.PathLike, data: embedding_io.Embeddings):
        self.path, self.data = Path(path), data
        self.emb, self.paths, self.labels = data.emb, data.paths, data.labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows) -> np.ndarray:
        return self.emb[rows]

    @property
    def dim(self) -> int:
        return self.data.dim

    @property
    def model(self) -> dict | None:
        return self.data.model

    @property
    def record(self) -> dict | None:
        return self.data.record

    @property
    def record_note(self) -> str | None:
        return self.data.record_note

    @property
    def stamps(self) -> np.ndarray | None:
        images = (self.record or {}).get("images")
        return None if not images else np.asarray(images["stamps"], dtype=np.int64).reshape(len(self), 2)


@dataclass
class Shard:
    name: str
    rows: int
    start: int  # its first row in the database

    def files(self, folder: Path) -> list[Path]:
        return [folder / f"{self.name}.npy", folder / f"{self.name}{ROWS_SUFFIX}"]


def is_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder (a sharded database, or not a database at all)."""
    return Path(path).is_dir()


def open(path: str | os.PathLike, progress: bool = True) -> Database:  # noqa: A001 (database.open reads well)
    """The database at ``path``: a folder of shards (with manifest.json) or one embedding file.
    UserError for anything missing or malformed."""
    path = Path(path)
    if path.is_dir():
        return ShardedDatabase(path)
    return FileDatabase(path, embedding_io.read_embeddings(path, progress=progress))


def _npy_shape(path: Path) -> tuple[tuple, np.dtype, bool]:
    """(shape, dtype, fortran order) from a .npy file's header."""
    fmt = np.lib.format
    with builtins.open(path, "rb") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
    return shape, dtype, fortran


class ShardedDatabase(Database):
    """A database folder (see the module docstring). Opening reads the manifest and each shard's
    header; paths, labels and stamps are read from the shards' rows files when first asked for."""

    sharded = True

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder)
        self.manifest = read_manifest(self.path)
        self.dim = int(self.manifest["dim"])
        self.shards, start = [], 0
        for entry in self.manifest["shards"]:
            self.shards.append(Shard(entry["name"], int(entry["rows"]), start))
            start += int(entry["rows"])
        self.starts = np.array([s.start for s in self.shards] + [start], dtype=np.int64)
        for shard in self.shards:
            self._check_shard(shard)
        self._rows = None

    def _check_shard(self, shard: Shard) -> None:
        npy = self.path / f"{shard.name}.npy"
        try:
            shape, dtype, fortran = _npy_shape(npy)
        except (OSError, ValueError) as exc:
            raise UserError(f"database {self.path}: shard {npy.name} is missing or unreadable ({exc})")
        if shape != (shard.rows, self.dim) or dtype != np.dtype("<f4") or fortran:
            raise UserError(f"database {self.path}: shard {npy.name} holds {dtype} {shape}, the manifest says "
                            f"float32 ({shard.rows}, {self.dim}): the folder was changed by hand or half-copied")

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def model(self) -> dict | None:
        return self.manifest.get("model")

    @property
    def record(self) -> dict:
        return {"model": self.model, "images": self.manifest.get("images")}

    @property
    def record_note(self) -> str | None:
        return None if self.model else f"{self.path} records no model"

    @property
    def shard_rows(self) -> int:
        return int(self.manifest["shard_rows"])

    # --- vectors ------------------------------------------------------------------------------

    def _map(self, shard: Shard) -> np.ndarray:
        return np.load(self.path / f"{shard.name}.npy", mmap_mode="r", allow_pickle=False)

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):
            return self[np.array([rows])][0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._read_range(start, max(start, stop))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < -len(self) or rows.max() >= len(self))):
            raise IndexError(f"rows out of range for a database of {len(self)}")
        rows = np.where(rows < 0, rows + len(self), rows)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        which = np.searchsorted(self.starts, rows[order], side="right") - 1
        for s in np.unique(which):
            pick = order[which == s]
            mapped = self._map(self.shards[s])
            out[pick] = mapped[rows[pick] - self.shards[s].start]
            del mapped
        return out

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        first = int(np.searchsorted(self.starts, start, side="right") - 1)
        pos = start
        for shard in self.shards[max(first, 0):]:
            if pos >= stop:
                break
            a, b = pos - shard.start, min(stop, shard.start + shard.rows) - shard.start
            mapped = self._map(shard)
            out[pos - start:pos - start + b - a] = mapped[a:b]
            del mapped
            pos += b - a
        if not np.isfinite(out).all():
            row = start + int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
            raise UserError(f"database {self.path}: row {row + 1} has NaN or infinite values")
        return out

    # --- paths, labels, stamps ----------------------------------------------------------------

    def _load_rows(self):
        if self._rows is None:
            parts = [read_rows_file(self.path, shard) for shard in self.shards]
            paths = [p for part in parts for p in part[0]]
            labels = np.concatenate([part[1] for part in parts]) if parts else np.zeros(0, dtype=object)
            stamps = None
            if parts and all(part[2] is not None for part in parts):
                stamps = np.concatenate([part[2] for part in parts])
            embedding_io.check_unique_paths(self.path, paths)
            self._rows = (paths, labels, stamps)
        return self._rows

    @property
    def paths(self) -> list[str]:
        return self._load_rows()[0]

    @property
    def labels(self) -> np.ndarray:
        return self._load_rows()[1]

    @property
    def stamps(self) -> np.ndarray | None:
        return self._load_rows()[2]


def read_manifest(folder: Path) -> dict:
    """The manifest of a database folder, checked; UserError for a folder that is not one."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is a folder but not an embedding database (no {MANIFEST}); give an embedding "
                        f"file or a folder written by gen_embeddings.py --shard-rows")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        shards = manifest["shards"]
        ok = (manifest.get("format") == FORMAT_NAME and isinstance(manifest["dim"], int) and manifest["dim"] > 0
              and isinstance(shards, list) and all(SHARD_NAME.fullmatch(str(s["name"])) and isinstance(s["rows"], int)
                                                   and s["rows"] > 0 for s in shards)
              and sum(s["rows"] for s in shards) == manifest["rows"] and manifest["rows"] > 0)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"unreadable database manifest {path}: {exc}")
    if not ok:
        raise UserError(f"malformed database manifest {path}: not a {FORMAT_NAME} record of shards and rows")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"database {folder} has format version {manifest.get('version')}; this code reads "
                        f"version {FORMAT_VERSION}")
    return manifest


def read_rows_file(folder: Path, shard: Shard) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(absolute paths, labels, stamps int64 [n, 2] or None) of one shard's rows file."""
    import pandas as pd

    path = folder / f"{shard.name}{ROWS_SUFFIX}"
    try:
        df = pd.read_csv(path, dtype={"path": str, "label": str}, keep_default_na=False, na_filter=False,
                         engine="c", index_col=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"database {folder}: unreadable rows file {path.name} ({str(exc).strip().splitlines()[0]})")
    columns = list(df.columns)
    if columns not in (["path", "label"], ["path", "label", "size", "mtime_ns"]) or len(df) != shard.rows:
        raise UserError(f"database {folder}: {path.name} must hold {shard.rows} rows of path,label[,size,mtime_ns]; "
                        f"found {len(df)} rows of {','.join(map(str, columns))}")
    empty = (df["path"] == "") | (df["label"] == "")
    if empty.any():
        raise UserError(f"database {folder}: {path.name} row {int(np.flatnonzero(empty)[0]) + 1} has an empty "
                        f"path or label")
    base = str(folder.resolve())
    paths = [os.path.normpath(os.path.join(base, p)) for p in df["path"].tolist()]
    stamps = df[["size", "mtime_ns"]].to_numpy(dtype=np.int64) if len(columns) == 4 else None
    return paths, df["label"].to_numpy(dtype=object), stamps


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def _npy_header(rows: int, dim: int) -> bytes:
    """np.save's header of a float32 [rows, dim] array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                               "fortran_order": False, "shape": (rows, dim)})
    return buf.getvalue()


def check_output(path: Path, force: bool, what: str, folder: bool) -> Path:
    """Refuse, before any work, an output that exists (without --force) or that cannot be written.

    A folder output may be new, empty, or a database folder (replaced with --force); a folder of
    other files is refused even with --force, since only a database's own files would be replaced."""
    if not folder:
        return check_output_path(path, force, what)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; a database folder (--shard-rows) needs another name")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST).is_file():
            raise UserError(f"{what} {path} is a folder of other files, not a database; choose another name")
        if not force:
            raise UserError(f"{what} already exists: {path} (use --force to overwrite)")
    probe_writable(path / MANIFEST, what)
    return path


def shard_ranges(n: int, bounds: Sequence[int], shard_rows: int) -> list[tuple[int, int]]:
    """Every shard's [start, end) rows: each rank's range (``bounds``: distributed.shard_bounds) cut into
    shards of at most ``shard_rows``, in row order. Every rank computes the same list, so each names its
    own shards with no message between them."""
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out.extend((a, min(hi, a + shard_rows)) for a in range(lo, hi, shard_rows))
    return out


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


@dataclass
class Output:
    """One database being written: a file (rows streamed into a staging .npy, formatted at
    :func:`commit`) or, with ``shard_rows``, a folder of shards.

    images: {"root": the class folder listed, "stamps": int64 [N, 2]} or None.
    """

    path: Path
    paths: Sequence[str]
    labels: Sequence[str]
    dim: int
    model: dict | None = None
    images: dict | None = None
    shard_rows: int | None = None
    world_size: int = 1
    first_shard: int = field(init=False, default=0)

    def __post_init__(self):
        self.path = Path(self.path)
        embedding_io.check_rows(self.paths, self.labels)
        if not len(self.paths):
            raise UserError(f"no embeddings to write to {self.path}")
        if self.shard_rows is not None and (self.path / MANIFEST).is_file():
            try:  # names after every shard the old database used: a reader of it never sees one change
                self.first_shard = int(json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))["next_shard"])
            except (OSError, ValueError, KeyError, TypeError):
                self.first_shard = 0

    @property
    def sharded(self) -> bool:
        return self.shard_rows is not None

    @property
    def staging(self) -> Path:
        """A file output's rows as computed (float32 .npy), beside it."""
        return self.path.parent / f".{self.path.name}.rows.npy"

    def bounds(self) -> list[int]:
        """Each rank's range of rows (rank r: bounds[r] to bounds[r + 1])."""
        return distributed.shard_bounds(len(self.paths), self.world_size)

    def shards(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of every shard of a folder output."""
        ranges = shard_ranges(len(self.paths), self.bounds(), self.shard_rows)
        return [(shard_name(self.first_shard + i), a, b) for i, (a, b) in enumerate(ranges)]

    def writer(self, rank: int) -> "RowWriter":
        """Where rank ``rank`` writes its rows (``bounds()[rank]`` to ``bounds()[rank + 1]``), in order."""
        lo, hi = self.bounds()[rank], self.bounds()[rank + 1]
        if not self.sharded:
            return RowWriter(self, lo, hi, [])
        return RowWriter(self, lo, hi, [s for s in self.shards() if lo <= s[1] < hi])


class RowWriter:
    """Rows [lo, hi) of an :class:`Output`, written as they come (``write(block)``; a context manager
    that checks every row came). A folder output's shards are each renamed into place when complete."""

    def __init__(self, output: Output, lo: int, hi: int, shards: list[tuple[str, int, int]]):
        self.out, self.lo, self.hi, self.pos = output, lo, hi, lo
        self.pending = list(shards)
        self.file = None  # the open data file and, for a shard, (tmp npy, tmp rows, final npy, final rows, end)
        self.shard = None

    def __enter__(self) -> "RowWriter":
        if not self.out.sharded:
            self.out.path.parent.mkdir(parents=True, exist_ok=True)
            # every rank opens the one staging file without truncating it and writes its own range
            fd = os.open(self.out.staging, os.O_WRONLY | os.O_CREAT, 0o644)
            self.file = os.fdopen(fd, "wb", buffering=1 << 22)
            self.file.write(_npy_header(len(self.out.paths), self.out.dim))
            self.file.seek(len(_npy_header(len(self.out.paths), self.out.dim)) + 4 * self.out.dim * self.lo)
        else:
            self.out.path.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != self.out.dim or self.pos + len(block) > self.hi:
            raise ValueError(f"rows {self.pos}..{self.pos + len(block)} of shape {block.shape} do not fit "
                             f"[{self.lo}, {self.hi}) x {self.out.dim}")
        if not np.isfinite(block).all():
            row = self.pos + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise UserError(f"embedding of {self.out.paths[row]} contains NaN or infinity; refusing to write it")
        while len(block):
            if self.out.sharded and self.shard is None:
                self._open_shard()
            end = self.shard[4] if self.out.sharded else self.hi
            take = min(len(block), end - self.pos)
            self.file.write(block[:take].tobytes())
            self.pos += take
            block = block[take:]
            if self.out.sharded and self.pos == end:
                self._close_shard()

    def _open_shard(self) -> None:
        name, a, b = self.pending.pop(0)
        folder = self.out.path
        final_npy, final_rows = folder / f"{name}.npy", folder / f"{name}{ROWS_SUFFIX}"
        tmp_npy, tmp_rows = folder / f".{name}.npy.tmp", folder / f".{name}{ROWS_SUFFIX}.tmp"
        stamps = None if self.out.images is None else self.out.images["stamps"][a:b]
        write_rows_file(tmp_rows, folder, self.out.paths[a:b], self.out.labels[a:b], stamps)
        self.file = builtins.open(tmp_npy, "wb", buffering=1 << 22)
        self.file.write(_npy_header(b - a, self.out.dim))
        self.shard = (tmp_npy, tmp_rows, final_npy, final_rows, b)

    def _close_shard(self) -> None:
        self.file.close()
        self.file = None
        tmp_npy, tmp_rows, final_npy, final_rows, _ = self.shard
        os.replace(tmp_npy, final_npy)
        os.replace(tmp_rows, final_rows)
        self.shard = None

    def __exit__(self, kind, value, tb) -> None:
        if self.file is not None:
            self.file.close()
        if kind is None and self.pos != self.hi:
            raise ValueError(f"{self.hi - self.pos} of rows {self.lo}..{self.hi} were never written")
        if kind is not None and self.shard is not None:
            for tmp in self.shard[:2]:
                Path(tmp).unlink(missing_ok=True)


def write_rows_file(target: Path, folder: Path, paths: Sequence[str], labels: Sequence,
                    stamps: np.ndarray | None) -> None:
    """A shard's ``path,label[,size,mtime_ns]`` rows, paths relative to the database folder."""
    base = folder.resolve()
    lines = ["path,label" + (",size,mtime_ns" if stamps is not None else "")]
    for i, (p, label) in enumerate(zip(paths, labels)):
        row = f"{embedding_io.csv_field(embedding_io.relative_path(str(p), base))},{embedding_io.csv_field(str(label))}"
        lines.append(row if stamps is None else f"{row},{int(stamps[i, 0])},{int(stamps[i, 1])}")
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")


def manifest_record(folder: Path, shards: Sequence[tuple[str, int]], dim: int, shard_rows: int, next_shard: int,
                    model: dict | None, root: str | None) -> dict:
    """The manifest of ``shards`` [(name, rows)] in ``folder`` (each shard's .npy size recorded)."""
    entries = [{"name": name, "rows": int(rows), "bytes": (folder / f"{name}.npy").stat().st_size}
               for name, rows in shards]
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "rows": sum(e["rows"] for e in entries),
            "dim": int(dim), "shard_rows": int(shard_rows), "next_shard": int(next_shard), "model": model,
            "images": None if root is None else {"root": str(root)}, "shards": entries}


def _write_json(record: dict) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return write


def commit(outputs: Sequence[Output], progress: bool = True) -> None:
    """Put every written output in place as one unit (after every rank wrote its rows): file outputs
    are formatted from their staging .npy (memory-mapped) by embedding_io, folder outputs get their
    manifest; all are renamed together (embedding_io.write_embedding_files). Then the staging files go,
    and so do a replaced database's shards and indexes."""
    files, also = [], []
    for out in outputs:
        root = None if out.images is None else str(out.images["root"])
        if out.sharded:
            shards = out.shards()
            record = manifest_record(out.path, [(name, b - a) for name, a, b in shards], out.dim, out.shard_rows,
                                     out.first_shard + len(shards), out.model, root)
            also.append((out.path / MANIFEST, _write_json(record)))
        else:
            files.append(embedding_io.EmbeddingFile(out.path, out.paths, out.labels, _staged_rows(out), out.model,
                                                    out.images))
    try:
        embedding_io.write_embedding_files(files, progress=progress, also=also)
    finally:
        del files
        discard(outputs)


def _staged_rows(out: Output) -> np.ndarray:
    """A file output's rows, memory-mapped from its staging .npy (cut to its size: a staging file an
    interrupted larger run left is overwritten in place, not truncated, while ranks write)."""
    expected = len(_npy_header(len(out.paths), out.dim)) + 4 * out.dim * len(out.paths)
    size = out.staging.stat().st_size
    if size < expected:
        raise UserError(f"{out.staging} holds {size} bytes, {expected} expected: rows of {out.path} are missing")
    if size > expected:
        os.truncate(out.staging, expected)
    return np.load(out.staging, mmap_mode="r", allow_pickle=False)


def discard(outputs: Sequence[Output]) -> None:
    """Remove what a run wrote and no manifest lists: staging files, and shards of a folder not (or no
    longer) in its manifest; a folder whose database was replaced loses its old indexes too."""
    for out in outputs:
        if not out.sharded:
            out.staging.unlink(missing_ok=True)
            continue
        if not out.path.is_dir():
            continue
        try:
            manifest = read_manifest(out.path)
        except UserError:
            manifest = {"shards": []}
        remove_unlisted(out.path, {s["name"] for s in manifest["shards"]})
        if manifest.get("next_shard", 0) > out.first_shard:  # this run's database is the one in place
            remove_indexes(out.path, lambda folder: True)


def remove_unlisted(folder: Path, listed: set[str]) -> None:
    """Delete the shard files (and partial ones) of ``folder`` whose shard is not in ``listed``."""
    for p in folder.iterdir():
        match = re.fullmatch(r"\.?(shard-\d{5,})(\.npy|" + re.escape(ROWS_SUFFIX) + r")(\.tmp)?", p.name)
        if match and (match.group(1) not in listed or p.name.startswith(".")):
            p.unlink(missing_ok=True)


def remove_indexes(folder: Path, stale: Callable[[Path], bool]) -> None:
    """Delete the FAISS index folders of a database folder for which ``stale(index folder)`` holds."""
    import shutil

    for p in folder.glob(f"{IVF_PREFIX}*"):
        if p.is_dir() and stale(p):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------
# Exact search by blocks
# ----------------------------------------------------------------------------


class Searcher:
    """The search interface of retrieval.ExactIndex for a database: ``len`` and
    ``search(queries, k, exclude_rows=None, largest=False, chunk_size=None)`` → (dist [Q, k], idx [Q, k])."""

    db: Database

    def __len__(self) -> int:
        return len(self.db)


def merge_neighbours(best, new, k: int, largest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of two neighbour lists (dist [Q, a], idx [Q, a]) and (dist [Q, b], idx [Q, b]), ordered
    as retrieval.ExactIndex orders them: by float32 distance (the largest first with ``largest``), equal
    distances by the lower row; idx -1 marks an empty slot, always last. ``best`` may be None."""
    dist, idx = new if best is None else (np.concatenate([best[0], new[0]], 1), np.concatenate([best[1], new[1]], 1))
    key = np.where(idx < 0, np.inf, -dist if largest else dist)
    order = np.lexsort((idx, key), axis=-1)[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


class StreamingIndex(Searcher):
    """Exact k-NN over a database of any size in memory that follows ``budget``.

    The database is read ``budget.block_rows(dim)`` rows at a time; each block is searched by a
    retrieval.ExactIndex (its distance block within ``budget.chunk_floats``) and its neighbours are
    merged into the running top-k by (distance, row). ExactIndex's neighbours are exact and its
    distances are recomputed from the vectors, so the result equals one ExactIndex over the whole
    matrix: the same rows, the same distances, the same order. A query's excluded row is handled per
    block (k + 1 neighbours of that block, the excluded one dropped). A database that fits in one block
    is indexed once and kept (no copy of a file database's matrix).
    """

    def __init__(self, db: Database, budget: Budget, device=None):
        from deepranking.runtime import pick_device

        self.db, self.budget = db, budget
        self.device = pick_device("auto" if device is None else device)
        self.block_rows = budget.block_rows(db.dim)
        self._whole = None
        if len(db) <= self.block_rows:
            rows = db.emb if isinstance(db, FileDatabase) else db[0:len(db)]
            self._whole = retrieval.ExactIndex(rows, self.device, budget.chunk_floats)

    def search(self, queries, k: int, exclude_rows=None, largest: bool = False,
               chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As retrieval.ExactIndex.search."""
        if self._whole is not None:
            return self._whole.search(queries, k, exclude_rows=exclude_rows, largest=largest, chunk_size=chunk_size)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n, d = len(self.db), self.db.dim
        if q.ndim != 2 or q.shape[1] != d:
            raise UserError(f"query dimension {q.shape[-1]} does not match database dimension {d}")
        excluded = None if exclude_rows is None else np.asarray(exclude_rows, dtype=np.int64)
        if excluded is not None and excluded.shape != (len(q),):
            raise ValueError("exclude_rows needs one database row (or -1) per query")
        available = n - 1 if excluded is not None and bool((excluded >= 0).any()) else n
        if k < 1 or k > available:
            raise UserError(f"k={k} is out of range: the database has {available} candidate(s) per query")
        best = None
        for start, block in self.db.blocks(self.block_rows):
            found = self._search_block(q, block, start, k, excluded, largest, chunk_size)
            best = merge_neighbours(best, found, k, largest)
        return best

    def _search_block(self, q, block, start: int, k: int, excluded, largest: bool, chunk_size):
        local = None
        if excluded is not None:
            local = np.where((excluded >= start) & (excluded < start + len(block)), excluded - start, -1)
        extra = int(local is not None and bool((local >= 0).any()))
        index = retrieval.ExactIndex(block, self.device, self.budget.chunk_floats)
        dist, idx = index.search(q, min(k + extra, len(block)), largest=largest, chunk_size=chunk_size)
        if extra:
            idx[idx == local[:, None]] = -1
        return dist, np.where(idx >= 0, idx + start, -1)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded sorted sample of ``size`` of ``n`` rows (all of them when ``size`` >= ``n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


# ----------------------------------------------------------------------------
# FAISS, one index per shard
# ----------------------------------------------------------------------------


def ivf_folder(db: ShardedDatabase, nlist: int, pq: int, seed: int) -> Path:
    return db.path / f"{IVF_PREFIX}nlist{nlist}-pq{pq}-seed{seed}"


class ShardIVF(Searcher):
    """FAISS IVF over a database folder, searched by fan-out.

    One quantizer (IVF-Flat, or IVF-PQ with ``pq`` bytes per vector) is trained on a seeded sample of
    at most 256 rows per list, as many as ``budget`` holds (at least 39 per list, FAISS's minimum);
    each shard gets its own index (a copy of the trained one, filled from that shard with ids = rows
    in the shard), saved beside it and memory-mapped for searching (IO_FLAG_MMAP). Every shard index
    probes the same ``nprobe`` lists of the same quantizer, so merging their answers by (distance,
    row) gives what one index over the whole database would. An update (update_database.py) only adds
    indexes of its new shards; a database from another model, or ``nlist`` changed, retrains.
    """

    def __init__(self, db: ShardedDatabase, budget: Budget, nlist: int | None = None, nprobe: int = 16,
                 seed: int = 0, pq: int = 0, progress: bool = False):
        from deepranking import ann_search

        self.faiss = ann_search.require_faiss()
        self.db, self.nprobe = db, nprobe
        self.nlist = ann_search.default_nlist(len(db)) if nlist is None else int(nlist)
        if not 1 <= self.nlist <= len(db):
            raise UserError(f"nlist must be between 1 and the database size {len(db)}, got {self.nlist}")
        if pq and db.dim % pq:
            raise UserError(f"--pq {pq} must divide the embedding dimension {db.dim}")
        self.folder = ivf_folder(db, self.nlist, pq, seed)
        self.saving = True
        trained = self._trained(budget, pq, seed)
        self.parts = [(shard.start, self._shard_index(shard, trained, budget, progress)) for shard in db.shards]

    def _save(self, index, path: Path) -> None:
        if not self.saving:
            return
        try:
            self.folder.mkdir(exist_ok=True)
            with atomic_path(path, suffix=".faiss") as tmp:
                self.faiss.write_index(index, str(tmp))
        except (OSError, UserError) as exc:
            warn(f"cannot save the FAISS index in {self.folder} ({exc}); it is rebuilt by every query")
            self.saving = False

    def _trained(self, budget: Budget, pq: int, seed: int):
        faiss, key = self.faiss, {"model": (self.db.model or {}).get("id"), "dim": self.db.dim}
        path, note = self.folder / "trained.faiss", self.folder / "trained.json"
        try:
            if json.loads(note.read_text(encoding="utf-8"))["key"] == key:
                return faiss.read_index(str(path))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            pass
        remove_indexes(self.db.path, lambda folder: folder == self.folder)  # another model's lists: all go
        quantizer = faiss.IndexFlatL2(self.db.dim)
        index = (faiss.IndexIVFPQ(quantizer, self.db.dim, self.nlist, pq, 8) if pq else
                 faiss.IndexIVFFlat(quantizer, self.db.dim, self.nlist, faiss.METRIC_L2))
        index.cp.seed = int(seed)
        if pq:
            index.pq.cp.seed = int(seed)
        rows = max(39 * self.nlist, min(256 * self.nlist, budget.block_rows(self.db.dim)))
        sample = self.db[sample_rows(len(self.db), rows, seed)]
        index.train(sample)
        del sample
        self._save(index, path)
        if self.saving:
            atomic_write_text(note, json.dumps({"key": key, "train_rows": min(rows, len(self.db))}) + "\n")
        return index

    def _shard_index(self, shard: Shard, trained, budget: Budget, progress: bool):
        faiss, path = self.faiss, self.folder / f"{shard.name}.faiss"
        if path.is_file():
            try:
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                if index.ntotal == shard.rows and index.d == self.db.dim:
                    return index
            except RuntimeError:
                pass
        index = faiss.clone_index(trained)
        step = budget.block_rows(self.db.dim)
        for a in range(0, shard.rows, step):
            b = min(shard.rows, a + step)
            index.add_with_ids(self.db[shard.start + a:shard.start + b], np.arange(a, b, dtype=np.int64))
        self._save(index, path)
        if self.saving:
            del index
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        return index

    def search(self, queries, k: int, exclude_rows=None, largest: bool = False,
               chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The approximate ``k`` nearest rows (Euclidean distances ascending; -1 where the probed lists held
        fewer); ``exclude_rows`` as ExactIndex (k + 1 searched, the query's own row dropped)."""
        from deepranking import ann_search

        if largest:
            raise ValueError("FAISS search finds the nearest rows only")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        extra = int(exclude_rows is not None and bool((np.asarray(exclude_rows) >= 0).any()))
        best = None
        for start, index in self.parts:
            dist, idx = ann_search.ivf_search(index, q, min(k + extra, index.ntotal), nprobe=self.nprobe)
            best = merge_neighbours(best, (dist, np.where(idx >= 0, idx + start, -1)), k + extra)
        dist, idx = best
        if extra:
            dist, idx = retrieval.drop_neighbours(dist, idx, np.asarray(exclude_rows, dtype=np.int64), k)
        return dist[:, :k], idx[:, :k]


def refresh_indexes(db: ShardedDatabase, budget: Budget, progress: bool = False) -> int:
    """After an update: every FAISS index folder of ``db`` loses the indexes of shards no longer listed and,
    where FAISS is installed and the folder's quantizer is still valid, gains those of the new shards
    (else the next query builds them). Returns the index folders brought up to date."""
    from deepranking import ann_search

    listed = {shard.name for shard in db.shards}
    done = 0
    for folder in sorted(db.path.glob(f"{IVF_PREFIX}*")):
        for p in folder.glob("shard-*.faiss"):
            if p.stem not in listed:
                p.unlink(missing_ok=True)
        match = re.fullmatch(rf"{IVF_PREFIX}nlist(\d+)-pq(\d+)-seed(\d+)", folder.name)
        if match and ann_search.faiss_available() and (folder / "trained.json").is_file():
            nlist, pq, seed = (int(g) for g in match.groups())
            if nlist <= len(db):
                ShardIVF(db, budget, nlist=nlist, seed=seed, pq=pq, progress=progress)
                done += 1
    return done


# ----------------------------------------------------------------------------
# Growing a database folder
# ----------------------------------------------------------------------------


@dataclass
class FolderUpdate:
    """What :func:`update_folder` did: shards kept, rewritten (their changed rows in place, removed rows
    left out), dropped (every row removed) and added (new images)."""

    kept: int = 0
    rewritten: int = 0
    dropped: int = 0
    added: int = 0


def update_folder(db: ShardedDatabase, paths: Sequence[str], labels: Sequence[str], stamps: np.ndarray,
                  keep: np.ndarray, embed: Callable[[list[str]], Iterable[np.ndarray]], model: dict | None,
                  root: str, budget: Budget) -> FolderUpdate:
    """Bring a database folder to the rows ``paths`` (labels, stamps int64 [M, 2]); ``keep[i]`` is the old
    row that new row i keeps unchanged, -1 to embed it. ``embed(paths)`` yields their vectors in order.

    Images to embed are embedded once, in order, into a staging .npy in the folder. A shard with a
    changed or removed row is rewritten under a new name (kept rows copied bit for bit, changed rows
    replaced in place); new images become new shards at the end; every other shard stays. The new
    manifest is renamed into place, then the replaced shards are deleted.
    """
    folder = db.path
    old_row = {p: j for j, p in enumerate(db.paths)}
    todo = np.flatnonzero(keep < 0)
    replaces = np.array([old_row.get(paths[i], -1) for i in todo], dtype=np.int64)  # the old row, -1: new image
    fate = np.full(len(db), -2, dtype=np.int64)  # per old row: -2 removed, -1 kept, >= 0 its vector in staging
    fate[keep[keep >= 0]] = -1
    fate[replaces[replaces >= 0]] = np.flatnonzero(replaces >= 0)
    staging = folder / f".update-{os.getpid()}.npy"
    listed = {shard.name for shard in db.shards}
    try:
        _embed_into(staging, [paths[i] for i in todo], db.dim, embed)
        fresh = np.load(staging, mmap_mode="r", allow_pickle=False) if len(todo) else np.zeros((0, db.dim), np.float32)
        plan = _Rewrite(db, fate, fresh, {int(j): int(i) for i, j in zip(todo, replaces) if j >= 0},
                        labels, stamps, budget)
        shards, done = plan.shards()
        new_rows = [int(i) for i, j in zip(todo, replaces) if j < 0]
        shards += plan.new_shards(new_rows, np.flatnonzero(replaces < 0), paths)
        done.added = len(shards) - done.kept - done.rewritten
        record = manifest_record(folder, shards, db.dim, db.shard_rows, plan.next_shard, model, root)
        atomic_write_text(folder / MANIFEST, json.dumps(record) + "\n")
        listed = {name for name, _ in shards}
        del fresh
    finally:
        staging.unlink(missing_ok=True)
        remove_unlisted(folder, listed)  # the replaced shards, or (failed) the ones this update wrote
    return done


def _embed_into(staging: Path, paths: list[str], dim: int, embed) -> None:
    """Embed ``paths`` in order into the float32 .npy ``staging``, one batch at a time."""
    if not paths:
        return
    with builtins.open(staging, "wb", buffering=1 << 22) as f:
        f.write(_npy_header(len(paths), dim))
        written = 0
        for block in embed(paths):
            f.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
            written += len(block)
    if written != len(paths):
        raise ValueError(f"embedded {written} of {len(paths)} images")


class _Rewrite:
    """The shards of an update (see update_folder): which stay, which are rewritten, which are new."""

    def __init__(self, db: ShardedDatabase, fate: np.ndarray, fresh: np.ndarray, replaced: dict[int, int],
                 labels: Sequence[str], stamps: np.ndarray, budget: Budget):
        self.db, self.fate, self.fresh, self.replaced = db, fate, fresh, replaced
        self.labels, self.stamps, self.budget = labels, stamps, budget
        self.next_shard = int(db.manifest["next_shard"])
        self.old_stamps = db.stamps

    def _take_name(self) -> str:
        name = shard_name(self.next_shard)
        self.next_shard += 1
        return name

    def shards(self) -> tuple[list[tuple[str, int]], FolderUpdate]:
        """(name, rows) of the old shards, in order: kept as they are, rewritten, or dropped."""
        out, done = [], FolderUpdate()
        for shard in self.db.shards:
            fate = self.fate[shard.start:shard.start + shard.rows]
            if (fate == -1).all():
                out.append((shard.name, shard.rows))
                done.kept += 1
            elif (fate == -2).all():
                done.dropped += 1
            else:
                out.append(self._rewrite(shard, fate))
                done.rewritten += 1
        return out, done

    def _rewrite(self, shard: Shard, fate: np.ndarray) -> tuple[str, int]:
        """The rows of ``shard`` that stay (kept or replaced), as a new shard."""
        rows = shard.start + np.flatnonzero(fate != -2)  # old rows that stay, in order
        paths = [self.db.paths[j] for j in rows]
        new_of = [self.replaced.get(int(j)) for j in rows]  # the new row (plan order) of a changed image
        labels = [self.db.labels[j] if i is None else self.labels[i] for j, i in zip(rows, new_of)]
        stamps = np.array([self.old_stamps[j] if i is None else self.stamps[i] for j, i in zip(rows, new_of)],
                          dtype=np.int64).reshape(len(rows), 2)

        def vectors() -> Iterator[np.ndarray]:
            step = self.budget.block_rows(self.db.dim)
            for a in range(0, len(rows), step):
                part = rows[a:a + step]
                block = self.db[part]
                changed = self.fate[part] >= 0
                block[changed] = self.fresh[self.fate[part][changed]]
                yield block

        return self._write(paths, labels, stamps, vectors())

    def new_shards(self, new_rows: list[int], fresh_rows: np.ndarray, paths: Sequence[str]) -> list[tuple[str, int]]:
        """New images (plan rows ``new_rows``, their vectors at ``fresh_rows`` of the staging file) as shards."""
        out, size = [], self.db.shard_rows
        for a in range(0, len(new_rows), size):
            rows, at = new_rows[a:a + size], fresh_rows[a:a + size]
            step = self.budget.block_rows(self.db.dim)
            blocks = (np.array(self.fresh[at[b:b + step]]) for b in range(0, len(at), step))
            out.append(self._write([paths[i] for i in rows], [self.labels[i] for i in rows],
                                   np.asarray(self.stamps, dtype=np.int64)[rows], blocks))
        return out

    def _write(self, paths, labels, stamps, blocks: Iterable[np.ndarray]) -> tuple[str, int]:
        name = self._take_name()
        out = Output(self.db.path, paths, labels, self.db.dim, images={"root": "", "stamps": stamps},
                     shard_rows=len(paths))
        with RowWriter(out, 0, len(paths), [(name, 0, len(paths))]) as writer:
            for block in blocks:
                writer.write(block)
        return name, len(paths)

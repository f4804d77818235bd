"""Decode every image once into a memory-mapped uint8 array on disk.

``cache_images(paths, size)`` returns a read-only ``np.memmap`` uint8
[N, size, size, 3] whose row i is ``paths[i]`` decoded as RGB and resized to
size x size. The array lives in the cache folder (``cache_dir``, else
``$DEEP_RANK_CACHE_DIR``, else ``~/.cache/deep-ranking``) as two files:

* ``<key>.u8``: the raw rows, C order;
* ``<key>.json``: ``{"format", "version", "n", "size"}``, written last, so its
  presence marks a complete entry.

The key is the SHA-1 of the format version, ``size`` and, for every path in
order, its absolute path, byte size and modification time (ns): a different
file list, order or a modified file gives a new entry; stale entries are never
reused. Both files are built under temporary names and moved into place with
``os.replace``, so a crash never leaves a corrupt entry behind.

Every image is decoded before any work starts; if some cannot be read
(missing, truncated, not an image) the call fails with
:class:`preprocessing.UnreadableImageError` giving the count and the first paths.
Nothing is skipped silently.

The cache has a size budget (``--cache-budget``, else ``$DEEP_RANK_CACHE_BUDGET``,
else ``auto``: half of what the cache folder's disk has free plus what the cache
holds already), decided in ``cache_images``, which every stage calls: a new entry that does
not fit beside the others evicts the least recently used complete entries (none
used in the last ``EVICT_GRACE_S`` seconds, which a running stage may still map);
an entry larger than the budget is not written at all, and the stage gets a
:class:`StreamedImages` instead: the same rows, decoded on demand, in the
DataLoader's worker processes (``loader_workers``), with every file's header
checked before any work starts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from deepranking import cli, file_io
from deepranking.preprocessing import PIXELS_VERSION, UnreadableImageError, check_image, decode_resized

CACHE_FORMAT = "deep-ranking-image-cache"
# Bump when the decoded pixels would change (resampling, colour conversion, ...).
CACHE_VERSION = 1
CACHE_ENV = "DEEP_RANK_CACHE_DIR"
BUDGET_ENV = "DEEP_RANK_CACHE_BUDGET"
# The auto budget: this fraction of (free space on the cache's disk + bytes the cache holds): the
# cache may take half the room left, so a stage never fills the disk other programs need.
AUTO_BUDGET_FRACTION = 0.5
AUTO_BUDGET = "auto"  # --cache-budget auto: that fraction, even when $DEEP_RANK_CACHE_BUDGET says otherwise
# Entries used (opened or written) this recently are never evicted: another stage may map them.
EVICT_GRACE_S = 600.0
# A temporary file younger than this is never taken for an orphan: its build may not have locked it yet.
ORPHAN_MIN_AGE_S = 60.0
# Worker processes that decode a streamed data set when the caller asked for fewer.
MAX_STREAM_WORKERS = 8
# Images opened (header only) by choose_cache_size.
SIZE_SAMPLE = 64
# Bad paths shown in the error message.
MAX_LISTED = 10
# Images decoded per thread-pool task (amortises task overhead on 64 px images).
_CHUNK = 64


def default_cache_dir() -> Path:
    """``$DEEP_RANK_CACHE_DIR`` if set, else ``~/.cache/deep-ranking``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "deep-ranking"


def cache_key(paths: Sequence[str], size: int) -> tuple[str, list[str]]:
    """(sha1 hex key, missing paths). Missing files enter the key as ``missing``."""
    h = hashlib.sha1()
    h.update(f"{CACHE_FORMAT}\0{CACHE_VERSION}\0{PIXELS_VERSION}\0{size}\0{len(paths)}\0".encode())
    missing = []
    for p in paths:
        ap = os.path.abspath(p)
        try:
            st = os.stat(ap)
            h.update(f"{ap}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            missing.append(str(p))
            h.update(f"{ap}\0missing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest(), missing


def _entry_files(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key}.u8", cache_dir / f"{key}.json"


def _open_entry(cache_dir: Path, key: str, n: int, size: int) -> np.memmap | None:
    """The complete entry ``key`` as a read-only memmap, or None if absent/incomplete."""
    data, header = _entry_files(cache_dir, key)
    try:
        meta = json.loads(header.read_text(encoding="utf-8"))
        ok = (meta.get("format") == CACHE_FORMAT and meta.get("version") == CACHE_VERSION
              and meta.get("n") == n and meta.get("size") == size
              and data.stat().st_size == n * size * size * 3)
    except (OSError, ValueError, AttributeError):
        return None
    if not ok:
        return None
    try:
        return np.memmap(data, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
    except OSError:  # evicted by another stage between the header and the map
        return None


def _unreadable_error(failures: list[tuple[int, str]], total: int) -> UnreadableImageError:
    failures.sort()
    shown = "\n  ".join(msg for _, msg in failures[:MAX_LISTED])
    more = f"\n  ... and {len(failures) - MAX_LISTED} more" if len(failures) > MAX_LISTED else ""
    return UnreadableImageError(
        f"{len(failures)} of {total} images cannot be read (remove or replace them and run again):"
        f"\n  {shown}{more}")


def _for_each_image(n: int, work_one, desc: str, progress: bool, num_workers: int | None) -> list[tuple[int, str]]:
    """Run ``work_one(i)`` for i in range(n) in ``num_workers`` threads, chunk by chunk; returns
    (index, message) of every UnreadableImageError, in index order."""
    workers = num_workers or min(8, (os.cpu_count() or 1) + 1)

    def work(lo: int) -> list[tuple[int, str]]:
        bad = []
        for i in range(lo, min(lo + _CHUNK, n)):
            try:
                work_one(i)
            except UnreadableImageError as exc:
                bad.append((i, str(exc)))
        return bad

    failures: list[tuple[int, str]] = []
    with cli.progress(total=n, desc=desc, unit="img", enabled=progress, leave=False) as bar:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for lo, bad in zip(range(0, n, _CHUNK), pool.map(work, range(0, n, _CHUNK))):
                failures.extend(bad)
                bar.update(min(_CHUNK, n - lo))
    return failures


def _decode_into(out: np.ndarray, paths: Sequence[str], size: int, progress: bool,
                 num_workers: int | None) -> list[tuple[int, str]]:
    """Decode ``paths`` into ``out`` [N, size, size, 3]; return (index, message) of every failure."""
    def decode(i: int) -> None:
        out[i] = decode_resized(paths[i], size)

    return _for_each_image(len(paths), decode, f"decoding images ({size}px)", progress, num_workers)


def cache_images(paths: Sequence[str], size: int, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True, num_workers: int | None = None,
                 budget: int | str | None = None) -> np.ndarray | StreamedImages:
    """uint8 rows [N, size, size, 3]: row i is ``paths[i]`` decoded and resized.

    Served from the cache when a complete entry for the same file list, sizes
    and modification times exists; otherwise every image is decoded (in
    ``num_workers`` threads) into a new entry, read-only memmap returned. Raises
    UnreadableImageError listing the unreadable images (missing files included)
    before returning anything.

    ``budget``: bytes the cache folder may hold, or AUTO_BUDGET (None: ``$DEEP_RANK_CACHE_BUDGET``,
    else auto). A new entry first evicts least recently used entries to fit; one that cannot
    fit is not written: the result is then a :class:`StreamedImages` (every header checked).
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    paths = [str(p) for p in paths]
    n = len(paths)
    if n == 0:
        empty = np.zeros((0, size, size, 3), dtype=np.uint8)
        empty.flags.writeable = False
        return empty
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key, missing = cache_key(paths, size)
    if not missing:
        hit = _open_entry(cache_dir, key, n, size)
        if hit is not None:
            _mark_used(_entry_files(cache_dir, key)[1])
            return hit
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cli.UserError(f"cannot create image cache folder {cache_dir}: {exc}")
    nbytes = n * size * size * 3
    # A stage that will fail (missing files) must not evict other entries first.
    no_room = make_room(cache_dir, nbytes, budget, evict=not missing)
    if no_room is not None:
        print(f"note: caching these {n} images at {size} px needs {format_size(nbytes)}, {no_room} in {cache_dir} "
              f"(--cache-budget or ${BUDGET_ENV}): decoding them on the fly instead, in worker processes",
              file=sys.stderr)
        check_headers(paths, progress, num_workers)
        return StreamedImages(paths, size)
    check_free_space(cache_dir, nbytes)
    return _build_entry(cache_dir, key, paths, size, progress, num_workers)


def _build_entry(cache_dir: Path, key: str, paths: list[str], size: int, progress: bool,
                 num_workers: int | None) -> np.memmap:
    """Decode every image into a new complete entry ``key`` (temporary name, then os.replace)."""
    n = len(paths)
    data, header = _entry_files(cache_dir, key)
    nbytes = n * size * size * 3
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir)
    except OSError as exc:
        raise cli.UserError(f"cannot write to the image cache folder {cache_dir}: {cli.os_reason(exc)}")
    tmp = Path(tmp_name)
    try:
        _lock(fd)  # held until fd closes (or the process dies): remove_orphans leaves a live build alone
        reserve(fd, nbytes, cache_dir)
        out = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=(n, size, size, 3))
        failures = _decode_into(out, paths, size, progress, num_workers)
        if failures:
            del out
            raise _unreadable_error(failures, n)
        out.flush()
        del out
        os.replace(tmp, data)
    finally:
        if fd is not None:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()
    # The header goes last: its presence marks the entry complete.
    file_io.atomic_write_text(header, json.dumps(
        {"format": CACHE_FORMAT, "version": CACHE_VERSION, "n": n, "size": size}))
    return np.memmap(data, dtype=np.uint8, mode="r", shape=(n, size, size, 3))


# ----------------------------------------------------------------------------
# The size budget: least recently used entries go first; an entry over budget streams
# ----------------------------------------------------------------------------


def parse_size(text: str) -> int | str:
    """Bytes from ``20G``, ``512M``, ``1.5T``, ``300k`` or ``123456`` (decimal units; a trailing B is
    allowed); AUTO_BUDGET for ``auto``. ValueError for anything else, or a negative size."""
    value = str(text).strip().lower()
    if value == AUTO_BUDGET:
        return AUTO_BUDGET
    if value.endswith("b"):
        value = value[:-1]
    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}.get(value[-1:], None)
    number = float(value[:-1] if scale else value)  # ValueError when not a number
    nbytes = number * (scale or 1)
    if not np.isfinite(nbytes) or nbytes < 0:
        raise ValueError(f"not a size: {text!r}")
    return int(nbytes)


def cache_budget_flag(value: str) -> int | str:
    """argparse type of --cache-budget: a size (``20G``, ``0`` = never cache) or ``auto``."""
    try:
        return parse_size(value)
    except ValueError:
        raise cli.arg_error(f"expected a size such as 20G, 500M or 0, or auto; got {value!r}")


def resolve_budget(cache_dir: Path, budget: int | str | None, held: int) -> int:
    """The budget in bytes: ``budget`` (bytes, or AUTO_BUDGET), else (None) ``$DEEP_RANK_CACHE_BUDGET``;
    auto is AUTO_BUDGET_FRACTION of (the disk's free space + ``held``, the bytes the cache's entries take now)."""
    if budget is None or isinstance(budget, str):  # the variable, or a caller's "20G" (the flag parsed its own)
        setting, where = ((os.environ.get(BUDGET_ENV, AUTO_BUDGET), f"${BUDGET_ENV}=") if budget is None
                          else (budget, "image cache budget "))
        try:
            budget = parse_size(setting)
        except ValueError:
            raise cli.UserError(f"{where}{setting!r} is not a size (e.g. 20G, 500M, 0 or auto)")
    if budget != AUTO_BUDGET:
        return budget
    try:
        free = shutil.disk_usage(cache_dir).free
    except OSError:
        return sys.maxsize  # unknown: check_free_space and reserve() still fail cleanly
    return int(AUTO_BUDGET_FRACTION * (free + held))


def cache_entries(cache_dir: Path) -> list[tuple[float, int, str]]:
    """(last use, bytes, key) of every complete entry in the folder, least recently used first."""
    entries = []
    for header in cache_dir.glob("*.json"):
        key = header.stem
        data = _entry_files(cache_dir, key)[0]
        try:
            entries.append((header.stat().st_mtime, data.stat().st_size, key))
        except OSError:  # incomplete, or removed meanwhile
            continue
    return sorted(entries)


def _lock(fd: int, wait: bool = True) -> bool:
    """An exclusive advisory lock on an open file (flock; the OS drops it when the process dies).
    True when taken; without fcntl (Windows) nothing is locked and False is returned."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def remove_orphans(cache_dir: Path) -> list[tuple[Path, int]]:
    """Remove what killed builds left: a ``.<key>.*.tmp`` no live build holds locked (and at least
    ORPHAN_MIN_AGE_S old), and a ``<key>.u8``
    without its header untouched for EVICT_GRACE_S (its build died between the two renames, or an
    eviction could not remove it). Returns (path, bytes) of each removed file; errors leave a file be."""
    removed, now = [], time.time()
    for tmp in cache_dir.glob(".*.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if now - st.st_mtime < ORPHAN_MIN_AGE_S or not _lock(fd, wait=False):
                continue  # a build in progress (just created, or holding its lock), or no locks here: never guess
            tmp.unlink()
        except OSError:
            continue
        finally:
            os.close(fd)
        removed.append((tmp, st.st_size))
    for data in cache_dir.glob("*.u8"):
        try:
            st = data.stat()
            if _entry_files(cache_dir, data.stem)[1].exists() or now - st.st_mtime < EVICT_GRACE_S:
                continue
            data.unlink()
        except OSError:
            continue
        removed.append((data, st.st_size))
    return removed


def make_room(cache_dir: Path, nbytes: int, budget: int | str | None, evict: bool = True) -> str | None:
    """Evict least recently used entries until ``nbytes`` more fit the budget; returns None when they do,
    else why not (an entry larger than the budget evicts nothing: it will not be written anyway).
    Files that killed builds left (remove_orphans) go first. ``evict=False``: only say whether they fit
    as things are."""
    for path, size in remove_orphans(cache_dir) if evict else []:
        print(f"note: removed {path.name} ({format_size(size)}) from the image cache, left by a build that did "
              "not finish", file=sys.stderr)
    entries = cache_entries(cache_dir)
    held = sum(size for _, size, _ in entries)
    limit = resolve_budget(cache_dir, budget, held)
    if nbytes > limit:
        return f"over the image cache budget of {format_size(limit)}"
    now = time.time()
    for used, size, key in entries if evict else []:
        if held + nbytes <= limit:
            break
        data, header = _entry_files(cache_dir, key)
        try:
            if now - max(used, header.stat().st_mtime) < EVICT_GRACE_S:
                continue  # used recently (looked at again now: another stage may have just opened it)
            header.unlink()  # first: without its header the entry is never opened again
            data.unlink()
        except OSError:
            continue
        held -= size
        print(f"note: image cache over its budget of {format_size(limit)}: removed the least recently used entry "
              f"{key} ({format_size(size)})", file=sys.stderr)
    if held + nbytes > limit:
        return (f"and the image cache budget of {format_size(limit)} has {format_size(max(limit - held, 0))} left "
                f"beside the entries it could not remove (used in the last {EVICT_GRACE_S / 60:.0f} minutes, "
                "or not removable)")
    return None


def mark_in_use(images) -> None:
    """Refresh a cache entry's last use (call it now and then while reading ``images`` for long: each
    epoch), so no other stage evicts it meanwhile; streamed images and plain arrays are left alone."""
    filename = getattr(images, "filename", None) if isinstance(images, np.memmap) else None
    if filename:
        _mark_used(Path(filename).with_suffix(".json"))


def _mark_used(header: Path) -> None:
    """Set the entry's last use (its header's modification time) to now; a read-only cache stays as it is."""
    try:
        os.utime(header)
    except OSError:
        pass


class StreamedImages:
    """uint8 rows [N, size, size, 3] decoded on demand: what cache_images gives over its budget.

    Indexing with an int, a slice or an int array decodes those images now (decode_resized:
    the very pixels a cache entry would hold). Pickled as its path list, so each DataLoader
    worker process decodes its own batches; :func:`loader_workers` sizes those workers.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: Sequence[str], size: int):
        self.paths = [str(p) for p in paths]
        self.size = int(size)
        self.shape = (len(self.paths), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)) or (isinstance(index, np.ndarray) and index.ndim == 0):
            return decode_resized(self.paths[int(index)], self.size)
        if isinstance(index, slice):
            rows = range(*index.indices(len(self)))
        else:
            index = np.asarray(index)
            rows = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)  # a mask, as numpy
        out = np.empty((len(rows), self.size, self.size, 3), dtype=np.uint8)
        for j, i in enumerate(rows):
            out[j] = decode_resized(self.paths[i], self.size)
        return out

    def take(self, rows) -> "StreamedImages":
        """The images ``rows`` (int array), still streamed."""
        return StreamedImages([self.paths[i] for i in np.asarray(rows, dtype=np.int64)], self.size)


def subset(images, rows: np.ndarray):
    """Rows ``rows`` of a cache (an array) or of StreamedImages (streamed again, not decoded now)."""
    return images.take(rows) if isinstance(images, StreamedImages) else images[rows]


def loader_workers(images, requested: int) -> int:
    """DataLoader worker processes for ``images``: as requested for a cache (workers only gather rows);
    streamed images decode in the workers, so at least min(MAX_STREAM_WORKERS, CPU cores)."""
    if isinstance(images, StreamedImages):
        return max(int(requested), min(MAX_STREAM_WORKERS, os.cpu_count() or 1))
    return int(requested)


def check_headers(paths: Sequence[str], progress: bool = True, num_workers: int | None = None) -> None:
    """Open every image's header (no decoding) and raise UnreadableImageError listing all that fail:
    streamed images are checked, like a cache's, before any work starts."""
    failures = _for_each_image(len(paths), lambda i: check_image(paths[i]), "checking images", progress,
                               num_workers)
    if failures:
        raise _unreadable_error(failures, len(paths))


def format_size(nbytes: int) -> str:
    """Bytes in decimal units, three significant figures: 2.3 kB, 19.7 GB (999,999 B: 1 MB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= 0.9995 * scale:  # what rounds to 1,000 of the unit below is 1 of this one
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} B"


def check_free_space(cache_dir: Path, nbytes: int) -> None:
    """Refuse, before decoding anything, an entry the cache folder's disk cannot hold."""
    try:
        free = shutil.disk_usage(cache_dir).free
    except OSError:
        return  # unknown: reserve() still fails cleanly
    if nbytes > free:
        raise cli.UserError(f"the image cache needs {format_size(nbytes)} in {cache_dir} but only {format_size(free)} are free "
                            f"there: free some space, or point ${CACHE_ENV} (gen_embeddings.py: --cache-dir) "
                            "at a larger disk")


def reserve(fd: int, nbytes: int, cache_dir: Path) -> None:
    """Give the entry its disk blocks now: a full disk then fails here with a message, never later as a
    SIGBUS while the memory map is written (a sparse file only finds out when a page is flushed)."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except AttributeError:  # no posix_fallocate (macOS): a sparse file, as before
        os.ftruncate(fd, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # the file system cannot preallocate
            os.ftruncate(fd, nbytes)
            return
        raise cli.UserError(f"cannot reserve {format_size(nbytes)} for the image cache in {cache_dir}: "
                            f"{cli.os_reason(exc)}; free some space or point ${CACHE_ENV} at a larger disk")


def choose_cache_size(paths: Sequence[str], image_size: int) -> int:
    """Side of the cached squares: the images' own size if they share one, else ``image_size``.

    Opens (header only) an evenly spaced, deterministic sample of up to 64
    images; if all are square with the same side s <= image_size, returns s
    (no resize at decode time; the model resizes on the device), else
    ``image_size``. Unopenable files are left for cache_images to report.
    """
    n = len(paths)
    if n == 0:
        return int(image_size)
    idx = np.unique(np.linspace(0, n - 1, min(SIZE_SAMPLE, n)).round().astype(np.int64))
    sizes = set()
    for i in idx:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with file_io.open_regular(paths[i]) as f, Image.open(f) as im:  # never a FIFO's open
                    sizes.add(im.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return int(image_size)  # cache_images reports the file by path
        if len(sizes) > 1:
            return int(image_size)
    (w, h), = sizes
    return int(w) if w == h and w <= image_size else int(image_size)

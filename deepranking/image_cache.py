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
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from deepranking import cli
from deepranking.preprocessing import PIXELS_VERSION, UnreadableImageError, decode_resized

CACHE_FORMAT = "deep-ranking-image-cache"
# Bump when the decoded pixels would change (resampling, colour conversion, ...).
CACHE_VERSION = 1
CACHE_ENV = "DEEP_RANK_CACHE_DIR"
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
    return np.memmap(data, dtype=np.uint8, mode="r", shape=(n, size, size, 3))


def _unreadable_error(failures: list[tuple[int, str]], total: int) -> UnreadableImageError:
    failures.sort()
    shown = "\n  ".join(msg for _, msg in failures[:MAX_LISTED])
    more = f"\n  ... and {len(failures) - MAX_LISTED} more" if len(failures) > MAX_LISTED else ""
    return UnreadableImageError(
        f"{len(failures)} of {total} images cannot be read (remove or replace them and run again):"
        f"\n  {shown}{more}")


def _decode_into(out: np.ndarray, paths: Sequence[str], size: int, progress: bool,
                 num_workers: int | None) -> list[tuple[int, str]]:
    """Decode ``paths`` into ``out`` [N, size, size, 3]; return (index, message) of every failure."""
    n = len(paths)
    workers = num_workers or min(8, (os.cpu_count() or 1) + 1)

    def work(lo: int) -> list[tuple[int, str]]:
        bad = []
        for i in range(lo, min(lo + _CHUNK, n)):
            try:
                out[i] = decode_resized(paths[i], size)
            except UnreadableImageError as exc:
                bad.append((i, str(exc)))
        return bad

    failures: list[tuple[int, str]] = []
    with cli.progress(total=n, desc=f"decoding images ({size}px)", unit="img", enabled=progress,
                      leave=False) as bar:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for lo, bad in zip(range(0, n, _CHUNK), pool.map(work, range(0, n, _CHUNK))):
                failures.extend(bad)
                bar.update(min(_CHUNK, n - lo))
    return failures


def cache_images(paths: Sequence[str], size: int, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True, num_workers: int | None = None) -> np.ndarray:
    """Read-only uint8 [N, size, size, 3]: row i is ``paths[i]`` decoded and resized.

    Served from the cache when a complete entry for the same file list, sizes
    and modification times exists; otherwise every image is decoded (in
    ``num_workers`` threads) into a new entry. Raises UnreadableImageError
    listing the unreadable images (missing files included) before returning
    anything.
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
            return hit
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cli.UserError(f"cannot create image cache folder {cache_dir}: {exc}")
    data, header = _entry_files(cache_dir, key)
    nbytes = n * size * size * 3
    check_free_space(cache_dir, nbytes)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir)
    except OSError as exc:
        raise cli.UserError(f"cannot write to the image cache folder {cache_dir}: {cli.os_reason(exc)}")
    tmp = Path(tmp_name)
    try:
        reserve(fd, nbytes, cache_dir)
        os.close(fd)
        fd = None
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
    cli.atomic_write_text(header, json.dumps(
        {"format": CACHE_FORMAT, "version": CACHE_VERSION, "n": n, "size": size}))
    return np.memmap(data, dtype=np.uint8, mode="r", shape=(n, size, size, 3))


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def check_free_space(cache_dir: Path, nbytes: int) -> None:
    """Refuse, before decoding anything, an entry the cache folder's disk cannot hold."""
    try:
        free = shutil.disk_usage(cache_dir).free
    except OSError:
        return  # unknown: reserve() still fails cleanly
    if nbytes > free:
        raise cli.UserError(f"the image cache needs {_gb(nbytes)} in {cache_dir} but only {_gb(free)} are free "
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
        raise cli.UserError(f"cannot reserve {_gb(nbytes)} for the image cache in {cache_dir}: "
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
                with Image.open(paths[i]) as im:
                    sizes.add(im.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return int(image_size)  # cache_images reports the file by path
        if len(sizes) > 1:
            return int(image_size)
    (w, h), = sizes
    return int(w) if w == h and w <= image_size else int(image_size)

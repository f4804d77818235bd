"""Files the programs read and write: input and output path checks, and safe output.

* :func:`check_input_file`, :func:`first_long_row` — an input that is missing, not a file, empty,
  or a CSV row with too many cells becomes a one-line UserError.
* :func:`check_output_path`, :func:`probe_writable` — never clobber without ``--force``, and prove
  an output writable before any long work.
* :func:`atomic_path`, :func:`atomic_write_text` — one file replaced all or nothing;
  :func:`atomic_paths` — several files that belong together; :func:`staged_outputs` — a set of
  outputs in a folder. Renames run with SIGINT/SIGTERM held (:func:`signals_held`).
* :func:`folder_lock` — one run per output folder.

Every file is created with the user's umask (:data:`FILE_MODE`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from deepranking.cli import UserError, in_main_thread, os_reason, warn


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files are created with the user's umask, like any other tool's (mkstemp alone gives 0600).
FILE_MODE = 0o666 & ~_current_umask()


def first_long_row(csv_path: str | os.PathLike, n_columns: int) -> int:
    """1-based line of the first row with more than ``n_columns`` cells (for an error message
    about a CSV pandas refused; 2 if none is found)."""
    import csv

    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        for row in reader:
            if len(row) > n_columns:
                return reader.line_num
    return 2


def check_input_file(path: str | os.PathLike, what: str, allow_empty: bool = True) -> Path:
    """Return ``path`` as a Path, or raise UserError if it is not an existing (non-empty) file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_file():
        raise UserError(f"{what} is not a file: {p}")
    if not allow_empty and p.stat().st_size == 0:
        raise UserError(f"{what} is empty: {p}")
    return p


def check_output_path(path: str | os.PathLike, force: bool, what: str = "output") -> Path:
    """Refuse to clobber an existing output unless ``force`` is set."""
    p = Path(path)
    if p.exists() and not force:
        raise UserError(f"{what} already exists: {p} (use --force to overwrite)")
    if p.exists() and p.is_dir():
        raise UserError(f"{what} is a directory: {p}")
    probe_writable(p, what)
    return p


def probe_writable(path: Path, what: str = "output") -> None:
    """Prove, before any long work, that ``path`` can be created: write and delete a temp file in its
    nearest existing folder (the folders in between are made later, by the write itself)."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(folder))
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {what} {path}: {os_reason(exc)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place on success.

    A crash or an exception leaves any existing ``path`` untouched and removes
    the partial temporary file (the timm ``CheckpointSaver`` pattern).
    """
    final = Path(path)
    try:
        if final.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(final))
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise UserError(f"cannot write {final}: {os_reason(exc)}")
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, final)
    except OSError as exc:
        if exc.filename not in (None, str(tmp), str(final)):
            raise  # some other file: let its own message through
        raise UserError(f"cannot write {final}: {os_reason(exc)}")
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_paths(paths: list[str | os.PathLike], suffix: str = ".tmp") -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together: all or none of them are replaced.

    Yields one temporary path beside each final path. Everything slow (writing the temp
    files) happens inside the ``with`` block; an exception or Ctrl-C there leaves every
    existing file untouched and removes the temporaries. On success the files are
    renamed into place, in the given order, with SIGINT/SIGTERM held (:func:`signals_held`),
    so a Ctrl-C or ``kill`` cannot land between two renames; only a ``kill -9`` (or a
    power cut) within those few microseconds can leave some files new and others old —
    readers that care detect that from what the files record (embedding_io: the data
    stamp in each companion, the model fingerprint across files).
    """
    finals = [Path(p) for p in paths]
    if len({str(p.resolve()) for p in finals}) != len(finals):
        raise ValueError(f"atomic_paths: the same file twice in {finals}")
    tmps: list[Path] = []
    try:
        for final in finals:
            if final.is_dir():
                raise IsADirectoryError(21, "Is a directory", str(final))
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
            os.close(fd)
            tmps.append(Path(tmp_name))
    except OSError as exc:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {finals[len(tmps)]}: {os_reason(exc)}")
    try:
        yield list(tmps)
        for tmp in tmps:
            os.chmod(tmp, FILE_MODE)
        with signals_held():
            for tmp, final in zip(tmps, finals):
                try:
                    os.replace(tmp, final)
                except OSError as exc:
                    raise UserError(f"cannot write {final}: {os_reason(exc)}")
    except OSError as exc:
        if exc.filename is not None and exc.filename not in {str(t) for t in tmps}:
            raise
        raise UserError(f"cannot write {', '.join(str(f) for f in finals)}: {os_reason(exc)}")
    finally:
        for tmp in tmps:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Write a set of outputs all or none: into a staging folder inside ``folder``, then moved into place.

    The moves (renames within one file system, ``last`` — the file that marks the set complete —
    after the others) happen with SIGINT/SIGTERM held; any failure before them leaves ``folder`` as it
    was and removes the staging folder.
    """
    import shutil

    folder = Path(folder)
    try:  # making the staging folder is the writability check
        folder.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    except OSError as exc:
        raise UserError(f"cannot write {folder}: {os_reason(exc)}")
    try:
        yield stage
        files = sorted(stage.iterdir(), key=lambda p: (p.name == last, p.name))
        for f in files:  # a rename onto a folder fails: find it before the first rename, not midway
            if (folder / f.name).is_dir() and not (folder / f.name).is_symlink():
                raise UserError(f"cannot write {folder / f.name}: Is a directory (nothing of this run was kept "
                                f"there)")
        with signals_held():
            for f in files:
                os.chmod(f, FILE_MODE)
                os.replace(f, folder / f.name)
    except OSError as exc:
        raise UserError(f"cannot write {folder}: {os_reason(exc)} (nothing of this run was kept there)")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for a few system calls; a signal that came meanwhile acts after.

    Only in the main thread (elsewhere signals cannot be handled and nothing changes).
    A ``kill -9`` cannot be held: callers keep the held part down to a few renames.
    """
    import signal

    if not in_main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
        except (ValueError, OSError):  # not settable here
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught[:1]:
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, None)  # default SIGINT handler: raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "--output-dir") -> Iterator[Path]:
    """One run per output folder: ``folder/.lock`` holds the owner's pid and host.

    A second run fails at once with a clear line; a lock left by a dead process on this
    host is taken over (with a warning). Creating the lock also proves the folder writable.
    """
    import socket

    folder = Path(folder)
    lock = folder / ".lock"
    host = socket.gethostname()
    mine = f"{os.getpid()} {host}\n"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {what} {folder}: {os_reason(exc)}")
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and owner[1] == host and not _alive(owner[0]):
                warn(f"taking over {lock}: its run (pid {owner[0]}) is no longer running")
                lock.unlink(missing_ok=True)
                continue
            who = f"pid {owner[0]} on {owner[1]}" if owner else "unknown owner"
            raise UserError(f"{what} {folder} is in use by another run ({who}); wait for it to finish, "
                            f"or delete {lock} if that run is gone")
        except OSError as exc:
            raise UserError(f"cannot write {lock}: {os_reason(exc)}")
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        break
    else:
        raise UserError(f"cannot take {lock}: another run keeps taking it")
    try:
        yield lock
    finally:
        try:
            if lock.read_text() == mine:
                lock.unlink()
        except OSError:
            pass


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

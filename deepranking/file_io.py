"""Files the programs read and write: input and output path checks, and safe output.

* :func:`check_input_file`, :func:`first_long_row` — an input that is missing, not a file, empty,
  or a CSV row with too many cells becomes a one-line UserError.
* :func:`check_output_path`, :func:`probe_writable` — never clobber without ``--force``, and prove
  an output writable before any long work.
* :func:`atomic_path`, :func:`atomic_write_text` — one file replaced all or nothing;
  :func:`atomic_paths` — several files that belong together; :func:`staged_outputs` — a set of
  outputs in a folder. Renames run with SIGINT/SIGTERM held (:func:`signals_held`).
* :func:`folder_lock` — one run per output folder.
* :func:`open_regular`, :func:`regular_file_problem` — inputs are read only from regular files (and
  links to one): opening a FIFO waits for a writer forever, a device never ends.
* :func:`make_temporary`, :func:`stale_temporaries`, :func:`remove_stale_temporaries` — every
  temporary is named ``.<output name>.<pid>.<random><suffix>`` beside its output, and the next write
  of that output removes the ones whose process is gone (a kill -9, a power cut).

Every file is created with the user's umask (:data:`FILE_MODE`).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

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
    """Return ``path`` as a Path, or raise UserError if it is not an existing (non-empty), readable
    regular file; the message names what it is instead (missing, a folder, a FIFO, unreadable, ...)."""
    p = Path(path)
    problem = regular_file_problem(p)
    if problem is not None:
        raise UserError(f"{what} {problem}: {p}")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} cannot be read (Permission denied): {p}")
    if not allow_empty and p.stat().st_size == 0:
        raise UserError(f"{what} is empty: {p}")
    return p


_SPECIAL_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_file_kind(mode: int) -> str:
    """What a file of ``st_mode`` is, for a message: "a regular file", "a folder", "a FIFO", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a regular file (symbolic links followed); else what is wrong, worded to
    follow the file's description: "not found", "is not a file" (a folder), "is a FIFO, not a
    regular file", "is a symbolic link to a missing file", "cannot be read (<reason>)".
    Only stat is called: nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a symbolic link to a missing file" if os.path.islink(path) else "not found"
    except NotADirectoryError:  # a file where the path needs a folder
        return "not found"
    except (OSError, ValueError) as exc:  # a link loop, a name too long, a folder on the way that is a file
        return f"cannot be read ({os_reason(exc) if isinstance(exc, OSError) else exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is not a file"
    return f"is {special_file_kind(mode)}, not a regular file"


class NotRegularFileError(OSError):
    """An input that is not a regular file (a FIFO, socket, device or folder): it is never read.
    ``strerror`` says what it is ("a FIFO, not a regular file"), and so does ``str()``."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading (binary) only if it is a regular file, symbolic links followed;
    NotRegularFileError (an OSError whose message says what it is) otherwise.

    The file is opened without blocking and checked on the open descriptor, so a FIFO (whose
    open would wait for a writer forever) never blocks, even one put in place after a listing.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(None, f"{special_file_kind(mode)}, not a regular file", os.fspath(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_output_path(path: str | os.PathLike, force: bool, what: str = "output") -> Path:
    """Refuse to clobber an existing output unless ``force`` is set. The stale temporaries of
    ``path`` that an interrupted earlier run left are removed (:func:`remove_stale_temporaries`)."""
    p = Path(path)
    remove_stale_temporaries(p)
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


# ----------------------------------------------------------------------------
# Temporaries: whose they are, and which are stale
# ----------------------------------------------------------------------------

# A temporary that names no process (written before temporaries carried the pid) is stale after this long.
UNNAMED_STALE_S = 24 * 3600.0
_TEMP_REST = re.compile(r"(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]+(?:\.[A-Za-z0-9]+)?")


def temp_prefix(final: str | os.PathLike) -> str:
    """``.<name>.<pid>.``: the start of the name of every temporary this process makes for ``final``."""
    return f".{Path(final).name}.{os.getpid()}."


def make_temporary(final: str | os.PathLike, suffix: str = ".tmp", folder: bool = False) -> Path:
    """A new empty temporary file (or folder) for ``final``, beside it: ``.<name>.<pid>.<random><suffix>``.

    The stale temporaries of ``final`` that earlier runs left are removed first
    (:func:`remove_stale_temporaries`). OSError if the folder cannot be written.
    """
    final = Path(final)
    remove_stale_temporaries(final)
    if folder:
        return Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=suffix, dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=temp_prefix(final), suffix=suffix, dir=final.parent)
    os.close(fd)
    return Path(name)


def _temporary_owner(entry: str, name: str) -> int | None | bool:
    """The pid named by ``entry`` if it is a temporary of ``name`` (a file name, or a glob pattern
    like ``temp_*.model``): ``.<name>.<pid>.<random><suffix>``; None for one that names no process
    (``.<name>.<random><suffix>``, older code); False when ``entry`` is no temporary of ``name``."""
    import fnmatch

    if not entry.startswith("."):
        return False
    pattern = any(c in name for c in "*?[")
    for i in range(1, len(entry)):
        if entry[i] != ".":
            continue
        head = entry[1:i]
        if head == name or (pattern and fnmatch.fnmatchcase(head, name)):
            match = _TEMP_REST.fullmatch(entry[i + 1:])
            if match:
                return int(match["pid"]) if match["pid"] else None
    return False


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where the system says (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_gone(pid: int, since: float) -> bool:
    """True when no process ``pid`` runs, or the one that does started after ``since`` (the file's
    last write): the pid was reused, and the process that wrote the file is gone."""
    if not _alive(pid):
        return True
    started = _process_start(pid)
    return started is not None and started > since + 2.0  # /proc's boot time is in whole seconds


def stale_temporaries(final: str | os.PathLike, locked: bool = False) -> list[Path]:
    """The temporaries of ``final`` (a path; its name may be a glob pattern) that no running process
    is writing: their pid is gone, or runs a process younger than the file. Never this process's own.

    ``locked``: the caller holds the folder's lock (:func:`folder_lock`), so no other process writes
    there: every other temporary of ``final`` is stale. Without it, one that names no process (older
    code made those) is stale only after ``UNNAMED_STALE_S``.
    """
    final = Path(final)
    found = []
    try:
        with os.scandir(final.parent) as entries:
            candidates = [(e.path, _temporary_owner(e.name, final.name)) for e in entries if e.name.startswith(".")]
    except OSError:  # no folder (yet), or one that cannot be listed: nothing to clean
        return []
    now = time.time()
    for path, pid in candidates:
        if pid is False or pid == os.getpid():
            continue
        try:
            mtime = os.lstat(path).st_mtime
        except OSError:
            continue
        if locked or (_owner_gone(pid, mtime) if pid is not None else now - mtime > UNNAMED_STALE_S):
            found.append(Path(path))
    return sorted(found)


def remove_stale_temporaries(final: str | os.PathLike, locked: bool = False) -> list[Path]:
    """Remove :func:`stale_temporaries` of ``final`` (files, or staging folders), each named in a
    warning; returns the ones removed. A temporary that cannot be removed is left as it is."""
    import shutil

    removed = []
    for path in stale_temporaries(final, locked):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # another run removed it first, or it cannot be removed: left as it is
            continue
        pid = _temporary_owner(path.name, Path(final).name)
        whose = "" if pid is None else f" (pid {pid}{'' if _alive(pid) else ', no longer running'})"
        warn(f"removed {path}, a temporary left by an interrupted run{whose}")
        removed.append(path)
    return removed


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
        tmp = make_temporary(final, suffix)
    except OSError as exc:
        raise UserError(f"cannot write {final}: {os_reason(exc)}")
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
            tmps.append(make_temporary(final, suffix))
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


STAGING_NAME = "staging"  # staged_outputs' folders: .staging.<pid>.<random>.tmp


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Write a set of outputs all or none: into a staging folder inside ``folder``, then moved into place.

    The moves (renames within one file system, ``last`` — the file that marks the set complete —
    after the others) happen with SIGINT/SIGTERM held; any failure before them leaves ``folder`` as it
    was and removes the staging folder. The staging folder is ``folder/.staging.<pid>.<random>.tmp``;
    the ones a killed run left are removed first.
    """
    import shutil

    folder = Path(folder)
    try:  # making the staging folder is the writability check
        folder.mkdir(parents=True, exist_ok=True)
        stage = make_temporary(folder / STAGING_NAME, folder=True)
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
    if pid <= 0:  # os.kill(0, ...) would signal our own process group: no process is named
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):  # no such pid on this system
        return False
    return True

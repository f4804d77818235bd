"""Shared command-line plumbing: clear errors, seeding, atomic output files.

Every script at the repository root follows the same shape::

    def get_args_parser() -> argparse.ArgumentParser: ...
    def main(args) -> None: ...
    if __name__ == "__main__":
        cli.run(main, get_args_parser())

Bad input raises :class:`UserError`; :func:`run` turns it into a one-line
``error: ...`` message on stderr and exit status 2 (never a traceback).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by the user's input; the message is shown as-is."""


class Terminated(BaseException):
    """SIGTERM (``kill``, a batch scheduler, torchrun stopping its ranks), raised in the main
    thread like Ctrl-C's KeyboardInterrupt: the default action would end the process at once,
    leaving every temporary file and staging folder of an unfinished write behind. A
    BaseException, as KeyboardInterrupt is, so that no ``except Exception`` swallows it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run(main: Callable, parser, argv=None) -> None:
    """Parse arguments and call ``main(args)``, turning UserError into a clean exit.

    SIGTERM becomes :class:`Terminated` while ``main`` runs, so its cleanups run as for
    Ctrl-C; exit status 143 (128 + 15), as the signal itself would give.
    """
    import signal

    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread() else None
    try:
        main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except BrokenPipeError:  # stdout piped into `head`: stop quietly, like any other tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as exc:  # a disk or permission problem no stage anticipated: still one line
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except MemoryError:
        print("error: out of memory (try a smaller batch, fewer images or a machine with more memory)",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files are created with the user's umask, like any other tool's (mkstemp alone gives 0600).
FILE_MODE = 0o666 & ~_current_umask()


def os_reason(exc: OSError) -> str:
    """The human part of an OSError: 'No space left on device', 'Read-only file system', ..."""
    return exc.strerror or str(exc) or type(exc).__name__


def warn(message: str) -> None:
    """Print a warning on stderr (kept separate from results printed on stdout)."""
    print(f"warning: {message}", file=sys.stderr)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # the data stage does not need torch
        return
    torch.manual_seed(seed)


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


def in_main_thread() -> bool:
    """Signal handlers can be installed only there."""
    import threading

    return threading.current_thread() is threading.main_thread()


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _bounded(convert, low: float, strict: bool, noun: str):
    """An argparse type: ``convert(value)``, finite and > low (``strict``) or >= low."""

    def parse(value: str):
        try:
            x = convert(value)
        except ValueError:
            raise arg_error(f"expected {noun}, got {value!r}")
        if not (np.isfinite(x) and (x > low if strict else x >= low)):
            raise arg_error(f"expected {noun}, got {value}")
        if convert is float and x > FLOAT32_MAX:  # the optimiser and losses compute in float32
            raise arg_error(f"expected {noun} below {FLOAT32_MAX:.3g}, got {value}")
        return x

    return parse


FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_SEED = 2**32 - 1  # numpy, torch and FAISS all take it (torch.manual_seed stops at 2**64 - 1)


def is_count(value) -> bool:
    """A non-negative int (not a bool): a step or epoch as a checkpoint or log record holds it."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def seed(value: str) -> int:
    """argparse type: a seed, an integer in [0, 2**32 - 1]."""
    try:
        x = int(value)
    except ValueError:
        raise arg_error(f"expected a seed (an integer in [0, {MAX_SEED}]), got {value!r}")
    if not 0 <= x <= MAX_SEED:
        raise arg_error(f"expected a seed (an integer in [0, {MAX_SEED}]), got {value}")
    return x


positive_int = _bounded(int, 0, True, "a positive integer")  # >= 1
non_negative_int = _bounded(int, 0, False, "a non-negative integer")  # >= 0
positive_float = _bounded(float, 0.0, True, "a positive number")  # finite, > 0
non_negative_float = _bounded(float, 0.0, False, "a non-negative number")  # finite, >= 0


def bounded_int(low: int):
    """argparse type: an integer >= ``low`` (e.g. --image-size >= 32)."""
    return _bounded(int, low, False, f"an integer >= {low}")


def unit_interval(value: str) -> float:
    """argparse type: a float in [0, 1) (momentum)."""
    return fraction(value)


def fraction(value: str) -> float:
    """argparse type: a float in [0, 1)."""
    return _unit_float(value, "a fraction", include_one=False)


def probability(value: str) -> float:
    """argparse type: a float in [0, 1]."""
    return _unit_float(value, "a probability", include_one=True)


def _unit_float(value: str, what: str, include_one: bool) -> float:
    interval = f"[0, 1{']' if include_one else ')'}"
    try:
        x = float(value)
    except ValueError:
        raise arg_error(f"expected {what} in {interval}, got {value!r}")
    if not (0.0 <= x <= 1.0) or (x == 1.0 and not include_one):  # nan fails both comparisons
        raise arg_error(f"expected {what} in {interval}, got {value}")
    return x


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm progress bar on stderr, drawn only when stderr is a terminal (a log file gets none)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True, file=sys.stderr,
                **kwargs)


def arg_error(message: str):
    import argparse

    return argparse.ArgumentTypeError(message)

"""The program entry and what a program tells its user: one-line errors, warnings, progress.

Every script at the repository root follows the same shape::

    def get_args_parser() -> argparse.ArgumentParser: ...
    def main(args) -> None: ...
    if __name__ == "__main__":
        cli.run(main, get_args_parser())

Bad input raises :class:`UserError`; :func:`run` turns it into a one-line
``error: ...`` message on stderr and exit status 2 (never a traceback). Argparse value types
live in :mod:`deepranking.argtypes`, path checks and safe output files in
:mod:`deepranking.file_io`, seeding in :mod:`deepranking.runtime`.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

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


def in_main_thread() -> bool:
    """Signal handlers can be installed only there."""
    import threading

    return threading.current_thread() is threading.main_thread()


def os_reason(exc: OSError) -> str:
    """The human part of an OSError: 'No space left on device', 'Read-only file system', ..."""
    return exc.strerror or str(exc) or type(exc).__name__


def warn(message: str) -> None:
    """Print a warning on stderr (kept separate from results printed on stdout)."""
    print(f"warning: {message}", file=sys.stderr)


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm progress bar on stderr when stderr is a terminal; in a log file instead a plain line
    every ``progress.STEADY_INTERVAL_S`` seconds (see :class:`deepranking.progress.Progress`,
    which also takes a ``forecast=``)."""
    from deepranking.progress import Progress

    return Progress(iterable, enabled=enabled, **kwargs)


def arg_error(message: str):
    import argparse

    return argparse.ArgumentTypeError(message)

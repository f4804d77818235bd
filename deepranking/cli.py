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


def _end_now(signum, frame) -> None:
    """After ``main`` has finished: a signal ends the process at once, with 128 + its number as the
    exit status, the output written so far flushed (interpreter shutdown would show a traceback)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # a closed pipe, or the signal came in the middle of this very flush
            pass
    os._exit(128 + signum)


# Exit status of each way a run ends that is not its own error: Ctrl-C, SIGTERM, a closed pipe.
EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_BROKEN_PIPE = 130, 143, 141


def run(main: Callable, parser, argv=None) -> None:
    """Parse arguments and call ``main(args)``, turning UserError into a clean exit.

    SIGTERM becomes :class:`Terminated` while ``main`` runs, so its cleanups run as for
    Ctrl-C; exit status 143 (128 + 15), as the signal itself would give, and 130 for Ctrl-C.
    When ``main`` is the running program's own (its module is ``__main__``), its output never
    fails on characters the console cannot encode (:func:`tolerant_console`), and from the moment
    ``main`` returns or fails a SIGINT or SIGTERM ends the process at once with 130 or 143, whatever
    is running then (the report, atexit handlers; in the last moments of interpreter shutdown,
    which restores the default handlers, the signal itself, which a shell reports as the same
    status): never a traceback. Called from other code, it leaves the handlers as it found them.
    """
    import signal

    program = getattr(main, "__module__", None) == "__main__" and in_main_thread()
    if program:
        tolerant_console()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread() else None
    try:
        code = _outcome(main, args, program)
    except KeyboardInterrupt:  # came while a failure was being reported
        code = EXIT_INTERRUPTED
    except Terminated:
        code = EXIT_TERMINATED
    finally:
        if program:
            _end_on_signals()
        elif previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code:
        sys.exit(code)


def _end_on_signals() -> None:
    """From now on SIGINT and SIGTERM end the process at once (:func:`_end_now`)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _end_now)


def _outcome(main: Callable, args, program: bool) -> int:
    """Run ``main``; print the one line a failure ends with; return the exit status.

    ``program``: switch to :func:`_end_on_signals` the moment ``main`` is over, inside the ``try``:
    a signal that comes before the switch is complete still ends as "interrupted"/"terminated"."""
    try:
        main(args)
        if program:
            _end_on_signals()
        return 0
    except BaseException as exc:
        if program:
            _end_on_signals()
        return _report(exc)


def _report(exc: BaseException) -> int:
    """The one line for a run's failure, and its exit status; anything else (a bug) is raised again."""
    if isinstance(exc, UserError):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, Terminated):
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    if isinstance(exc, BrokenPipeError):  # stdout piped into `head`: stop quietly, like any other tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    if isinstance(exc, OSError):  # a disk or permission problem no stage anticipated: still one line
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(exc, MemoryError):
        print("error: out of memory (try a smaller batch, fewer images or a machine with more memory)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    raise exc


ESCAPE_ERRORS = "deepranking.escape"


def _escape_unencodable(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: a character the console cannot encode is written as an escape. A lone
    surrogate (a file-name byte that is not UTF-8, as ``os.listdir`` decodes it) becomes the byte,
    ``\\xff``; any other character its ``\\x``/``\\u`` escape, as ``backslashreplace`` writes it."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = exc.object[exc.start:exc.end]
    out = "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                  else c.encode("ascii", "backslashreplace").decode("ascii") for c in text)
    return out, exc.end


def tolerant_console() -> None:
    """Printing never fails on a character the console's encoding lacks (a file name with bytes
    that are not UTF-8 under a strict locale, ``PYTHONIOENCODING=utf-8:strict``): stdout and stderr
    write it escaped (:func:`_escape_unencodable`). Text the console can encode is unchanged."""
    import codecs

    try:
        codecs.lookup_error(ESCAPE_ERRORS)
    except LookupError:
        codecs.register_error(ESCAPE_ERRORS, _escape_unencodable)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors=ESCAPE_ERRORS)
            except (ValueError, OSError):  # a stream that cannot change its error handler
                pass


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

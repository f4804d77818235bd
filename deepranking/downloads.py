"""Bounded downloads: a total deadline per file (``--deadline``), for import_triplets.py and
transform_validation.py --download.

A socket timeout bounds each network operation, not a download: a server that sends one byte
every few seconds keeps every read short and the download going forever. A :class:`Deadline`
ends it: the connections opened through a :func:`deadline_opener` (or a handler with
:class:`DeadlineMixin`) are watched, and when the time is up their sockets are shut down, so the
read that waits returns at once; ``expired`` then tells the caller why the transfer stopped.

:func:`stream_into` copies a response body into a file and tells a failed local write
(:class:`WriteError`: a full disk) from the network's errors, which pass through.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

from deepranking.cli import os_reason


class Deadline:
    """A time limit for one file's download (all its attempts); ``seconds`` None: no limit.

    Used as a context manager: the clock starts on entry; leaving stops the watch.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.expired = False
        self._end = None
        self._sockets: list = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "Deadline":
        if self.seconds is not None:
            self._end = time.monotonic() + self.seconds
            self._timer = threading.Timer(self.seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._sockets.clear()

    def remaining(self) -> float:
        """Seconds left (infinite without a limit; 0 once expired)."""
        if self._end is None:
            return float("inf")
        return max(0.0, self._end - time.monotonic())

    def watch(self, connection):
        """Register an ``http.client`` connection: once connected, its socket is shut down when the
        deadline passes (the socket itself: urllib lets go of the connection once the headers are
        read, the response keeps reading from it). TimeoutError if the deadline has passed already
        (urllib reports it as the request's failure)."""
        if self.expired:
            raise TimeoutError("the download's deadline has passed")
        connect = connection.connect

        def connect_watched():
            connect()
            with self._lock:
                self._sockets.append(connection.sock)
                expired = self.expired
            if expired:
                _shutdown(connection.sock)

        connection.connect = connect_watched
        return connection

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock) -> None:
    """End a socket's traffic now: a read blocked on it returns. The plain socket's shutdown, also
    for a TLS socket (whose own would first try to end the TLS session)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class DeadlineMixin:
    """For a urllib HTTP(S) handler: every connection it opens is watched by ``self.deadline``."""

    deadline: Deadline | None = None

    def do_open(self, http_class, req, **kwargs):
        deadline = self.deadline
        if deadline is not None:
            plain = http_class

            def http_class(host, **kw):
                return deadline.watch(plain(host, **kw))

        return super().do_open(http_class, req, **kwargs)


class DeadlineHTTPHandler(DeadlineMixin, urllib.request.HTTPHandler):
    pass


class DeadlineHTTPSHandler(DeadlineMixin, urllib.request.HTTPSHandler):
    pass


def deadline_opener(deadline: Deadline) -> urllib.request.OpenerDirector:
    """urlopen's opener (proxies, redirects, errors), with every connection watched by ``deadline``."""
    handlers = [DeadlineHTTPHandler(), DeadlineHTTPSHandler()]
    for handler in handlers:
        handler.deadline = deadline
    return urllib.request.build_opener(*handlers)


class WriteError(Exception):
    """Writing downloaded bytes to ``path`` failed (a full disk, a read-only folder): the local side.
    ``error`` is the OSError; the message says "cannot write PATH: No space left on device"."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"cannot write {path}: {os_reason(error)}")
        self.path, self.error = path, error


def stream_into(response, path: str | os.PathLike, append: bool = False, chunk: int = 1 << 16,
                on_block: Callable[[int, bytes], None] | None = None) -> int:
    """Copy ``response``'s body into ``path`` (appended with ``append``); returns the bytes copied.

    ``on_block(total so far, block)`` is called before each block is written (it may raise to stop).
    Opening, writing or closing ``path`` raises :class:`WriteError`; the response's own errors
    (connection reset, timeout) pass through unchanged.
    """
    path = Path(path)
    try:
        f = open(path, "ab" if append else "wb")
    except OSError as exc:
        raise WriteError(path, exc)
    total = 0
    try:
        while block := response.read(chunk):
            total += len(block)
            if on_block is not None:
                on_block(total, block)
            try:
                f.write(block)
            except OSError as exc:
                raise WriteError(path, exc)
    finally:
        try:
            f.close()
        except OSError as exc:  # the last buffered bytes could not be written
            raise WriteError(path, exc)
    return total

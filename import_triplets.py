"""Turn a list of image triplets (URLs or local files) into our triplet CSV + image folder.

Input formats (detected automatically, or forced with ``--format``):

* ``lines``: the human-rated triplets published with the Deep Ranking paper
  (``query_and_triplets.txt``): records of 4 lines, a text line (the query
  description) then the query, positive and negative image URLs; blank lines
  between records are allowed.
* ``csv`` / ``tsv``: header ``query,positive,negative`` (optional) and 3 columns
  whose cells are http(s) URLs or local image paths (relative to the input
  file's folder).

Output in ``--output-dir DIR``::

    DIR/images/<sha1(url)[:16]>.<ext>   each distinct image once, decoded and verified
    DIR/triplets.csv                    query,positive,negative (paths relative to DIR)
    DIR/triplets_val.csv                with --val-fraction: held-out queries
    DIR/manifest.csv                    url,file,status,reason of every image ever tried
    DIR/failures.csv                    url,reason of this run's failed images
    DIR/malformed.csv                   line,reason of this run's malformed records

An existing DIR is continued: images already there (and decodable) are reused,
URLs that failed permanently in an earlier run are not requested again (unless
``--retry-failed``), the rest are fetched. Images are written atomically
(temporary file + ``os.replace``), so an interrupted run never leaves a partial
file under a final name; just run the same command again (it removes the partial
``.<stem>.<pid>.<random>.part`` files a killed run left). ``--timeout`` bounds each
network operation and ``--deadline`` each image's whole download (a server that sends a
byte at a time); a full disk stops the import with one line saying so.

What is fetched: only http and https URLs whose host resolves to public addresses
only (no loopback, private, link-local, CGNAT, multicast, reserved, ... address),
checked again on every redirect; the connection goes to the address that was
checked, so a second DNS answer cannot point it elsewhere. Local files (plain
paths and ``file://`` URLs) are copied only with ``--allow-local-files``.
Anything else is refused: listed in failures.csv as ``refused <url>: <reason>``,
never requested (a later run checks it again, so adding the option is enough).
``--allow-private-hosts`` lifts the address check (for a test server on this machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import functools
import hashlib
import http.client
import io
import ipaddress
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from deepranking import argtypes, cli, file_io
from deepranking.cli import UserError
from deepranking import image_data
from deepranking import preprocessing
from deepranking.downloads import Deadline, DeadlineMixin, WriteError, stream_into
from deepranking.image_data import is_image_file

USER_AGENT = "deep-ranking-import-triplets/1.0 (+python-urllib; research dataset download)"
MANIFEST_NAME = "manifest.csv"
FAILURES_NAME = "failures.csv"
MALFORMED_NAME = "malformed.csv"
IMAGES_DIR = "images"
MAX_BACKOFF_S = 60.0
DEADLINE_S = 120.0  # --deadline: one image (at most --max-bytes, 10 MB) in 2 minutes, retries included
SHOWN_PROBLEMS = 20  # malformed records / failures printed on stderr; the rest are in the CSV reports

# PIL format -> file extension we store (all in image_data.IMAGE_EXTENSIONS);
# any other decodable format is re-encoded as PNG so every later stage can read it.
FORMAT_EXTENSIONS = {
    "JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp",
    "BMP": ".bmp", "TIFF": ".tif", "PPM": ".ppm",
}
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HEADER = ("query", "positive", "negative")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Download/copy the images of a triplet list (Deep Ranking query_and_triplets.txt, "
        "or a query,positive,negative CSV/TSV of URLs or paths) into DIR/images and write DIR/triplets.csv.",
    )
    p.add_argument("input", help="triplet list: 4-line records (text, query URL, positive URL, negative URL) "
                   "or a CSV/TSV with columns query,positive,negative")
    p.add_argument("--output-dir", required=True,
                   help="output folder; an existing one is continued (images reused), never wiped")
    p.add_argument("--csv", default="triplets.csv",
                   help="name of the triplet CSV written in --output-dir (default: %(default)s)")
    p.add_argument("--format", choices=("auto", "lines", "csv", "tsv"), default="auto",
                   help="input format (auto: CSV/TSV if the first line holds 2+ image columns or the "
                   "header, else 4-line records; default: %(default)s)")
    p.add_argument("--workers", type=argtypes.positive_int, default=8, help="parallel downloads (default: %(default)s)")
    p.add_argument("--retries", type=argtypes.non_negative_int, default=3,
                   help="retries per URL after connection errors, timeouts, 408/429 and 5xx (not after 404 etc.; "
                   "default: %(default)s)")
    p.add_argument("--timeout", type=argtypes.positive_float, default=20.0,
                   help="seconds per network operation (connect, each read; default: %(default)s)")
    p.add_argument("--deadline", type=argtypes.positive_float, default=DEADLINE_S,
                   help="seconds for each image's whole download, its retries included (a server that sends a "
                        "byte at a time never hits --timeout; default: %(default)s)")
    p.add_argument("--backoff", type=argtypes.positive_float, default=0.5,
                   help="first retry delay in seconds; doubles per retry, plus up to 100%% seeded jitter "
                   "(default: %(default)s)")
    p.add_argument("--max-bytes", type=argtypes.positive_int, default=10_000_000,
                   help="largest accepted download per image in bytes (checked on Content-Length and while "
                   "streaming; default: %(default)s)")
    p.add_argument("--retry-failed", action="store_true",
                   help="also re-request URLs that failed permanently (404, not an image, ...) in an earlier run")
    p.add_argument("--val-fraction", type=argtypes.fraction, default=0.0,
                   help="hold out about this fraction of the query images into <csv stem>_val.csv (their "
                   "triplets; a triplet that uses one of them as positive or negative is left out of both, counted); "
                   "the class of every image is the --output-dir folder's name (DIR/images/FILE); "
                   f"{image_data.HELDOUT_RULE}")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed of the retry jitter")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--allow-local-files", action="store_true",
                   help="copy local files (plain paths and file:// URLs in the list); without it they are "
                   "refused and listed in failures.csv")
    p.add_argument("--allow-private-hosts", action="store_true",
                   help="also fetch from hosts that resolve to loopback, private or link-local addresses "
                   "(for testing against a server on this machine); without it only public addresses are "
                   "contacted")
    return p


# ----------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """One image reference: ``key`` is the URL, or the absolute path of a local file."""

    key: str
    kind: str  # "url" | "file"
    source: str = field(default="", compare=False)  # the cell as written (names a refused local file)


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line of the record's first line in the input
    refs: tuple  # (query, positive, negative) Refs


@dataclass(frozen=True)
class Malformed:
    line: int
    reason: str


def looks_like_image_ref(cell: str, base_dir: Path) -> bool:
    """Structural guess (format detection, 4-line records): URL-like, an image file name, or an existing file."""
    cell = cell.strip()
    if not cell:
        return False
    has_space = any(ch.isspace() for ch in cell)  # a text line ("query: a red shoe.jpg") has spaces
    if _SCHEME_RE.match(cell):
        return not has_space
    if _is_file(_local_path(cell, base_dir)):  # an existing file may have spaces ("my photos/a.jpg")
        return True
    return is_image_file(cell) and not has_space


def _is_file(path: Path) -> bool:
    """Path.is_file that is False (not an exception) for over-long or invalid names, e.g. text lines."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _local_path(cell: str, base_dir: Path) -> Path:
    p = Path(cell).expanduser()
    return p if p.is_absolute() else base_dir / p


def parse_ref(cell: str, base_dir: Path) -> Ref | str:
    """A validated Ref, or the reason (a string) why ``cell`` is not one."""
    cell = cell.strip()
    if not cell:
        return "empty cell"
    if _SCHEME_RE.match(cell):
        try:
            parsed = urllib.parse.urlsplit(cell)
            host = parsed.hostname
        except ValueError as exc:  # e.g. an unclosed IPv6 bracket: "http://[::1/a.jpg"
            return f"malformed URL ({exc}): {cell}"
        scheme = parsed.scheme.lower()
        if scheme == "file":
            path = Path(urllib.request.url2pathname(parsed.path))
            return Ref(str(path.resolve()), "file", cell) if _is_file(path) else f"file {_file_problem(path)}: {cell}"
        if scheme in ("http", "https") and host:
            return Ref(cell, "url")
        return f"not an http(s) URL: {cell}"
    path = _local_path(cell, base_dir)
    if _is_file(path):
        return Ref(str(path.resolve()), "file", cell)
    problem = _file_problem(path)
    if problem != "not found":  # there, but no file to read (a folder, a FIFO, a broken link)
        return f"file {problem}: {cell}"
    return f"neither an http(s) URL nor an existing file: {cell}"


def _file_problem(path: Path) -> str:
    """file_io.regular_file_problem, for a cell that may be any text: "not found" for a name the
    system refuses (too long, a NUL byte)."""
    try:
        return file_io.regular_file_problem(path) or "not found"
    except (OSError, ValueError):
        return "not found"


def _record_from_cells(line: int, cells: list[str], base_dir: Path) -> Record | Malformed:
    refs = []
    for role, cell in zip(_HEADER, cells):
        ref = parse_ref(cell, base_dir)
        if isinstance(ref, str):
            return Malformed(line, f"{role}: {ref}")
        refs.append(ref)
    return Record(line, tuple(refs))


def parse_lines_format(lines: list[str], base_dir: Path) -> tuple[list[Record], list[Malformed]]:
    """Records of a text line followed by 3 image lines; blank lines separate records.

    Image lines are recognised structurally (URL-like, image file name, existing
    file), so a missing or extra line is reported for that record only and the
    records after it still parse. A record without its text line is accepted.
    """
    records: list[Record] = []
    malformed: list[Malformed] = []
    start = None  # line number of the current record's first line
    images: list[tuple[int, str]] = []  # (line number, cell) of the current record

    def close():
        nonlocal start, images
        if start is not None:
            if len(images) == 3:
                # Validate each image line with its own line number.
                refs = []
                for role, (ln, cell) in zip(_HEADER, images):
                    ref = parse_ref(cell, base_dir)
                    if isinstance(ref, str):
                        malformed.append(Malformed(ln, f"{role}: {ref}"))
                        break
                    refs.append(ref)
                else:
                    records.append(Record(start, tuple(refs)))
            else:
                end = images[-1][0] if images else start
                where = f"lines {start}-{end}" if end != start else f"line {start}"
                malformed.append(Malformed(start, f"record at {where} has {len(images)} image line(s), expected 3 "
                                                  "(text, query, positive, negative)"))
        start, images = None, []

    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            close()
        elif looks_like_image_ref(line, base_dir):
            if start is None:
                start = number
            images.append((number, line))
        else:  # a text line starts the next record
            close()
            start = number
    close()
    return records, malformed


def parse_delimited(lines: list[str], base_dir: Path, delimiter: str) -> tuple[list[Record], list[Malformed]]:
    """CSV/TSV with an optional ``query,positive,negative`` header and 3 cells per row."""
    records: list[Record] = []
    malformed: list[Malformed] = []
    reader = csv.reader(lines, delimiter=delimiter)
    first = True
    for row in reader:
        line = reader.line_num
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if first and tuple(c.lower() for c in cells) == _HEADER:
            first = False
            continue
        first = False
        if len(cells) != 3:
            malformed.append(Malformed(line, f"expected 3 columns (query, positive, negative), found {len(cells)}"))
            continue
        rec = _record_from_cells(line, cells, base_dir)
        (records if isinstance(rec, Record) else malformed).append(rec)
    return records, malformed


def detect_format(lines: list[str], base_dir: Path) -> str:
    """'tsv', 'csv' or 'lines', from the first non-blank line."""
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    if "\t" in first:
        return "tsv"
    cells = next(csv.reader([first]), [])
    if tuple(c.strip().lower() for c in cells) == _HEADER:
        return "csv"
    if len(cells) >= 2 and looks_like_image_ref(cells[0], base_dir):
        return "csv"
    return "lines"


def read_input(path: Path, fmt: str = "auto") -> tuple[str, list[Record], list[Malformed]]:
    """Parse the input file; returns (format used, records, malformed records)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"input is not UTF-8 text: {path} ({exc.reason} at byte {exc.start})")
    lines = text.splitlines()
    base_dir = path.resolve().parent
    if fmt == "auto":
        fmt = detect_format(lines, base_dir)
    if fmt == "lines":
        records, malformed = parse_lines_format(lines, base_dir)
    else:
        records, malformed = parse_delimited(lines, base_dir, "\t" if fmt == "tsv" else ",")
    kept = []
    for rec in records:  # train_net.py refuses such a triplet: it measures and teaches nothing
        q, p, n = (r.key for r in rec.refs)
        if q in (p, n):
            malformed.append(Malformed(rec.line, f"the query image is also the {'positive' if q == p else 'negative'}"))
        else:
            kept.append(rec)
    return fmt, kept, sorted(malformed, key=lambda m: m.line)


# ----------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------


@dataclass
class FetchOptions:
    timeout: float = 20.0
    deadline: float | None = DEADLINE_S
    retries: int = 3
    backoff: float = 0.5
    max_bytes: int = 10_000_000
    seed: int = 0
    allow_private_hosts: bool = False
    allow_local_files: bool = False


@dataclass
class Outcome:
    key: str
    file: str  # file name inside DIR/images, "" when failed
    status: str  # "ok" | "failed" (permanent) | "transient" (retried on the next run) | "refused" (checked again)
    reason: str = ""
    action: str = ""  # "downloaded" | "copied" | "reused" | "skipped" | ""
    stop: bool = False  # the local disk failed (full, read-only): every other image would fail the same way


class FetchError(Exception):
    def __init__(self, reason: str, transient: bool = False, retry: bool | None = None):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        # Whether to retry within this run (DNS failures are transient across runs but not worth retrying now).
        self.retry = transient if retry is None else retry

    def __str__(self) -> str:
        return self.reason


class DiskError(FetchError):
    """Writing an image to the output folder failed: a local problem (a full disk), not the server's."""

    def __init__(self, folder: Path, exc: OSError):
        super().__init__(f"cannot write into {folder}: {cli.os_reason(exc)}", transient=True, retry=False)


class Refused(FetchError):
    """A reference that is not fetched at all (scheme, local file, non-public address); never retried."""

    def __init__(self, url: str, why: str):
        super().__init__(f"refused {url}: {why}")


# ----------------------------------------------------------------------------
# What may be fetched
# ----------------------------------------------------------------------------

_FETCHED_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, not global but not "private" either
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: judged by the IPv4 address inside


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in resolver order (the only name lookup of the import)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_problem(address: str) -> str | None:
    """Why ``address`` is not a public unicast address ("private", "loopback", ...), or None if it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unrecognised"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:  # ::ffff:a.b.c.d and 64:ff9b::a.b.c.d reach a.b.c.d
            return address_problem(str(embedded))
        if ip.sixtofour is not None and address_problem(str(ip.sixtofour)):
            return address_problem(str(ip.sixtofour))
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("carrier-grade NAT", ip in _SHARED_V4),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("site-local", getattr(ip, "is_site_local", False)),
        ("non-public", not ip.is_global),
    )
    return next((name for name, bad in checks if bad), None)


def check_url(url: str, allow_private: bool = False) -> list[str]:
    """The checked addresses to connect to for ``url``.

    Raises Refused (not http(s), no host, a non-public address among the
    resolved ones unless ``allow_private``), FetchError (bad port, no address)
    or socket.gaierror (unknown host).
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _FETCHED_SCHEMES:
        raise Refused(url, f"only http and https URLs are fetched, not {scheme + ':' if scheme else 'this'}")
    host = parts.hostname
    if not host:
        raise Refused(url, "the URL has no host")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise FetchError(f"invalid URL ({exc})")
    addresses = resolve_host(host, port)
    if not addresses:
        raise FetchError("host not found (no address)", transient=True, retry=False)
    if not allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise Refused(url, f"host resolves to {problem} address {address}")
    return addresses


def _connect_pinned(addresses: list[str], address: tuple, timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
                    source_address=None) -> socket.socket:
    """http.client's create_connection, but to the checked ``addresses`` instead of a fresh lookup."""
    error: OSError | None = None
    for ip in addresses:
        try:
            return socket.create_connection((ip, address[1]), timeout, source_address)
        except OSError as exc:
            error = exc
    raise error if error is not None else OSError("no address to connect to")


class _CheckedOpenMixin:
    """Checks each request's URL (every hop: redirects open new requests) and pins its connection."""

    allow_private = False

    def do_open(self, http_class, req, **kwargs):
        addresses = getattr(req, "checked_addresses", None)  # set by _CheckedRedirectHandler
        if addresses is None:
            addresses = check_url(req.full_url, self.allow_private)
        if not (req.has_proxy() or req._tunnel_host):  # through a proxy the proxy connects: nothing to pin
            plain = http_class

            def http_class(host, **kw):
                conn = plain(host, **kw)
                conn._create_connection = functools.partial(_connect_pinned, addresses)
                return conn

        return super().do_open(http_class, req, **kwargs)


class _CheckedHTTPHandler(_CheckedOpenMixin, DeadlineMixin, urllib.request.HTTPHandler):
    pass


class _CheckedHTTPSHandler(_CheckedOpenMixin, DeadlineMixin, urllib.request.HTTPSHandler):
    pass


class _CheckedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an http(s) URL whose host passes check_url."""

    allow_private = False

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urllib.parse.urljoin(req.full_url, location.strip())
            scheme = urllib.parse.urlsplit(target).scheme.lower()
            if scheme not in _FETCHED_SCHEMES:  # urllib itself would follow ftp:
                fp.close()
                raise Refused(target, f"redirect to a {scheme}: URL, only http and https are fetched "
                                      f"(redirected from {req.full_url})")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            try:
                new.checked_addresses = check_url(newurl, self.allow_private)
            except Refused as exc:
                fp.close()
                exc.reason += f" (redirected from {req.full_url})"
                raise
        return new


def _opener(opts: FetchOptions, deadline: Deadline | None = None) -> urllib.request.OpenerDirector:
    """urlopen's handlers minus ftp/file/data, with every hop checked (and its connection ended at
    ``deadline``)."""
    opener = urllib.request.OpenerDirector()
    checked = [_CheckedHTTPHandler(), _CheckedHTTPSHandler(), _CheckedRedirectHandler()]
    for handler in checked:
        handler.allow_private = opts.allow_private_hosts
        handler.deadline = deadline
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), *checked,
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def image_stem(key: str) -> str:
    """File name stem of an image: the first 16 hex digits of sha1(url or absolute path)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def verify_image(path: Path) -> str:
    """Fully decode ``path`` (truncated files fail); return its stored extension or raise FetchError."""
    from PIL import Image

    try:
        preprocessing.load_rgb(path)
        with Image.open(path) as im:
            fmt = im.format or ""
    except Exception as exc:  # UnreadableImageError, DecompressionBombError, ...: never crash on data
        msg = str(exc).replace(f" {path}", "") or type(exc).__name__
        raise FetchError(f"not a readable image ({msg})")
    return FORMAT_EXTENSIONS.get(fmt, "")


def _finalize(tmp: Path, images_dir: Path, stem: str) -> str:
    """Verify a fully written temp file and move it to ``<stem><ext>``; returns the file name."""
    ext = verify_image(tmp)
    try:
        if not ext:  # decodable but unusual format: store as PNG so every stage can read it
            preprocessing.load_rgb(tmp).save(tmp, format="PNG")
            ext = ".png"
        name = stem + ext
        os.replace(tmp, images_dir / name)
    except OSError as exc:
        raise DiskError(images_dir, exc)
    return name


def _classify_http_error(exc: urllib.error.HTTPError) -> FetchError:
    code = exc.code
    transient = code >= 500 or code in (408, 425, 429)
    reason = " ".join(str(exc.reason).split())  # a redirect loop's reason spans three lines
    return FetchError(f"HTTP {code} {reason}".strip(), transient=transient)


def _classify_network_error(exc: BaseException) -> FetchError:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.gaierror):
        # An unknown host is usually a dead domain: not retried now, but retried on the next run
        # in case the network itself was down.
        return FetchError(f"host not found ({reason.strerror or reason})", transient=True,
                          retry=reason.errno not in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)))
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return FetchError("timed out", transient=True)
    if isinstance(reason, (OSError, http.client.HTTPException)):
        return FetchError(f"connection error ({type(reason).__name__}: {reason})", transient=True)
    return FetchError(f"network error ({reason})", transient=True)


def _download_once(url: str, tmp: Path, opts: FetchOptions, deadline: Deadline | None = None) -> None:
    """One GET of ``url`` streamed into ``tmp``; raises FetchError (DiskError when ``tmp`` cannot be
    written). ``deadline``: the image's (:func:`download`); none: one of ``opts.deadline`` seconds."""
    if deadline is None:
        with Deadline(opts.deadline) as deadline:
            return _download_once(url, tmp, opts, deadline)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"})
    received = [0]
    try:
        timeout = max(0.001, min(opts.timeout, deadline.remaining()))
        with _opener(opts, deadline).open(request, timeout=timeout) as resp:
            # Reject HTML error pages ("soft 404") before reading them. A missing type or
            # application/octet-stream (common on old CDNs) is left to the decode check.
            if resp.headers.get("Content-Type"):
                ctype = resp.headers.get_content_type()
                if not (ctype.startswith("image/") or ctype in ("application/octet-stream", "binary/octet-stream")):
                    raise FetchError(f"not an image (Content-Type {ctype})")
            length = resp.headers.get("Content-Length", "").strip()
            if length.isdigit() and int(length) > opts.max_bytes:
                raise FetchError(f"too large (Content-Length {int(length)} > --max-bytes {opts.max_bytes})")
            _stream(resp, tmp, opts, received)
            if deadline.expired:  # the socket was shut down: what looked like the end of the body was not
                raise _past_deadline(opts, received[0])
            if length.isdigit() and received[0] < int(length):  # http.client returns a short body silently
                raise FetchError(f"connection closed after {received[0]} of {int(length)} bytes", transient=True)
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _classify_http_error(exc)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _past_deadline(opts, received[0]) if deadline.expired else _classify_network_error(exc)
    except ValueError as exc:  # malformed URL that urlsplit accepted (e.g. bad port)
        raise FetchError(f"invalid URL ({exc})")


def _stream(resp, tmp: Path, opts: FetchOptions, received: list) -> None:
    """The response body into ``tmp``, counted in ``received[0]``; a local write error is a DiskError
    (a full disk is no connection error), the network's errors pass through."""
    def count(total: int, block: bytes) -> None:
        received[0] = total
        if total > opts.max_bytes:  # no or lying Content-Length: stop the stream
            raise FetchError(f"too large (more than --max-bytes {opts.max_bytes} bytes)")

    try:
        stream_into(resp, tmp, on_block=count)
    except WriteError as exc:
        raise DiskError(tmp.parent, exc.error)


def _past_deadline(opts: FetchOptions, received: int) -> FetchError:
    return FetchError(f"no complete download within --deadline {opts.deadline:g} s ({received} bytes received)",
                      transient=True, retry=False)


def download(url: str, tmp: Path, opts: FetchOptions, sleep=time.sleep) -> int:
    """GET ``url`` into ``tmp`` with retries and exponential back-off, all within ``opts.deadline``
    seconds; returns the number of attempts.

    The jitter comes from a generator seeded with (seed, url), so delays do not
    depend on thread scheduling.
    """
    rng = random.Random(f"{opts.seed}:{url}")
    with Deadline(opts.deadline) as deadline:
        for attempt in range(opts.retries + 1):
            try:
                _download_once(url, tmp, opts, deadline)
                return attempt + 1
            except FetchError as exc:
                if not exc.retry or attempt == opts.retries or deadline.expired:
                    if attempt:
                        exc.reason = f"{exc.reason} (after {attempt + 1} attempts)"
                    raise
            sleep(min(MAX_BACKOFF_S, opts.backoff * 2**attempt * (1.0 + rng.random()), deadline.remaining()))
    raise AssertionError("unreachable")


def fetch_ref(ref: Ref, images_dir: Path, existing: list[Path], previous: dict | None,
              opts: FetchOptions, retry_failed: bool = False) -> Outcome:
    """Make sure ``ref`` has a verified image in ``images_dir``. Never raises.

    existing: files already in images_dir with this ref's stem (from an earlier run).
    previous: this ref's manifest row from an earlier run, if any.
    """
    stem = image_stem(ref.key)
    try:
        for path in existing:
            try:
                ext = verify_image(path)
            except FetchError:
                path.unlink(missing_ok=True)  # only a foreign/damaged file can be here (we write atomically)
                continue
            if ext and path.suffix == ext:
                return Outcome(ref.key, path.name, "ok", action="reused")
        if previous and previous.get("status") == "failed" and not retry_failed:
            return Outcome(ref.key, "", "failed", previous.get("reason", ""), action="skipped")
        if ref.kind == "file" and not opts.allow_local_files:
            raise Refused(ref.source or ref.key, "local files need --allow-local-files")
        try:  # fetch_all removed the stale ones: no scan of images_dir per image
            fd, tmp_name = tempfile.mkstemp(prefix=file_io.temp_prefix(images_dir / stem), suffix=".part",
                                            dir=images_dir)
            os.close(fd)
        except OSError as exc:
            raise DiskError(images_dir, exc)
        tmp = Path(tmp_name)
        try:
            if ref.kind == "file":
                _copy_local(ref.key, tmp)
                action = "copied"
            else:
                download(ref.key, tmp, opts)
                action = "downloaded"
            name = _finalize(tmp, images_dir, stem)
        finally:
            tmp.unlink(missing_ok=True)
        return Outcome(ref.key, name, "ok", action=action)
    except FetchError as exc:
        status = "refused" if isinstance(exc, Refused) else "transient" if exc.transient else "failed"
        return Outcome(ref.key, "", status, exc.reason, stop=isinstance(exc, DiskError))
    except OSError as exc:  # a disk error must not take the whole import down unannounced
        where = f" {exc.filename}" if exc.filename else ""
        return Outcome(ref.key, "", "transient", f"cannot access{where}: {cli.os_reason(exc)}")
    except Exception as exc:  # nor a bug
        return Outcome(ref.key, "", "transient", f"{type(exc).__name__}: {exc}")


def _copy_local(source: str, tmp: Path) -> None:
    """Copy a local image into ``tmp``: only a regular file is read (a FIFO would block), and a write
    that fails is a DiskError."""
    try:
        src = file_io.open_regular(source)
    except OSError as exc:
        raise FetchError(f"cannot read {source}: {cli.os_reason(exc)}")
    with src:
        try:
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as exc:
            if exc.filename not in (None, str(tmp)):
                raise
            raise DiskError(tmp.parent, exc)


# ----------------------------------------------------------------------------
# Manifest, reports, split
# ----------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, dict]:
    """url -> row of an earlier run's manifest; an unreadable manifest is ignored with a warning."""
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        cli.warn(f"ignoring unreadable manifest {path}: {exc}")
        return {}
    if rows and not {"url", "file", "status", "reason"} <= set(rows[0]):
        cli.warn(f"ignoring manifest with unexpected columns: {path}")
        return {}
    return {r["url"]: r for r in rows if r.get("url")}


def write_rows_csv(path: Path, header: tuple, rows) -> None:
    """Write a small report CSV atomically (URLs may hold commas: csv quoting)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    file_io.atomic_write_text(path, buf.getvalue())


def write_manifest(path: Path, previous: dict[str, dict], outcomes: dict[str, Outcome]) -> None:
    """Earlier rows (also of URLs not in this input) updated with this run's outcomes."""
    merged = {url: (r["url"], r["file"], r["status"], r["reason"]) for url, r in previous.items()}
    for key, o in outcomes.items():
        merged[key] = (key, o.file, o.status, o.reason)
    write_rows_csv(path, ("url", "file", "status", "reason"), merged.values())


def split_heldout(kept: list, files: dict[str, str], out_dir: Path, fraction: float) -> tuple[list, list]:
    """(train, val) records: image_data.split_by_query over the images as later stages see them.

    ``files``: ref key -> file name in DIR/images. The rule sees the paths train_net.py reads
    from the CSV (relative to its resolved folder), so that this split and train_net.py
    --val-fraction on the unsplit CSV hold out the same query images.
    """
    import numpy as np

    root = out_dir.resolve()
    names = np.array([os.path.join(root, IMAGES_DIR, files[ref.key]) for rec in kept for ref in rec.refs])
    paths, inverse = np.unique(names, return_inverse=True)
    train, val = image_data.split_by_query(inverse.reshape(len(kept), 3), paths, fraction)
    if not val.any():
        cli.warn(f"--val-fraction: nothing held out (at least {image_data.HELDOUT_KEEP} query images stay in "
                 f"training, and {len({rec.refs[0].key for rec in kept})} survived)")
    return [rec for rec, t in zip(kept, train) if t], [rec for rec, v in zip(kept, val) if v]


def write_split(kept: list, outcomes: dict[str, Outcome], out_dir: Path, csv_path: Path, val_path: Path,
                fraction: float) -> tuple[list, list]:
    """Write the triplet CSV and, with ``fraction`` > 0, its held-out companion; returns (train, val) records."""
    images_dir = out_dir / IMAGES_DIR

    def paths(recs):
        return [[str(images_dir / outcomes[rec.refs[i].key].file) for rec in recs] for i in range(3)]

    train, val = kept, []
    if fraction > 0:
        train, val = split_heldout(kept, {key: o.file for key, o in outcomes.items()}, out_dir, fraction)
    if val:
        image_data.write_triplet_csv(val_path, *paths(val))
    elif val_path.exists():
        cli.warn(f"{val_path} is from an earlier run and may share queries with {csv_path}")
    image_data.write_triplet_csv(csv_path, *paths(train))
    return train, val


def _scan_images(images_dir: Path) -> dict[str, list[Path]]:
    """stem -> files already in images_dir (temporary dot-files ignored)."""
    found: dict[str, list[Path]] = {}
    with os.scandir(images_dir) as entries:
        for e in entries:
            if e.is_file() and not e.name.startswith("."):
                found.setdefault(Path(e.name).stem, []).append(Path(e.path))
    return found


def _show(problems: list[str], what: str, report: Path) -> None:
    cli.warn(f"{len(problems)} {what} (all listed in {report}):")
    for p in problems[:SHOWN_PROBLEMS]:
        print(f"  {p}", file=sys.stderr)
    if len(problems) > SHOWN_PROBLEMS:
        print(f"  ... and {len(problems) - SHOWN_PROBLEMS} more", file=sys.stderr)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def fetch_all(refs: list[Ref], images_dir: Path, manifest_path: Path, previous: dict[str, dict],
              opts: FetchOptions, workers: int, retry_failed: bool, progress: bool) -> dict[str, Outcome]:
    """Fetch every distinct ref in parallel; the manifest is rewritten every few seconds and at the end.
    The partial downloads a killed run left in ``images_dir`` are removed first."""
    file_io.remove_stale_temporaries(images_dir / "*")
    existing = _scan_images(images_dir)
    outcomes: dict[str, Outcome] = {}
    pool = cf.ThreadPoolExecutor(max_workers=workers)
    bar = cli.progress(total=len(refs), desc="images", unit="img", enabled=progress)
    try:
        futures = [
            pool.submit(fetch_ref, ref, images_dir, existing.get(image_stem(ref.key), []),
                        previous.get(ref.key), opts, retry_failed)
            for ref in refs
        ]
        last_save = time.monotonic()
        n_failed = 0
        for fut in cf.as_completed(futures):
            o = fut.result()
            if o.stop:  # a full disk: every other image would fail the same way
                raise UserError(f"{o.reason} (saving {o.key}); the import stopped: make room and run the same "
                                f"command again (what was fetched is kept)")
            outcomes[o.key] = o
            bar.update(1)
            if o.status != "ok":
                n_failed += 1
                bar.set_postfix(failed=n_failed, refresh=False)
            if time.monotonic() - last_save > 10.0:  # keep the record of a long run current
                write_manifest(manifest_path, previous, outcomes)
                last_save = time.monotonic()
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        write_manifest(manifest_path, previous, outcomes)
    return outcomes


def main(args) -> None:
    input_path = file_io.check_input_file(args.input, "triplet list")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output-dir is not a folder: {out_dir}")
    if Path(args.csv).name != args.csv or args.csv in ("", ".", ".."):
        raise UserError(f"--csv must be a file name inside --output-dir, got {args.csv!r}")
    if args.csv in (MANIFEST_NAME, FAILURES_NAME, MALFORMED_NAME):
        raise UserError(f"--csv {args.csv!r} would overwrite the import's own report file")

    fmt, records, malformed = read_input(input_path, args.format)
    malformed_lines = [f"line {m.line}: {m.reason}" for m in malformed]
    if not records:
        shown = "; ".join(malformed_lines[:3]) + (" ..." if len(malformed_lines) > 3 else "")
        detail = f" ({len(malformed)} malformed: {shown})" if malformed else " (the file holds no records)"
        raise UserError(f"no valid triplet record in {input_path} (read as {fmt}){detail}")

    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    write_rows_csv(out_dir / MALFORMED_NAME, ("line", "reason"), [(m.line, m.reason) for m in malformed])
    if malformed:
        _show(malformed_lines, f"malformed record(s) dropped from {input_path.name}", out_dir / MALFORMED_NAME)

    # Each distinct image once, in input order (query of record 1, positive of record 1, ...).
    refs = list(dict.fromkeys(ref for rec in records for ref in rec.refs))
    manifest_path = out_dir / MANIFEST_NAME
    previous = read_manifest(manifest_path)
    opts = FetchOptions(timeout=args.timeout, deadline=args.deadline, retries=args.retries, backoff=args.backoff,
                        max_bytes=args.max_bytes, seed=args.seed, allow_private_hosts=args.allow_private_hosts,
                        allow_local_files=args.allow_local_files)
    outcomes = fetch_all(refs, images_dir, manifest_path, previous, opts, args.workers,
                         args.retry_failed, not args.no_progress)

    failed = [outcomes[r.key] for r in refs if outcomes[r.key].status != "ok"]
    note = {"skipped": " (earlier run; not requested again without --retry-failed)"}
    failure_rows = [(o.key, o.reason + note.get(o.action, "")) for o in failed]
    write_rows_csv(out_dir / FAILURES_NAME, ("url", "reason"), failure_rows)
    if failed:
        _show([f"{url}: {reason}" for url, reason in failure_rows], "image(s) failed", out_dir / FAILURES_NAME)

    # Triplets whose three images all exist, in input order.
    kept = [rec for rec in records if all(outcomes[r.key].status == "ok" for r in rec.refs)]
    n_dropped = len(records) - len(kept) + len(malformed)
    if not kept:
        raise UserError(f"none of the {len(records)} triplet(s) has all three images "
                        f"({len(failed)} image(s) failed, see {out_dir / FAILURES_NAME}); no CSV written")

    csv_path = out_dir / args.csv
    val_path = csv_path.with_name(f"{csv_path.stem}_val{csv_path.suffix or '.csv'}")
    train, val = write_split(kept, outcomes, out_dir, csv_path, val_path, args.val_fraction)

    actions = [o.action for o in outcomes.values()]
    fetched = ", ".join(f"{actions.count(a)} {a}" for a in ("downloaded", "copied", "reused") if actions.count(a))
    left_out = len(kept) - len(train) - len(val)
    both = f", {left_out} left out of both" if left_out else ""  # a held-out image as positive or negative
    val_note = f" (+ {len(val)} held out in {val_path}{both})" if val else ""
    print(f"{len(train)} triplets written to {csv_path}{val_note}, {n_dropped} dropped "
          f"({len(malformed)} malformed, {len(records) - len(kept)} with a failed image), "
          f"{len(failed)} images failed; images: {fetched or 'none'}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

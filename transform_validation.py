"""Restructure TinyImageNet's val/ split into class folders (optionally downloading it first).

TinyImageNet ships val as ``val/images/val_<i>.JPEG`` plus ``val/val_annotations.txt``
(file TAB wnid TAB x0 TAB y0 TAB x1 TAB y1). Every other stage wants the train layout,
so this script moves each image to ``val/<wnid>/images/`` and writes
``val/<wnid>/<wnid>_boxes.txt`` (file TAB x0 TAB y0 TAB x1 TAB y1). On success the
annotations file moves to ``<root>/val_annotations.txt``: a ``val/val_annotations.txt``
that is still there means "not restructured" (see image_data.resolve_split_dir).

Safety: every annotation line is validated before any file moves; moves use
os.replace (never a copy + delete) and never overwrite; a re-run after an
interruption finishes the job; a re-run after success does nothing.

    python transform_validation.py --data-dir tiny-imagenet-200 [--download]

--download resumes a partial ``.part`` file, gives up after ``--deadline`` seconds (the
``.part`` kept: run again to resume) and sets a zip that fails its MD5 check or cannot be
extracted aside as ``<zip>.bad`` (saying so), so that the next run downloads it again.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path


from deepranking import argtypes, cli, file_io
from deepranking.cli import UserError
from deepranking.downloads import Deadline, WriteError, deadline_opener, stream_into

DEFAULT_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
DEFAULT_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
ANNOTATIONS = "val_annotations.txt"
CHUNK = 1 << 20  # 1 MiB per read while downloading / hashing / extracting
TIMEOUT_S = 60  # per network operation
DEADLINE_S = 3600.0  # --deadline: the whole download (TinyImageNet's 237 MiB at 70 KiB/s)
BAD_SUFFIX = ".bad"  # a zip that failed its check is renamed <zip>.bad


# ----------------------------------------------------------------------------
# Restructuring
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Annotation:
    line: int  # 1-based line number in val_annotations.txt
    file: str
    wnid: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1


def _safe_name(name: str) -> bool:
    """A single path component: no separators, not '.'/'..', not empty."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def parse_annotations(path: Path, known_wnids: set[str] | None) -> list[Annotation]:
    """Parse and validate val_annotations.txt; raise UserError naming the first bad line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Notepad) is not part of the first name
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text: {exc}")
    annotations: list[Annotation] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing one) carry nothing
        fields = raw.split("\t")
        where = f"{path} line {number}"
        if len(fields) != 6:
            raise UserError(f"{where}: expected 6 tab-separated fields "
                            f"(file, wnid, x0, y0, x1, y1), found {len(fields)}: {raw!r}")
        file, wnid = fields[0].strip(), fields[1].strip()
        if not _safe_name(file):
            raise UserError(f"{where}: bad file name {file!r}")
        if not _safe_name(wnid) or wnid == "images":
            raise UserError(f"{where}: bad wnid {wnid!r}")
        try:
            box = tuple(int(v) for v in fields[2:])
        except ValueError:
            raise UserError(f"{where} ({file}): box values must be integers, found {fields[2:]}")
        if known_wnids is not None and wnid not in known_wnids:
            raise UserError(f"{where} ({file}): wnid {wnid!r} is not in wnids.txt")
        if file in first_line:
            raise UserError(f"{where}: duplicate file name {file} (first on line {first_line[file]})")
        first_line[file] = number
        annotations.append(Annotation(number, file, wnid, box))  # type: ignore[arg-type]
    if not annotations:
        raise UserError(f"annotations file has no entries: {path}")
    return annotations


def read_wnids(root: Path) -> set[str] | None:
    """The wnids listed in ``root/wnids.txt``, or None when the file is absent."""
    path = root / "wnids.txt"
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text: {exc}")
    return {w.strip() for w in text.splitlines() if w.strip()}


def plan_moves(val_dir: Path, annotations: list[Annotation], ann_path: Path) -> list[tuple[Path, Path]]:
    """(source, destination) pairs still to move; raise UserError on any inconsistency.

    A file already at its destination (interrupted earlier run) needs no move; a file
    in both places, or in neither, is an error. So is an unannotated file in val/images.
    """
    src_dir = val_dir / "images"
    present = set(os.listdir(src_dir)) if src_dir.is_dir() else set()
    moves: list[tuple[Path, Path]] = []
    for a in annotations:
        src = src_dir / a.file
        dst = val_dir / a.wnid / "images" / a.file
        in_src, in_dst = a.file in present, dst.exists()
        where = f"{ann_path} line {a.line}"
        if in_src and in_dst:
            raise UserError(f"{where}: {a.file} exists both in {src_dir} and at {dst}; "
                            f"remove one copy by hand (nothing was moved)")
        if not in_src and not in_dst:
            raise UserError(f"{where}: image {a.file} not found in {src_dir} or {dst.parent}")
        if in_src:
            if not src.is_file():
                raise UserError(f"{where}: {src} is not a file")
            moves.append((src, dst))
    for wnid in sorted({a.wnid for a in annotations}):
        for folder in (val_dir / wnid, val_dir / wnid / "images"):
            if folder.exists() and not folder.is_dir():
                raise UserError(f"{folder} is a file, but the images of class {wnid} go there; "
                                f"move it away (nothing was moved)")
    extra = sorted(present - {a.file for a in annotations})
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise UserError(f"{len(extra)} file(s) in {src_dir} not named in {ann_path}: {shown}")
    return moves


def boxes_text(annotations: list[Annotation]) -> dict[str, str]:
    """wnid -> contents of ``<wnid>_boxes.txt`` (file TAB x0 TAB y0 TAB x1 TAB y1), annotation order."""
    out: dict[str, list[str]] = {}
    for a in annotations:
        out.setdefault(a.wnid, []).append("\t".join([a.file, *map(str, a.box)]) + "\n")
    return {wnid: "".join(lines) for wnid, lines in out.items()}


def is_restructured(val_dir: Path) -> bool:
    """True when val/ holds class folders and nothing of the original layout."""
    if (val_dir / ANNOTATIONS).exists():
        return False
    images = val_dir / "images"
    if images.is_dir() and any(images.iterdir()):
        return False
    return any(p.is_dir() and (p / "images").is_dir() for p in val_dir.iterdir())


def restructure(root: Path) -> int:
    """Restructure ``root/val``; return the number of images moved (0 if already done)."""
    if root.exists() and not root.is_dir():
        raise UserError(f"dataset folder is a file, not a folder: {root}")
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root} (use --download to fetch TinyImageNet)")
    val_dir = root / "val"
    if not val_dir.is_dir():
        raise UserError(f"no 'val' folder in {root}")
    ann_path = val_dir / ANNOTATIONS
    final_ann = root / ANNOTATIONS
    if is_restructured(val_dir):
        print(f"{val_dir} is already restructured (nothing to do)")
        return 0
    file_io.check_input_file(ann_path, "annotations file")  # missing, a folder, a FIFO: said as such
    annotations = parse_annotations(ann_path, read_wnids(root))
    moves = plan_moves(val_dir, annotations, ann_path)
    if final_ann.exists() and final_ann.read_bytes() != ann_path.read_bytes():
        raise UserError(f"{final_ann} already exists and differs from {ann_path}; move it away first")

    # Validation passed: from here on, only os.replace moves within the same folder tree.
    for src, dst in cli.progress(moves, desc="moving val images", unit="img", enabled=len(moves) >= 1000):
        if dst.exists():  # appeared since planning: never overwrite
            raise UserError(f"refusing to overwrite {dst}; re-run to continue")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)  # a rename: the file is in exactly one of the two places
        except OSError as exc:  # e.g. a file named like a class folder, a read-only disk
            raise UserError(f"cannot move {src} to {dst}: {exc.strerror or exc}; "
                            f"fix that and re-run to continue")
    for wnid, text in boxes_text(annotations).items():
        file_io.atomic_write_text(val_dir / wnid / f"{wnid}_boxes.txt", text)
    images_dir = val_dir / "images"
    if images_dir.is_dir():
        images_dir.rmdir()  # empty: plan_moves rejected unannotated files
    os.replace(ann_path, final_ann)  # last step: marks the folder as restructured
    n_classes = len({a.wnid for a in annotations})
    print(f"restructured {val_dir}: moved {len(moves)} of {len(annotations)} images into "
          f"{n_classes} class folders; annotations moved to {final_ann}")
    return len(moves)


# ----------------------------------------------------------------------------
# Download + extraction
# ----------------------------------------------------------------------------


def md5_arg(value: str) -> str | None:
    """argparse type: 32 hex digits, or 'none' to skip the check."""
    if value.lower() == "none":
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{32}", value):
        raise argparse.ArgumentTypeError(f"expected 32 hex digits or 'none', got {value!r}")
    return value.lower()


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def zip_name(url: str) -> str:
    name = Path(urllib.parse.urlparse(url).path).name
    return name if _safe_name(name) else "tiny-imagenet-200.zip"


def _network_error(url: str, final: Path, exc: BaseException) -> UserError:
    reason = f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError) else str(
        getattr(exc, "reason", exc))
    reason = " ".join(str(reason).split())  # a redirect loop's reason spans three lines
    return UserError(f"download of {url} failed ({reason}); download it by hand and put it at {final}, "
                     f"then re-run with --download")


def check_url(url: str) -> None:
    """Only http(s) URLs: the download speaks HTTP (Range, status codes)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise UserError(f"--url is not a valid URL ({exc}): {url!r}")
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise UserError(f"--url must be an http:// or https:// address, got {url!r}")


def _open(url: str, final: Path, offset: int, deadline: Deadline):
    """urlopen ``url`` from byte ``offset``; None when the server says the range is past the end."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return deadline_opener(deadline).open(request, timeout=max(0.001, min(TIMEOUT_S, deadline.remaining())))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part already holds the whole file (MD5 checks it)
            return None
        raise _network_error(url, final, exc)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise _past_deadline(url, final, deadline) if deadline.expired else _network_error(url, final, exc)


def _past_deadline(url: str, final: Path, deadline: Deadline) -> UserError:
    part = final.with_name(final.name + ".part")
    got = f" ({part.stat().st_size} bytes in {part})" if part.exists() else ""
    return UserError(f"download of {url} did not finish within --deadline {deadline.seconds:g} s{got}; re-run to "
                     f"resume, or raise --deadline")


def fetch(url: str, part: Path, final: Path, deadline: Deadline | None = None) -> None:
    """Download ``url`` into ``part``, resuming a partial file with an HTTP Range request, within
    ``deadline`` (default: none); a full disk is said as such, the ``.part`` kept for resuming."""
    deadline = deadline or Deadline(None)
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, final, offset, deadline)
    if response is None:
        return
    if offset:
        content_range = response.headers.get("Content-Range", "")
        if response.status != 206 or not content_range.startswith(f"bytes {offset}-"):
            # Range ignored (200: the whole file follows) or answered with another range.
            print(f"server did not resume {part.name}; restarting from zero", file=sys.stderr)
            offset = 0
            if response.status != 200:
                response.close()
                response = _open(url, final, 0, deadline)
    with response:
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        try:
            with cli.progress(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=f"downloading {final.name}") as bar:
                stream_into(response, part, append=bool(offset), chunk=CHUNK,
                            on_block=lambda _, block: bar.update(len(block)))
        except WriteError as exc:
            raise UserError(f"{exc}; the partial download is kept: make room and re-run to resume")
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # .part kept for resuming
            raise _past_deadline(url, final, deadline) if deadline.expired else _network_error(url, final, exc)
    if deadline.expired:  # the connection was ended: what looked like the end of the body was not
        raise _past_deadline(url, final, deadline)
    if total is not None and part.stat().st_size != total:
        raise UserError(f"download of {url} stopped early ({part.stat().st_size} of {total} bytes); "
                        f"re-run to resume, or put a hand-downloaded zip at {final}")


def download(url: str, md5: str | None, dest_dir: Path, deadline_s: float | None = None) -> Path:
    """The verified zip in ``dest_dir``: reused if already there, else downloaded within
    ``deadline_s`` seconds. One there whose MD5 is wrong is set aside (:func:`set_aside`) and
    downloaded again."""
    check_url(url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / zip_name(url)
    if final.exists():
        if md5 is None or file_md5(final) == md5:
            print(f"using existing {final}")
            return final
        aside = set_aside(final)
        cli.warn(f"{final} is not the file expected (its MD5 is not {md5}): moved it to {aside} and downloading "
                 f"again (pass --md5 none to use a zip of another MD5)")
    part = final.with_name(final.name + ".part")
    with Deadline(deadline_s) as deadline:
        fetch(url, part, final, deadline)
    if md5 is not None:
        got = file_md5(part)
        if got != md5:
            part.unlink()
            raise UserError(f"MD5 mismatch for {url}: expected {md5}, got {got} (download deleted; "
                            f"re-run, or pass the right --md5, or --md5 none to skip the check)")
    os.replace(part, final)
    return final


def set_aside(path: Path) -> Path:
    """Rename a zip that failed its check to ``<name>.bad`` (replacing an older one); returns the new path."""
    aside = path.with_name(path.name + BAD_SUFFIX)
    try:
        os.replace(path, aside)
    except OSError as exc:
        raise UserError(f"{path} failed its check and cannot be moved aside ({cli.os_reason(exc)}); delete it")
    return aside


class BadArchive(UserError):
    """The zip itself cannot be extracted (damaged, unsafe, encrypted, an unknown method): not the disk."""


def _member_parts(info: zipfile.ZipInfo) -> list[str]:
    """Path components of a zip member; raise BadArchive for zip-slip or link entries."""
    name = info.filename.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts or not parts:
        raise BadArchive(f"unsafe path in zip: {info.filename!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise BadArchive(f"zip contains a symbolic link: {info.filename!r}")
    return parts


# What zipfile raises for a damaged or unsupported archive (RuntimeError: an encrypted member;
# NotImplementedError: a compression method zipfile lacks; zlib.error: a damaged deflate stream).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError, zlib.error, ValueError)


def extract(zip_path: Path, root: Path) -> None:
    """Extract a zip whose entries sit under one top folder into ``root`` (all or nothing).

    Members are checked before anything is written; extraction goes to a temporary
    folder next to ``root`` (``.<root>.<pid>.<random>.tmp``; a killed run's is removed by the
    next) that is renamed into place at the end. A fault of the zip itself raises BadArchive,
    one of the disk (full, read-only) a plain UserError.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, *_ARCHIVE_ERRORS) as exc:
        raise BadArchive(f"cannot open zip {zip_path}: {exc}")
    with zf:
        members = [(info, _member_parts(info)) for info in zf.infolist()]
        tops = {parts[0] for _, parts in members}
        if len(tops) != 1 or any(len(p) == 1 and not i.is_dir() for i, p in members):
            raise BadArchive(f"{zip_path} must hold a single top folder (like tiny-imagenet-200/)")
        try:
            tmp = file_io.make_temporary(root, folder=True)
        except OSError as exc:
            raise UserError(f"cannot write {root.parent}: {cli.os_reason(exc)}")
        try:
            for info, parts in cli.progress(members, desc=f"extracting {zip_path.name}", unit="file"):
                _extract_member(zf, info, tmp.joinpath(*parts[1:]))
            if root.exists():
                root.rmdir()  # only an empty folder gets here (see main)
            os.replace(tmp, root)
        except _ARCHIVE_ERRORS as exc:
            raise BadArchive(f"cannot extract {zip_path}: {str(exc) or type(exc).__name__}")
        except OSError as exc:
            raise UserError(f"cannot extract {zip_path} into {root.parent}: {cli.os_reason(exc)}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    """One member to ``target``: the zip's errors (_ARCHIVE_ERRORS) and the disk's (OSError) apart."""
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as dst:
        while True:
            try:
                block = src.read(CHUNK)
            except OSError as exc:  # reading the zip itself: a damaged member, not the disk being written
                raise zipfile.BadZipFile(str(exc))
            if not block:
                break
            dst.write(block)


def has_content(root: Path) -> bool:
    return root.is_dir() and any(root.iterdir())


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Move TinyImageNet's val/images/* into val/<wnid>/images/ (the train layout), "
                    "optionally downloading and extracting the dataset first.")
    parser.add_argument("--data-dir", type=Path, default=Path("tiny-imagenet-200"),
                        help="TinyImageNet root holding wnids.txt, train/ and val/ (default: %(default)s)")
    parser.add_argument("--download", action="store_true",
                        help="download (resumable) and extract the dataset into the parent of --data-dir "
                             "first, unless --data-dir already holds files")
    parser.add_argument("--url", default=DEFAULT_URL, help="zip to download (default: %(default)s)")
    parser.add_argument("--md5", type=md5_arg, default=DEFAULT_MD5,
                        help="expected MD5 of the zip, or 'none' to skip the check (default: %(default)s)")
    parser.add_argument("--deadline", type=argtypes.positive_float, default=DEADLINE_S,
                        help="seconds for the whole download (a partial download is kept: run again to resume; "
                             "default: %(default)s)")
    return parser


def main(args) -> None:
    root = Path(args.data_dir).absolute()
    if args.download:
        if has_content(root):
            print(f"{root} already holds files; skipping download")
        else:
            zip_path = download(args.url, args.md5, root.parent, args.deadline)
            try:
                extract(zip_path, root)
            except BadArchive as exc:  # kept, every later run would fail the same way
                raise UserError(f"{exc}; moved the zip to {set_aside(zip_path)}: run again to download it anew")
            print(f"extracted {zip_path} into {root}")
    restructure(root)


if __name__ == "__main__":
    cli.run(main, get_args_parser())

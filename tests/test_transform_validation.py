"""transform_validation.py: restructuring val/, validation before any move, download + extract.

Downloads run against a local threaded http.server on 127.0.0.1 (nothing leaves the machine).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import write_tiny_imagenet

from deepranking import cli
from deepranking import image_data
import transform_validation as tv


def run_cli(argv, capsys):
    """Run the script in-process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        cli.run(tv.main, tv.get_args_parser(), [str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def read_annotations(root: Path) -> list[list[str]]:
    path = root / "val_annotations.txt"
    if not path.exists():
        path = root / "val" / "val_annotations.txt"
    return [line.split("\t") for line in path.read_text().splitlines() if line]


def snapshot(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root (to prove nothing moved)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_restructured(root: Path, annotations: list[list[str]]) -> None:
    val = root / "val"
    assert not (val / "images").exists()
    assert not (val / "val_annotations.txt").exists()
    assert (root / "val_annotations.txt").is_file()
    for file, wnid, *box in annotations:
        assert (val / wnid / "images" / file).is_file(), file
    by_wnid: dict[str, list[str]] = {}
    for file, wnid, *box in annotations:
        by_wnid.setdefault(wnid, []).append("\t".join([file, *box]))
    for wnid, lines in by_wnid.items():
        assert (val / wnid / f"{wnid}_boxes.txt").read_text().splitlines() == lines
    listing = image_data.list_class_folder(val)
    assert len(listing) == len(annotations)
    got = {Path(p).name: name for p, name in zip(listing.paths, listing.label_names)}
    assert got == {file: wnid for file, wnid, *_ in annotations}
    assert image_data.resolve_split_dir(root, "val") == val


# ----------------------------------------------------------------------------
# Restructuring
# ----------------------------------------------------------------------------


def test_restructure_then_noop(tiny_imagenet_raw, capsys):
    root = tiny_imagenet_raw
    annotations = read_annotations(root)
    with pytest.raises(cli.UserError, match="transform_validation"):
        image_data.resolve_split_dir(root, "val")
    code, out, err = run_cli(["--data-dir", root], capsys)
    assert code == 0, err
    assert "moved 9 of 9 images into 3 class folders" in out
    assert_restructured(root, annotations)

    before = snapshot(root)
    code, out, err = run_cli(["--data-dir", root], capsys)
    assert code == 0, err
    assert "already restructured" in out
    assert snapshot(root) == before


def test_a_byte_order_mark_is_not_part_of_the_first_name(tiny_imagenet_raw, capsys):
    # files saved by Windows Notepad start with U+FEFF: the first image and wnid must still match
    root = tiny_imagenet_raw
    annotations = read_annotations(root)
    for name in ("val/val_annotations.txt", "wnids.txt"):
        (root / name).write_bytes(b"\xef\xbb\xbf" + (root / name).read_bytes())
    code, out, err = run_cli(["--data-dir", root], capsys)
    assert code == 0, err
    assert_restructured(root, annotations)


def test_interrupted_run_completes(tiny_imagenet_raw, capsys):
    root = tiny_imagenet_raw
    annotations = read_annotations(root)
    for file, wnid, *_ in annotations[: len(annotations) // 2]:  # what a crashed run leaves
        dest = root / "val" / wnid / "images"
        dest.mkdir(parents=True, exist_ok=True)
        os.replace(root / "val" / "images" / file, dest / file)
    code, out, err = run_cli(["--data-dir", root], capsys)
    assert code == 0, err
    assert "moved 5 of 9 images" in out
    assert_restructured(root, annotations)


def test_interrupted_after_all_moves(tiny_imagenet_raw, capsys):
    """Crash after val/images was removed but before the annotations file moved."""
    root = tiny_imagenet_raw
    annotations = read_annotations(root)
    for file, wnid, *_ in annotations:
        dest = root / "val" / wnid / "images"
        dest.mkdir(parents=True, exist_ok=True)
        os.replace(root / "val" / "images" / file, dest / file)
    (root / "val" / "images").rmdir()
    code, out, err = run_cli(["--data-dir", root], capsys)
    assert code == 0, err
    assert_restructured(root, annotations)


def _set_line(root: Path, index: int, text: str | None) -> None:
    path = root / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines(keepends=True)
    if text is None:
        del lines[index]
    else:
        lines[index] = text
    path.write_text("".join(lines))


def _malformed(root):
    _set_line(root, 3, "val_3.JPEG\tn00000001\t0\t0\t31\n")  # 5 fields


def _not_integer(root):
    _set_line(root, 3, "val_3.JPEG\tn00000001\t0\tzero\t31\t31\n")


def _missing_file(root):
    (root / "val" / "images" / "val_4.JPEG").unlink()


def _unknown_wnid(root):
    _set_line(root, 3, "val_3.JPEG\tn99999999\t0\t0\t31\t31\n")


def _duplicate(root):
    _set_line(root, 3, "val_2.JPEG\tn00000001\t0\t0\t31\t31\n")


def _in_both_places(root):
    dest = root / "val" / "n00000001" / "images"
    dest.mkdir(parents=True)
    shutil.copy(root / "val" / "images" / "val_3.JPEG", dest / "val_3.JPEG")


def _unannotated_image(root):
    _set_line(root, 3, None)


def _class_folder_is_a_file(root):
    (root / "val" / "n00000002").write_text("not a folder")


def _missing_annotations(root):
    (root / "val" / "val_annotations.txt").unlink()


def _missing_val(root):
    shutil.rmtree(root / "val")


def _latin1_wnids(root):
    (root / "wnids.txt").write_bytes("n00000000\nn0000000\xe9\n".encode("latin-1"))


@pytest.mark.parametrize("corrupt, message", [
    (_malformed, r"val_annotations.txt line 4: expected 6 tab-separated fields"),
    (_not_integer, r"line 4 \(val_3.JPEG\): box values must be integers"),
    (_missing_file, r"line 5: image val_4.JPEG not found"),
    (_unknown_wnid, r"line 4 \(val_3.JPEG\): wnid 'n99999999' is not in wnids.txt"),
    (_duplicate, r"line 4: duplicate file name val_2.JPEG \(first on line 3\)"),
    (_in_both_places, r"line 4: val_3.JPEG exists both in"),
    (_unannotated_image, r"1 file\(s\) in .* not named in .*: val_3.JPEG"),
    (_class_folder_is_a_file, r"n00000002 is a file, but the images of class n00000002 go there"),
    (_missing_annotations, r"annotations file not found: .*val_annotations.txt"),
    (_missing_val, r"no 'val' folder in"),
    (_latin1_wnids, r"wnids.txt is not UTF-8 text"),
])
def test_bad_input_moves_nothing(tiny_imagenet_raw, capsys, corrupt, message):
    root = tiny_imagenet_raw
    corrupt(root)
    before = snapshot(root)
    code, out, err = run_cli(["--data-dir", root], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert snapshot(root) == before


def test_missing_dataset_folder(tmp_path, capsys):
    code, _, err = run_cli(["--data-dir", tmp_path / "nope"], capsys)
    assert code == 2
    assert "dataset folder not found" in err and "--download" in err


# ----------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        if self.path != "/tiny-imagenet-200.zip":
            self.send_error(404)
            return
        data, start = server.payload, 0
        rng = self.headers.get("Range")
        if rng and server.honour_range == "from_zero":  # 206, but not the range asked for
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
        elif rng and server.honour_range:
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        end = len(data) if server.cut_at is None else server.cut_at
        self.wfile.write(data[start:end])  # cut_at: the connection drops mid-file

    def log_message(self, *args):
        pass


@pytest.fixture
def zip_server(tmp_path, monkeypatch):
    """Serve a zip of a fresh raw miniature TinyImageNet; yields (server, url, md5)."""
    src = tmp_path / "src" / "tiny-imagenet-200"
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # stay on 127.0.0.1
        monkeypatch.delenv(var, raising=False)
    write_tiny_imagenet(src, restructured=False)
    zip_path = tmp_path / "src" / "tin.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, Path("tiny-imagenet-200") / p.relative_to(src))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.payload = zip_path.read_bytes()
    server.ranges = []
    server.honour_range = True
    server.cut_at = None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tiny-imagenet-200.zip"
        yield server, url, hashlib.md5(server.payload).hexdigest()
    finally:
        server.shutdown()
        server.server_close()


def test_download_extract_restructure(tmp_path, zip_server, capsys):
    server, url, md5 = zip_server
    root = tmp_path / "dl" / "tiny-imagenet-200"
    code, out, err = run_cli(["--data-dir", root, "--download", "--url", url, "--md5", md5], capsys)
    assert code == 0, err
    assert server.ranges == [None]
    assert (tmp_path / "dl" / "tiny-imagenet-200.zip").read_bytes() == server.payload
    assert not (tmp_path / "dl" / "tiny-imagenet-200.zip.part").exists()
    assert_restructured(root, read_annotations(root))
    assert len(image_data.list_class_folder(root / "train")) == 24
    # Second run: nothing downloaded, nothing changed.
    before = snapshot(root)
    code, out, err = run_cli(["--data-dir", root, "--download", "--url", url, "--md5", md5], capsys)
    assert code == 0, err
    assert "already restructured" in out and len(server.ranges) == 1
    assert snapshot(root) == before


def test_existing_zip_not_redownloaded(tmp_path, zip_server, capsys):
    server, url, md5 = zip_server
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "tiny-imagenet-200.zip").write_bytes(server.payload)
    root = tmp_path / "dl" / "tiny-imagenet-200"
    code, out, err = run_cli(["--data-dir", root, "--download", "--url", url, "--md5", md5], capsys)
    assert code == 0, err
    assert server.ranges == [] and "using existing" in out
    assert (root / "val" / "n00000000" / "images").is_dir()


@pytest.mark.parametrize("honour_range", [True, False, "from_zero"])
def test_download_resumes_part(tmp_path, zip_server, capsys, honour_range):
    server, url, md5 = zip_server
    server.honour_range = honour_range
    half = len(server.payload) // 2
    (tmp_path / "dl").mkdir()
    part = tmp_path / "dl" / "tiny-imagenet-200.zip.part"
    part.write_bytes(server.payload[:half])
    root = tmp_path / "dl" / "tiny-imagenet-200"
    code, out, err = run_cli(["--data-dir", root, "--download", "--url", url, "--md5", md5], capsys)
    assert code == 0, err
    # A wrong 206 answer is dropped and the file fetched again without a Range header.
    assert server.ranges == [f"bytes={half}-"] + ([None] if honour_range == "from_zero" else [])
    assert ("restarting from zero" in err) == (honour_range is not True)
    assert (tmp_path / "dl" / "tiny-imagenet-200.zip").read_bytes() == server.payload
    assert not part.exists()
    assert_restructured(root, read_annotations(root))


def test_download_wrong_md5(tmp_path, zip_server, capsys):
    server, url, _ = zip_server
    root = tmp_path / "dl" / "tiny-imagenet-200"
    code, _, err = run_cli(["--data-dir", root, "--download", "--url", url, "--md5", "0" * 32], capsys)
    assert code == 2 and "MD5 mismatch" in err
    assert sorted(os.listdir(tmp_path / "dl")) == []  # .part deleted, nothing extracted


def test_download_404(tmp_path, zip_server, capsys):
    server, url, md5 = zip_server
    root = tmp_path / "dl" / "tiny-imagenet-200"
    bad = url.replace("tiny-imagenet-200.zip", "missing.zip")
    code, _, err = run_cli(["--data-dir", root, "--download", "--url", bad], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "HTTP 404" in err and bad in err and str(tmp_path / "dl" / "missing.zip") in err
    assert not root.exists()


def test_download_rejects_zip_slip(tmp_path, zip_server, capsys):
    server, url, _ = zip_server
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n00000000\n")
        zf.writestr("tiny-imagenet-200/../../escaped.txt", "gotcha")
    server.payload = evil.read_bytes()
    root = tmp_path / "dl" / "tiny-imagenet-200"
    code, _, err = run_cli(["--data-dir", root, "--download", "--url", url, "--md5", "none"], capsys)
    assert code == 2 and "unsafe path in zip" in err and err.count("\n") == 1
    assert not root.exists() and not (tmp_path / "escaped.txt").exists()
    # set aside, or every later run would fail on the same zip
    assert os.listdir(tmp_path / "dl") == ["tiny-imagenet-200.zip.bad"] and "tiny-imagenet-200.zip.bad" in err


def _patch_zip_headers(data: bytes, flag_bits: int = 0, method: int | None = None) -> bytes:
    """The zip with every local and central header given extra flag bits and/or another method."""
    out = bytearray(data)
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = out.find(signature)
        while at != -1:
            flags = int.from_bytes(out[at + flags_at:at + flags_at + 2], "little") | flag_bits
            out[at + flags_at:at + flags_at + 2] = flags.to_bytes(2, "little")
            if method is not None:
                out[at + flags_at + 2:at + flags_at + 4] = method.to_bytes(2, "little")
            at = out.find(signature, at + 4)
    return bytes(out)


@pytest.mark.parametrize("flag_bits, method, message", [
    (0x1, None, "is encrypted"),  # bit 0: an encrypted member, which zipfile cannot read without a password
    (0, 98, "compression method is not supported"),  # PPMd, which zipfile has no decoder for
])
def test_download_of_a_zip_that_cannot_be_extracted(tmp_path, zip_server, capsys, flag_bits, method, message):
    server, url, _ = zip_server
    server.payload = _patch_zip_headers(server.payload, flag_bits, method)
    root = tmp_path / "dl" / "tiny-imagenet-200"
    code, _, err = run_cli(["--data-dir", root, "--download", "--url", url, "--md5", "none"], capsys)
    assert code == 2 and err.startswith("error: cannot extract") and message in err and err.count("\n") == 1
    assert not root.exists() and os.listdir(tmp_path / "dl") == ["tiny-imagenet-200.zip.bad"]  # no extraction left


def test_bad_md5_argument(tmp_path, capsys):
    code, _, err = run_cli(["--data-dir", tmp_path, "--md5", "xyz"], capsys)
    assert code == 2 and "expected 32 hex digits" in err


def test_dropped_connection_keeps_part_and_resumes(tmp_path, zip_server, capsys):
    server, url, md5 = zip_server
    cut = len(server.payload) // 3
    server.cut_at = cut
    root = tmp_path / "dl" / "tiny-imagenet-200"
    argv = ["--data-dir", root, "--download", "--url", url, "--md5", md5]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "stopped early" in err and "re-run to resume" in err
    part = tmp_path / "dl" / "tiny-imagenet-200.zip.part"
    assert part.read_bytes() == server.payload[:cut] and not root.exists()
    server.cut_at = None
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert server.ranges == [None, f"bytes={cut}-"]
    assert_restructured(root, read_annotations(root))


def test_connection_refused_is_one_clear_line(tmp_path, capsys):
    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/tin.zip"
    root = tmp_path / "dl" / "tiny-imagenet-200"
    code, _, err = run_cli(["--data-dir", root, "--download", "--url", url], capsys)
    assert code == 2 and err.count("\n") == 1
    assert url in err and "by hand" in err and str(tmp_path / "dl" / "tin.zip") in err
    assert os.listdir(tmp_path / "dl") == []


def test_non_http_url_rejected(tmp_path, capsys):
    root = tmp_path / "dl" / "tiny-imagenet-200"
    code, _, err = run_cli(["--data-dir", root, "--download", "--url", "ftp://example.org/t.zip"], capsys)
    assert code == 2 and "http:// or https://" in err
    code, _, err = run_cli(["--data-dir", root, "--download", "--url", "http://[::1/t.zip"], capsys)
    assert code == 2 and err == "error: --url is not a valid URL (Invalid IPv6 URL): 'http://[::1/t.zip'\n"
    assert not (tmp_path / "dl").exists()


def test_script_entry_point(tiny_imagenet_raw, tmp_path):
    """The real command line: exit 0 and a restructured tree; exit 2 and one line on bad input."""
    script = Path(tv.__file__)
    ok = subprocess.run([sys.executable, script, "--data-dir", tiny_imagenet_raw],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert_restructured(tiny_imagenet_raw, read_annotations(tiny_imagenet_raw))
    bad = subprocess.run([sys.executable, script, "--data-dir", tmp_path / "missing"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: dataset folder not found")

"""import_triplets.py against a local HTTP server (127.0.0.1 only) serving generated images.

Name resolution is faked (``dns`` fixture): no test looks up a real host name.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepranking import image_data
import import_triplets
from deepranking.cli import UserError

REPO = Path(__file__).resolve().parents[1]
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def image_bytes(seed: int, fmt: str = "PNG", size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


class Resp:
    def __init__(self, body=b"", status=200, ctype="image/png", delay=0.0, send_length=True, length=None,
                 headers=None):
        self.body, self.status, self.ctype, self.delay, self.send_length = body, status, ctype, delay, send_length
        self.length = len(body) if length is None else length  # a larger value: the connection drops mid-body
        self.headers = headers or {}


def redirect(location: str, status: int = 302) -> Resp:
    return Resp(b"moved", status, "text/plain", headers={"Location": location})


class LocalServer:
    """Threaded HTTP server on 127.0.0.1:<free port>; ``routes[path]`` is a Resp or a list served in turn
    (the last one repeats). ``counts`` counts requests per path."""

    def __init__(self):
        self.routes: dict[str, Resp | list[Resp]] = {}
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    n = server.counts[self.path]
                    server.counts[self.path] += 1
                route = server.routes.get(self.path, Resp(b"not found", 404, "text/plain"))
                if isinstance(route, list):
                    route = route[min(n, len(route) - 1)]
                time.sleep(route.delay)
                try:
                    self.send_response(route.status)
                    self.send_header("Content-Type", route.ctype)
                    for name, value in route.headers.items():
                        self.send_header(name, value)
                    if route.send_length:
                        self.send_header("Content-Length", str(route.length))
                    self.end_headers()
                    self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, size limit)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """No proxy, and any connection to a host other than 127.0.0.1 fails the test; returns the addresses
    connected to (a refused URL must add none)."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    real = socket.create_connection
    seen = []

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"test tried to reach {address}"
        seen.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return seen


@pytest.fixture(autouse=True)
def dns(monkeypatch):
    """Fake resolver: IP literals resolve to themselves, names to ``dns[name]`` (a list of addresses), any
    other name is unknown. ``dns.lookups`` lists the names looked up."""

    class FakeDNS(dict):
        lookups: list

    table = FakeDNS()
    table.lookups = []

    def resolve(host, port):
        table.lookups.append(host)
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(table[host])

    monkeypatch.setattr(import_triplets, "resolve_host", resolve)
    return table


@pytest.fixture
def server():
    s = LocalServer()
    for i in range(12):
        s.routes[f"/img{i}.png"] = Resp(image_bytes(i))
    s.routes["/photo.jpg"] = Resp(image_bytes(100, "JPEG"), ctype="image/jpeg")
    yield s
    s.close()


def run_import(input_path, out_dir, *extra, private_hosts=True):
    """main() with fast network settings (and --allow-private-hosts for the 127.0.0.1 server unless
    ``private_hosts=False``); returns nothing (raises UserError on bad input)."""
    flags = ["--allow-private-hosts"] if private_hosts else []
    args = import_triplets.get_args_parser().parse_args(
        [str(input_path), "--output-dir", str(out_dir), "--timeout", "2", "--retries", "1",
         "--backoff", "0.01", "--workers", "4", "--no-progress", *flags, *map(str, extra)])
    import_triplets.main(args)


def four_line(records) -> str:
    """4-line records (text, query, positive, negative) separated by blank lines."""
    return "\n\n".join(f"query {i} text, with a comma\n{q}\n{p}\n{n}" for i, (q, p, n) in enumerate(records)) + "\n"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def images_of(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "images").iterdir())


def test_four_line_format_dedup_and_csv_output(tmp_path, server, capsys):
    u = server.url
    triplets = [(u("/img0.png"), u("/img1.png"), u("/img2.png")),
                (u("/img0.png"), u("/img3.png"), u("/photo.jpg")),
                (u("/img4.png"), u("/img1.png"), u("/img0.png"))]
    src = tmp_path / "query_and_triplets.txt"
    src.write_text(four_line(triplets))
    out = tmp_path / "out"
    run_import(src, out)

    # Each distinct URL requested exactly once although img0/img1 repeat.
    assert server.counts == Counter({"/img0.png": 1, "/img1.png": 1, "/img2.png": 1, "/img3.png": 1,
                                     "/photo.jpg": 1, "/img4.png": 1})
    q, p, n = image_data.read_triplet_csv(out / "triplets.csv")
    assert len(q) == 3
    # Input order kept; file names are sha1(url)[:16] + extension from the content.
    stem = import_triplets.image_stem
    assert Path(q[0]).name == stem(u("/img0.png")) + ".png"
    assert Path(n[1]).name == stem(u("/photo.jpg")) + ".jpg"
    assert q[0] == q[1] == n[2] and Path(q[2]).name == stem(u("/img4.png")) + ".png"
    # Downloaded bytes are the served bytes; paths in the CSV are relative to its folder.
    assert Path(p[0]).read_bytes() == image_bytes(1)
    assert (out / "triplets.csv").read_text().splitlines()[1].startswith("images/")
    assert len(images_of(out)) == 6
    manifest = read_rows(out / "manifest.csv")
    assert {r["status"] for r in manifest} == {"ok"} and len(manifest) == 6
    assert read_rows(out / "failures.csv") == []
    assert "3 triplets written" in capsys.readouterr().out


def test_failures_are_reported_and_their_triplets_dropped(tmp_path, server, capsys):
    truncated = image_bytes(7, "JPEG", size=64)
    server.routes.update({
        "/slow.png": Resp(image_bytes(20), delay=1.0),
        "/page.jpg": Resp(b"<html>soft 404</html>", ctype="text/html"),
        "/big.png": Resp(image_bytes(21, size=64)),  # Content-Length above --max-bytes
        "/big-stream.png": Resp(image_bytes(22, size=64), send_length=False),  # no length: stream aborted
        "/trunc.jpg": Resp(truncated[: len(truncated) // 2], ctype="image/jpeg"),
        "/flaky.png": [Resp(b"oops", 500, "text/plain"), Resp(image_bytes(23))],
        # The connection drops half-way through the body: retried, then reported; no half file kept.
        "/dropped.jpg": Resp(truncated[: len(truncated) // 2], ctype="image/jpeg", length=len(truncated)),
    })
    assert len(image_bytes(21, size=64)) > 5000 and len(image_bytes(0)) < 5000
    u = server.url
    bad = ["/missing.png", "/slow.png", "/page.jpg", "/big.png", "/big-stream.png", "/trunc.jpg", "/dropped.jpg"]
    triplets = [(u("/img0.png"), u("/img1.png"), u("/flaky.png"))]
    triplets += [(u("/img0.png"), u(path), u("/img2.png")) for path in bad]
    src = tmp_path / "list.txt"
    src.write_text(four_line(triplets))
    out = tmp_path / "out"
    start = time.monotonic()
    run_import(src, out, "--timeout", "0.3", "--retries", "1", "--max-bytes", "5000")
    assert time.monotonic() - start < 8

    q, p, n = image_data.read_triplet_csv(out / "triplets.csv")
    assert len(q) == 1 and Path(n[0]).read_bytes() == image_bytes(23)  # 500 then 200: the retry succeeded
    assert server.counts["/flaky.png"] == 2
    assert server.counts["/missing.png"] == 1  # 404 is not retried
    assert server.counts["/slow.png"] == 2  # timed out, retried once, then given up
    assert server.counts["/page.jpg"] == 1 and server.counts["/trunc.jpg"] == 1

    reasons = {r["url"]: r["reason"] for r in read_rows(out / "failures.csv")}
    assert set(reasons) == {u(path) for path in bad}
    assert "404" in reasons[u("/missing.png")]
    assert "timed out" in reasons[u("/slow.png")] and "2 attempts" in reasons[u("/slow.png")]
    assert "text/html" in reasons[u("/page.jpg")]
    assert "Content-Length" in reasons[u("/big.png")]
    assert "max-bytes" in reasons[u("/big-stream.png")]
    assert "not a readable image" in reasons[u("/trunc.jpg")]
    assert "connection closed after" in reasons[u("/dropped.jpg")] and server.counts["/dropped.jpg"] == 2
    # Nothing half-written remains: only the 4 good images, no temporary files.
    assert len(images_of(out)) == 4
    status = {r["url"]: r["status"] for r in read_rows(out / "manifest.csv")}
    assert status[u("/slow.png")] == "transient" and status[u("/missing.png")] == "failed"
    captured = capsys.readouterr()
    assert "1 triplets written" in captured.out and "7 dropped" in captured.out and "7 images failed" in captured.out
    assert "7 image(s) failed" in captured.err


def test_plain_csv_with_local_files_and_tsv(tmp_path, server):
    data = tmp_path / "data"
    (data / "pics").mkdir(parents=True)
    (data / "pics" / "a.png").write_bytes(image_bytes(30))
    (data / "pics" / "b.jpg").write_bytes(image_bytes(31, "JPEG"))
    (data / "pics" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    src = data / "triplets.csv"
    src.write_text("query,positive,negative\n"
                   f"pics/a.png,pics/b.jpg,{server.url('/img5.png')}\n"
                   f"{data / 'pics' / 'b.jpg'},pics/a.png,pics/broken.jpg\n")
    out = tmp_path / "out"
    run_import(src, out, "--allow-local-files")
    q, p, n = image_data.read_triplet_csv(out / "triplets.csv")
    assert len(q) == 1
    assert Path(q[0]).read_bytes() == image_bytes(30)  # copied (relative to the input's folder)
    assert Path(q[0]).parent == (out / "images").resolve()
    failures = read_rows(out / "failures.csv")
    assert [r["url"] for r in failures] == [str((data / "pics" / "broken.jpg").resolve())]

    # Same content as TSV without header, into a fresh folder.
    tsv = data / "triplets.tsv"
    tsv.write_text(f"pics/a.png\tpics/b.jpg\t{server.url('/img5.png')}\n")
    run_import(tsv, tmp_path / "out_tsv", "--allow-local-files")
    assert len(image_data.read_triplet_csv(tmp_path / "out_tsv" / "triplets.csv")[0]) == 1


def test_local_paths_with_spaces_in_a_headerless_csv_and_in_4_line_records(tmp_path):
    # format detection and 4-line records take an existing file for an image even with spaces in
    # its path (a text line has spaces too, so only the file's existence can tell them apart)
    pics = tmp_path / "my photos"
    pics.mkdir()
    for i, name in enumerate(("q a.png", "p.png", "n.png")):
        (pics / name).write_bytes(image_bytes(40 + i))
    refs = ["my photos/q a.png", "my photos/p.png", "my photos/n.png"]
    csv_in, lines_in = tmp_path / "t.csv", tmp_path / "t.txt"
    csv_in.write_text(",".join(refs) + "\n" + ",".join(reversed(refs)) + "\n")
    lines_in.write_text(four_line([refs]))
    for src, out, triplets in ((csv_in, tmp_path / "o1", 2), (lines_in, tmp_path / "o2", 1)):
        run_import(src, out, "--allow-local-files")
        q, p, n = image_data.read_triplet_csv(out / "triplets.csv")
        assert len(q) == triplets and Path(q[0]).read_bytes() == (pics / Path(refs[0]).name).read_bytes()


def test_malformed_records_reported_with_line_numbers(tmp_path, server, capsys):
    u = server.url
    good = four_line([(u("/img0.png"), u("/img1.png"), u("/img2.png"))])
    # line 6-9: a record whose positive is not a URL; line 11-13: a record missing its negative;
    # line 15-16: an incomplete record at end of file.
    src = tmp_path / "list.txt"
    src.write_text(good + "\nsecond\n" + u("/img3.png") + "\nftp://example.org/x.jpg\n" + u("/img4.png") + "\n"
                   + "\nthird\n" + u("/img5.png") + "\n" + u("/img6.png") + "\n"
                   + "\nlast\n" + u("/img7.png") + "\n")
    out = tmp_path / "out"
    run_import(src, out)
    assert len(image_data.read_triplet_csv(out / "triplets.csv")[0]) == 1
    malformed = read_rows(out / "malformed.csv")
    assert [int(r["line"]) for r in malformed] == [8, 11, 15]
    assert "not an http(s) URL" in malformed[0]["reason"]
    assert "2 image line(s)" in malformed[1]["reason"] and "1 image line(s)" in malformed[2]["reason"]
    err = capsys.readouterr().err
    assert "line 8" in err and "line 11" in err and "line 15" in err
    assert server.counts["/img3.png"] == 0  # dropped records are not fetched

    # CSV: a 2-column row and a cell that is neither URL nor existing file.
    src_csv = tmp_path / "t.csv"
    # The query repeated as its own positive or negative: a triplet train_net.py refuses.
    src_csv.write_text(f"query,positive,negative\n{u('/img0.png')},{u('/img1.png')}\n"
                       f"{u('/img0.png')},nope.jpg,{u('/img2.png')}\n{u('/img3.png')},{u('/img1.png')},{u('/img2.png')}\n"
                       f"{u('/img4.png')},{u('/img4.png')},{u('/img2.png')}\n{u('/img5.png')},{u('/img1.png')},{u('/img5.png')}\n")
    run_import(src_csv, tmp_path / "out2")
    malformed = read_rows(tmp_path / "out2" / "malformed.csv")
    assert [(int(r["line"]), r["reason"]) for r in malformed] == [
        (2, "expected 3 columns (query, positive, negative), found 2"),
        (3, "positive: neither an http(s) URL nor an existing file: nope.jpg"),
        (5, "the query image is also the positive"), (6, "the query image is also the negative")]
    assert server.counts["/img4.png"] == server.counts["/img5.png"] == 0
    assert len(image_data.read_triplet_csv(tmp_path / "out2" / "triplets.csv")[0]) == 1


def test_resume_fetches_only_missing_images(tmp_path, server):
    u = server.url
    triplets = [(u(f"/img{i}.png"), u(f"/img{i + 1}.png"), u(f"/img{i + 2}.png")) for i in range(0, 9, 3)]
    src = tmp_path / "list.txt"
    src.write_text(four_line(triplets))
    out = tmp_path / "out"
    # Run 1: the server is "down" (503) for two images.
    server.routes["/img4.png"] = Resp(b"busy", 503, "text/plain")
    server.routes["/img8.png"] = Resp(b"busy", 503, "text/plain")
    run_import(src, out)
    assert len(image_data.read_triplet_csv(out / "triplets.csv")[0]) == 1
    first_files = {name: (out / "images" / name).stat().st_mtime_ns for name in images_of(out)}
    assert len(first_files) == 7

    # Run 2: the server is back; only the two missing URLs are requested.
    server.routes["/img4.png"] = Resp(image_bytes(4))
    server.routes["/img8.png"] = Resp(image_bytes(8))
    server.counts.clear()
    run_import(src, out)
    assert server.counts == Counter({"/img4.png": 1, "/img8.png": 1})
    assert len(image_data.read_triplet_csv(out / "triplets.csv")[0]) == 3
    assert all((out / "images" / n).stat().st_mtime_ns == t for n, t in first_files.items())

    # Run 3: one image and its manifest entry deleted (as after an interrupted run): only it is fetched.
    victim = import_triplets.image_stem(u("/img6.png")) + ".png"
    (out / "images" / victim).unlink()
    rows = [r for r in read_rows(out / "manifest.csv") if r["url"] != u("/img6.png")]
    import_triplets.write_rows_csv(out / "manifest.csv", ("url", "file", "status", "reason"),
                                   [tuple(r.values()) for r in rows])
    server.counts.clear()
    run_import(src, out)
    assert server.counts == Counter({"/img6.png": 1})
    assert len(read_rows(out / "manifest.csv")) == 9

    # A damaged file under a final name (not written by us) is detected and replaced.
    (out / "images" / victim).write_bytes(b"garbage")
    server.counts.clear()
    run_import(src, out)
    assert server.counts == Counter({"/img6.png": 1})
    assert (out / "images" / victim).read_bytes() == image_bytes(6)


def test_permanent_failures_not_requested_again_unless_asked(tmp_path, server):
    u = server.url
    src = tmp_path / "list.txt"
    src.write_text(four_line([(u("/img0.png"), u("/img1.png"), u("/img2.png")),
                              (u("/img0.png"), u("/gone.png"), u("/img2.png"))]))
    out = tmp_path / "out"
    run_import(src, out)
    run_import(src, out)
    assert server.counts["/gone.png"] == 1
    assert "retry-failed" in read_rows(out / "failures.csv")[0]["reason"]
    server.routes["/gone.png"] = Resp(image_bytes(40))
    run_import(src, out, "--retry-failed")
    assert server.counts["/gone.png"] == 2
    assert len(image_data.read_triplet_csv(out / "triplets.csv")[0]) == 2


def test_existing_output_dir_is_continued_not_clobbered(tmp_path, server):
    u = server.url
    out = tmp_path / "out"
    first = tmp_path / "a.txt"
    first.write_text(four_line([(u("/img0.png"), u("/img1.png"), u("/img2.png"))]))
    run_import(first, out)
    (out / "notes.txt").write_text("mine")
    kept = out / "images" / (import_triplets.image_stem(u("/img0.png")) + ".png")
    inode = kept.stat().st_ino

    second = tmp_path / "b.txt"
    second.write_text(four_line([(u("/img0.png"), u("/img3.png"), u("/img4.png"))]))
    server.counts.clear()
    run_import(second, out)
    assert server.counts == Counter({"/img3.png": 1, "/img4.png": 1})
    assert (out / "notes.txt").read_text() == "mine"
    assert kept.stat().st_ino == inode
    assert len(images_of(out)) == 5  # images of the first input are kept
    manifest_urls = {r["url"] for r in read_rows(out / "manifest.csv")}
    assert manifest_urls == {u(f"/img{i}.png") for i in range(5)}  # earlier entries kept
    q, p, n = image_data.read_triplet_csv(out / "triplets.csv")  # the CSV describes the latest input
    assert len(q) == 1 and Path(p[0]).name == import_triplets.image_stem(u("/img3.png")) + ".png"


def test_val_fraction_holds_out_query_images_by_the_shared_rule(tmp_path, server, capsys):
    u = server.url
    # 6 query images, each used by 2 triplets; img1 ... img5 are also positives of other queries.
    triplets = [(u(f"/img{q}.png"), u(f"/img{(q + k + 1) % 12}.png"), u(f"/img{(q + 6) % 12}.png"))
                for q in range(6) for k in range(2)]
    src = tmp_path / "list.txt"
    src.write_text(four_line(triplets))
    out = tmp_path / "a" / "data"
    run_import(src, out, "--val-fraction", "0.4", "--seed", "3")
    err = capsys.readouterr().err
    train = image_data.read_triplet_csv(out / "triplets.csv")
    val = image_data.read_triplet_csv(out / "triplets_val.csv")
    # The rule sees each query as later stages do: class "data" (the output folder), file <sha1(url)[:16]>.png.
    queries = [str(out.resolve() / "images" / f"{import_triplets.image_stem(u(f'/img{q}.png'))}.png")
               for q in range(6)]
    held = {x for x, h in zip(queries, image_data.heldout_images(queries, 0.4)) if h}
    assert image_data.image_key(queries[0]).startswith("data/")
    assert set(val[0]) == held and len(val[0]) == 2 * len(held)  # whole queries move, with all their triplets
    assert not held & set(np.concatenate(train))  # and no held-out image trains in any role
    left_out = 12 - len(train[0]) - len(val[0])
    # Which images are held out follows from the URLs' SHA-1, and the URLs carry the server's port: count
    # the triplets of kept queries that use a held-out image in another role, whatever they are.
    local = dict(zip((u(f"/img{i}.png") for i in range(12)),
                     (str(out.resolve() / "images" / f"{import_triplets.image_stem(u(f'/img{i}.png'))}.png")
                      for i in range(12))))
    expected = sum(local[q] not in held and bool({local[p], local[n]} & held) for q, p, n in triplets)
    assert left_out == expected
    assert (f"{left_out} of 12 training triplets use a held-out query image" in err) == (left_out > 0)

    # Neither the seed nor where the output folder lies moves an image (same folder name: same classes).
    run_import(src, tmp_path / "b" / "data", "--val-fraction", "0.4", "--seed", "9")
    assert (tmp_path / "b" / "data" / "triplets_val.csv").read_text() == (out / "triplets_val.csv").read_text()


def test_no_valid_record_exits_2_and_creates_nothing(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_text("some text\nnot-a-url\n\nmore text\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    res = subprocess.run([sys.executable, str(REPO / "import_triplets.py"), str(src), "--output-dir", str(out)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2
    assert "no valid triplet record" in res.stderr and "line 1" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()

    empty = tmp_path / "empty.csv"
    empty.write_text("query,positive,negative\n")
    with pytest.raises(UserError, match="holds no records"):
        run_import(empty, out)


def test_missing_input_and_bad_output_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    res = subprocess.run([sys.executable, str(REPO / "import_triplets.py"), str(tmp_path / "nope.txt"),
                          "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 2 and "triplet list not found" in res.stderr
    src = tmp_path / "a.csv"
    src.write_text("x\n")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        run_import(src, tmp_path / "file")
    with pytest.raises(UserError, match="file name"):
        run_import(src, tmp_path / "out", "--csv", "sub/t.csv")


def test_all_images_failed_exits_2_without_csv(tmp_path, server):
    src = tmp_path / "list.txt"
    src.write_text(four_line([(server.url("/x.png"), server.url("/y.png"), server.url("/z.png"))]))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="none of the 1 triplet"):
        run_import(src, out)
    assert not (out / "triplets.csv").exists()
    assert len(read_rows(out / "failures.csv")) == 3


def test_format_detection(tmp_path):
    base = tmp_path
    detect = import_triplets.detect_format
    assert detect(["query,positive,negative", "a,b,c"], base) == "csv"
    assert detect(["http://h/a.jpg,http://h/b.jpg,http://h/c.jpg"], base) == "csv"
    assert detect(["a.jpg\tb.jpg\tc.jpg"], base) == "tsv"
    assert detect(["", "red shoes, for women", "http://h/a.jpg"], base) == "lines"
    assert detect(["http://h/a.jpg", "http://h/b.jpg"], base) == "lines"


def test_backoff_is_exponential_seeded_and_not_used_for_404(monkeypatch):
    calls = []

    def failing(url, tmp, opts, deadline=None):
        calls.append(url)
        raise import_triplets.FetchError("HTTP 503", transient=True)

    monkeypatch.setattr(import_triplets, "_download_once", failing)
    opts = import_triplets.FetchOptions(retries=3, backoff=1.0, seed=5)
    delays = []
    with pytest.raises(import_triplets.FetchError, match="after 4 attempts"):
        import_triplets.download("http://127.0.0.1/x", Path("unused"), opts, sleep=delays.append)
    assert len(calls) == 4 and len(delays) == 3
    assert all(2**i <= d < 2 ** (i + 1) for i, d in enumerate(delays))
    again = []
    with pytest.raises(import_triplets.FetchError):
        import_triplets.download("http://127.0.0.1/x", Path("unused"), opts, sleep=again.append)
    assert again == delays

    def gone(url, tmp, opts, deadline=None):
        calls.append(url)
        raise import_triplets.FetchError("HTTP 404")

    calls.clear()
    monkeypatch.setattr(import_triplets, "_download_once", gone)
    with pytest.raises(import_triplets.FetchError):
        import_triplets.download("http://127.0.0.1/x", Path("unused"), opts, sleep=delays.append)
    assert len(calls) == 1


# ----------------------------------------------------------------------------
# What may be fetched: local files, schemes, non-public addresses, redirects
# ----------------------------------------------------------------------------


def test_local_files_refused_without_allow_local_files(tmp_path, server, connections):
    data = tmp_path / "data"
    (data / "pics").mkdir(parents=True)
    (data / "pics" / "a.png").write_bytes(image_bytes(30))
    (data / "pics" / "b.jpg").write_bytes(image_bytes(31, "JPEG"))
    file_url = (data / "pics" / "b.jpg").resolve().as_uri()
    src = data / "triplets.csv"
    src.write_text(f"query,positive,negative\npics/a.png,{file_url},{server.url('/img5.png')}\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="none of the 1 triplet"):
        run_import(src, out)
    reasons = {r["url"]: r["reason"] for r in read_rows(out / "failures.csv")}
    assert reasons == {
        str((data / "pics" / "a.png").resolve()): "refused pics/a.png: local files need --allow-local-files",
        str((data / "pics" / "b.jpg").resolve()): f"refused {file_url}: local files need --allow-local-files",
    }
    assert images_of(out) == [import_triplets.image_stem(server.url("/img5.png")) + ".png"]  # nothing copied
    status = {r["url"]: r["status"] for r in read_rows(out / "manifest.csv")}
    assert status[str((data / "pics" / "a.png").resolve())] == "refused"

    # The same folder with the option: the refusals are checked again (not skipped as earlier failures).
    run_import(src, out, "--allow-local-files")
    q, p, n = image_data.read_triplet_csv(out / "triplets.csv")
    assert Path(q[0]).read_bytes() == image_bytes(30) and Path(p[0]).read_bytes() == image_bytes(31, "JPEG")
    assert read_rows(out / "failures.csv") == []
    assert server.counts["/img5.png"] == 1  # reused, not fetched again


def test_non_public_addresses_refused_without_a_request(tmp_path, server, dns, connections, capsys):
    port = server.httpd.server_address[1]
    answers = {
        "ten.test": ["10.0.0.5"], "metadata.test": ["169.254.169.254"], "loop.test": ["127.0.0.2"],
        "v6loop.test": ["::1"], "ula.test": ["fc00::1"], "mapped.test": ["::ffff:10.0.0.5"],
        "cgnat.test": ["100.64.0.1"], "mixed.test": ["93.184.216.34", "192.168.1.1"],
        "zero.test": ["0.0.0.0"], "mcast.test": ["224.0.0.1"],
    }
    dns.update(answers)
    expected = {f"http://{host}:{port}/img0.png": f"host resolves to {kind} address {addrs[-1]}"
                for (host, addrs), kind in zip(answers.items(), ["private", "link-local", "loopback", "loopback",
                                                                "private", "private", "carrier-grade NAT",
                                                                "private", "unspecified", "multicast"])}
    expected[server.url("/img1.png")] = "host resolves to loopback address 127.0.0.1"  # the real server
    expected[f"http://10.0.0.5:{port}/a.jpg"] = "host resolves to private address 10.0.0.5"
    urls = list(expected)
    src = tmp_path / "list.csv"
    src.write_text("".join(f"{urls[i]},{urls[i + 1]},{urls[i + 2]}\n" for i in range(0, len(urls) - 2, 3)))
    out = tmp_path / "out"
    assert len(urls) == 12
    with pytest.raises(UserError, match="none of the 4 triplet"):
        run_import(src, out, private_hosts=False)
    reasons = {r["url"]: r["reason"] for r in read_rows(out / "failures.csv")}
    assert reasons == {u: f"refused {u}: {why}" for u, why in expected.items()}
    assert server.counts == Counter() and connections == []  # never requested, no socket opened
    assert "refused http://ten.test:" in capsys.readouterr().err

    # Refused in the same run are not retried; a second run checks (and refuses) again without a request.
    n_lookups = len(dns.lookups)
    assert n_lookups == 12
    with pytest.raises(UserError):
        run_import(src, out, private_hosts=False)
    assert len(dns.lookups) == 2 * n_lookups and connections == []
    # --allow-private-hosts lifts the address check (the real server at 127.0.0.1 is then fetched).
    assert import_triplets.check_url(server.url("/img1.png"), allow_private=True) == ["127.0.0.1"]


def test_a_redirect_loop_is_one_line_in_failures_csv(tmp_path, server):
    server.routes["/r-loop.png"] = redirect("/r-loop.png")
    src = tmp_path / "t.csv"
    src.write_text(f"{server.url('/img0.png')},{server.url('/r-loop.png')},{server.url('/img2.png')}\n")
    with pytest.raises(UserError, match="none of the 1 triplet"):
        run_import(src, tmp_path / "out")
    (reason,) = [r["reason"] for r in read_rows(tmp_path / "out" / "failures.csv")]
    assert reason.startswith("HTTP 302 The HTTP server returned a redirect error that would lead to an infinite "
                             "loop. The last 30x error message was: ") and "\n" not in reason


def test_redirect_to_private_address_refused_on_the_hop(tmp_path, server, dns, connections, monkeypatch):
    # cdn.test is the test server, counted as public; intranet.test is a private address.
    real_problem = import_triplets.address_problem
    monkeypatch.setattr(import_triplets, "address_problem", lambda a: None if a == "127.0.0.1" else real_problem(a))
    dns.update({"cdn.test": ["127.0.0.1"], "intranet.test": ["10.0.0.5"]})
    port = server.httpd.server_address[1]
    cdn = f"http://cdn.test:{port}"
    server.routes.update({
        "/r-ok.png": redirect("/img3.png"),  # relative Location, same (public) host: followed
        "/r-private.png": redirect("http://intranet.test/secret.png"),
        "/r-twice.png": redirect(f"{cdn}/r-private.png", 301),  # refused on the second hop
        "/r-ftp.png": redirect("ftp://cdn.test/x.png", 307),
        "/r-file.png": redirect("file:///etc/passwd"),
    })
    bad = ["/r-private.png", "/r-twice.png", "/r-ftp.png", "/r-file.png"]
    triplets = [(f"{cdn}/img0.png", f"{cdn}/img1.png", f"{cdn}/r-ok.png")]
    triplets += [(f"{cdn}/img0.png", f"{cdn}{path}", f"{cdn}/img2.png") for path in bad]
    src = tmp_path / "list.txt"
    src.write_text(four_line(triplets))
    out = tmp_path / "out"
    run_import(src, out, private_hosts=False)

    q, p, n = image_data.read_triplet_csv(out / "triplets.csv")
    assert len(q) == 1 and Path(n[0]).read_bytes() == image_bytes(3)
    reasons = {r["url"]: r["reason"] for r in read_rows(out / "failures.csv")}
    assert reasons == {
        f"{cdn}/r-private.png": "refused http://intranet.test/secret.png: host resolves to private address "
                                f"10.0.0.5 (redirected from {cdn}/r-private.png)",
        f"{cdn}/r-twice.png": "refused http://intranet.test/secret.png: host resolves to private address "
                              f"10.0.0.5 (redirected from {cdn}/r-private.png)",
        f"{cdn}/r-ftp.png": "refused ftp://cdn.test/x.png: redirect to a ftp: URL, only http and https are "
                            f"fetched (redirected from {cdn}/r-ftp.png)",
        f"{cdn}/r-file.png": "refused file:///etc/passwd: redirect to a file: URL, only http and https are "
                             f"fetched (redirected from {cdn}/r-file.png)",
    }
    # Each redirect was requested once (refusals are not retried) and nothing else was.
    assert server.counts == Counter({"/img0.png": 1, "/img1.png": 1, "/img2.png": 1, "/r-ok.png": 1,
                                     "/img3.png": 1, "/r-private.png": 2, "/r-twice.png": 1, "/r-ftp.png": 1,
                                     "/r-file.png": 1})
    # Every connection went to the checked address, one lookup per hop; intranet.test was looked up, never reached.
    assert len(connections) == sum(server.counts.values())
    assert dns.lookups.count("intranet.test") == 2
    assert dns.lookups.count("cdn.test") == sum(server.counts.values())


def test_connection_goes_to_the_checked_address(tmp_path, server, dns, connections, monkeypatch):
    """DNS rebinding: a second lookup would answer a private address; the import never makes one."""
    real_problem = import_triplets.address_problem
    monkeypatch.setattr(import_triplets, "address_problem", lambda a: None if a == "127.0.0.1" else real_problem(a))
    answers = iter([["127.0.0.1"]])
    monkeypatch.setattr(import_triplets, "resolve_host", lambda host, port: next(answers, ["10.0.0.5"]))
    tmp = tmp_path / "x.part"
    url = f"http://rebind.test:{server.httpd.server_address[1]}/img0.png"
    import_triplets._download_once(url, tmp, import_triplets.FetchOptions(timeout=2))
    assert tmp.read_bytes() == image_bytes(0)
    assert connections == [("127.0.0.1", server.httpd.server_address[1])]
    with pytest.raises(import_triplets.Refused, match="private address 10.0.0.5"):
        import_triplets._download_once(url, tmp, import_triplets.FetchOptions(timeout=2))
    assert len(connections) == 1


def test_other_schemes_refused(tmp_path, server, connections):
    for url in ("ftp://example.org/x.jpg", "gopher://example.org/x.jpg", "file:///etc/passwd"):
        with pytest.raises(import_triplets.Refused, match=f"refused {url}: only http and https URLs are fetched"):
            import_triplets.check_url(url)
    for url in ("ftp://example.org/x.jpg", "gopher://example.org/x.jpg", "sftp://example.org/x.jpg"):
        assert import_triplets.parse_ref(url, tmp_path) == f"not an http(s) URL: {url}"
    with pytest.raises(import_triplets.Refused, match="no host"):
        import_triplets.check_url("http:///x.jpg")
    # a cell urlsplit cannot parse is a malformed record, not a traceback that stops the import
    assert import_triplets.parse_ref("http://[::1/a.jpg", tmp_path) == "malformed URL (Invalid IPv6 URL): http://[::1/a.jpg"
    # In an input file an ftp:// cell makes its record malformed: reported with its line, never fetched.
    src = tmp_path / "t.csv"
    src.write_text(f"{server.url('/img0.png')},ftp://127.0.0.1/x.jpg,{server.url('/img2.png')}\n"
                   f"{server.url('/img0.png')},{server.url('/img1.png')},{server.url('/img2.png')}\n")
    run_import(src, tmp_path / "out")
    malformed = read_rows(tmp_path / "out" / "malformed.csv")
    assert [(r["line"], r["reason"]) for r in malformed] == [("1", "positive: not an http(s) URL: ftp://127.0.0.1/x.jpg")]
    assert all(addr[1] == server.httpd.server_address[1] for addr in connections)


@pytest.mark.parametrize("address, problem", [
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.0.1", "private"), ("127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "carrier-grade NAT"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("192.0.2.1", "private"), ("::1", "loopback"),
    ("::", "unspecified"), ("fe80::1", "link-local"), ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("ff02::1", "multicast"), ("fec0::1", "site-local"), ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.5", "private"), ("64:ff9b::a00:5", "private"), ("2002:a00:5::1", "private"),
    ("2001:db8::1", "private"), ("not-an-ip", "unrecognised"),
    ("93.184.216.34", None), ("8.8.8.8", None), ("2606:4700::1111", None), ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None),
])
def test_address_problem(address, problem):
    assert import_triplets.address_problem(address) == problem


def test_help_documents_the_safety_options():
    text = " ".join(import_triplets.get_args_parser().format_help().split())
    assert "--allow-local-files" in text
    assert "for testing against a server on this machine" in text

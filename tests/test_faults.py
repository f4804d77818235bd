"""Fault injection: hostile files, signals, crashes, slow servers and full disks.

Each failure class ends in one clear line (or a warning and the work done), never a hang or a
traceback. Programs that could hang run in a subprocess with a ``timeout=``, so a regression
fails here instead of blocking the suite.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import import_triplets
import transform_validation
import update_database
from conftest import REPO, class_image, write_class_folder
from deepranking import cli, embedding_io, file_io, image_data, saved_index
from deepranking.preprocessing import UnreadableImageError, load_rgb

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def run_program(script: str, *argv, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], capture_output=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)


def finishes(fn, seconds: float = 20.0):
    """``fn()``'s result, or a failure if it has not returned within ``seconds`` (a FIFO's open blocks)."""
    box = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            box["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ----------------------------------------------------------------------------
# 1. Only regular files are read as images
# ----------------------------------------------------------------------------


def test_a_fifo_in_a_class_folder_is_named_and_skipped_never_opened(tmp_path):
    root = write_class_folder(tmp_path / "photos", n_classes=2, per_class=3)
    os.mkfifo(root / "class00" / "pipe.jpg")
    (root / "class01" / "link.jpg").symlink_to(root / "class00" / "pipe.jpg")
    out = tmp_path / "t.csv"
    proc = run_program("triplet_sampler.py", "--data-dir", root, "--output", out, "--seed", 1)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert (f"skipped 2 entries in {root} named like an image but not a regular file (never opened): "
            f"{root}/class00/pipe.jpg (a FIFO), {root}/class01/link.jpg (a FIFO)") in err
    assert "pipe.jpg" not in out.read_text() and "link.jpg" not in out.read_text()


def test_an_image_that_is_a_fifo_is_refused_by_path_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*pipe.jpg: a FIFO, not a regular file$"):
        finishes(lambda: load_rgb(tmp_path / "pipe.jpg"))
    assert file_io.regular_file_problem(tmp_path / "pipe.jpg") == "is a FIFO, not a regular file"
    with pytest.raises(cli.UserError, match="triplet CSV is a FIFO, not a regular file"):
        file_io.check_input_file(tmp_path / "pipe.jpg", "triplet CSV")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small-cnn checkpoint (8 dims, 32 px) and a 6-row database of random unit vectors beside it."""
    import deep_rank_net as drn
    from deepranking.checkpoint import model_record, write_checkpoint
    from deepranking.preprocessing import Preprocessing

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = drn.DeepRankNet(arch="small-cnn", embedding_dim=8, weights="none", train_from="conv1")
    write_checkpoint(folder / "net.model", {**model_record(net, Preprocessing(32, 32)), "epoch": 0, "step": 0,
                                            "args": {}})
    root = write_class_folder(folder / "db", n_classes=2, per_class=3)
    images = image_data.list_class_folder(root)
    emb = np.random.default_rng(0).normal(size=(len(images), 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    embedding_io.write_embeddings(folder / "db.txt", images.paths, images.label_names, emb, progress=False)
    return folder / "net.model", folder / "db.txt"


def test_query_folder_with_a_fifo_and_an_undecodable_name_under_a_strict_locale(tmp_path, small_model):
    """A FIFO named like an image blocked query.py forever; a file name with a byte that is not UTF-8
    ended the printing of the results in a UnicodeEncodeError under a strict console encoding."""
    model, db = small_model
    queries = tmp_path / "queries"
    queries.mkdir()
    Image.fromarray(class_image(0, 99)).save(os.fsencode(queries) + b"/bad\xff.jpg", format="JPEG")
    os.mkfifo(queries / "pipe.jpg")
    proc = run_program("query.py", "--model", model, "--embeddings", db, "--top", 2, "--device", "cpu", queries,
                       env={"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"})
    out, err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert f"query 1: {queries}/bad\\xff.jpg" in out  # the byte shown as an escape
    assert f"{queries}/pipe.jpg (a FIFO)" in err and "never opened" in err


def test_a_fifo_given_as_a_query_is_named_as_such(tmp_path):
    import query

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(cli.UserError, match=f"query is a FIFO, not a regular file: {tmp_path}/pipe.jpg"):
        query.expand_queries([str(tmp_path / "pipe.jpg")])


def test_a_pattern_through_a_link_loop_gives_each_file_once(tmp_path):
    import query

    folder = tmp_path / "q"
    folder.mkdir()
    Image.fromarray(class_image(0, 0)).save(folder / "a.jpg")
    (folder / "loop").symlink_to(folder)  # q/loop/loop/.../a.jpg: the same file, dozens of times
    assert query.expand_queries([f"{folder}/**/*.jpg"]) == [str(folder / "a.jpg")]


# ----------------------------------------------------------------------------
# 2. Records of the wrong shape are unreadable records; a damaged index is rebuilt
# ----------------------------------------------------------------------------


BAD_RECORDS = {
    "a string": lambda r: "not an object",
    "a list": lambda r: [r],
    "model a string": lambda r: {**r, "model": "3fa2c1d9"},
    "model id a number": lambda r: {**r, "model": {**r["model"], "id": 7}},
    "rows a string": lambda r: {**r, "rows": str(r["rows"])},
    "stamps short": lambda r: {**r, "images": {**r["images"], "stamps": r["images"]["stamps"][:2]}},
    "stamps of strings": lambda r: {**r, "images": {**r["images"], "stamps": [["a", "b"]] * r["rows"]}},
    "images a list": lambda r: {**r, "images": []},
    "data a list": lambda r: {**r, "data": [1, 2]},
}


@pytest.mark.parametrize("shape", sorted(BAD_RECORDS))
@pytest.mark.parametrize("kind", ["txt", "npz"])
def test_a_record_of_the_wrong_shape_is_an_unreadable_record(tmp_path, shape, kind, capsys):
    """Valid JSON of the wrong shape crashed query.py, eval.py and update_database.py with tracebacks."""
    if kind == "npz" and shape == "data a list":
        pytest.skip("an .npz record describes no data file")
    path = tmp_path / f"db.{kind}"
    paths = [str(tmp_path / "c" / f"{i}.jpg") for i in range(4)]
    embedding_io.write_embeddings(path, paths, ["c"] * 4, np.eye(4, dtype=np.float32), progress=False,
                                  model={"id": "a" * 64, "checkpoint": "x.model", "step": 3},
                                  images={"root": str(tmp_path), "stamps": [[1, 2]] * 4})
    record, _ = embedding_io.read_record(path)
    bad = json.dumps(BAD_RECORDS[shape](record))
    if kind == "npz":
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        np.savez(path, **{**arrays, "record": np.array(bad)})
    else:
        stat = path.stat()
        embedding_io.record_path(path).write_text(bad)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    db = embedding_io.read_embeddings(path, progress=False)
    assert db.record is None and "unreadable record" in db.record_note  # as malformed JSON is
    embedding_io.check_same_model("--model", {"id": "a" * 64}, "database", db.model, notes=(db.record_note,))
    assert "warning: cannot check that --model and database come from the same model" in capsys.readouterr().err
    assert len(saved_index.open_database(path).db) == 4  # query.py's path
    with pytest.raises(cli.UserError, match=r"cannot update .*unreadable record .*rebuild it once"):
        update_database.check_database(db, path)


def test_a_saved_index_damaged_in_place_is_rebuilt_with_a_warning(tmp_path, capsys):
    path = tmp_path / "db.txt"
    emb = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    embedding_io.write_embeddings(path, [str(tmp_path / f"{i}.jpg") for i in range(50)], ["c"] * 50, emb,
                                  progress=False)
    assert saved_index.open_database(path).status == "built"
    saved = saved_index.index_dir(path) / "emb.npy"
    stat = saved.stat()
    damaged = np.load(saved, mmap_mode="r+")
    damaged[7] = np.nan  # same size, and the mtime put back: only the content tells
    damaged.flush()
    del damaged
    os.utime(saved, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    got = saved_index.open_database(path)
    assert got.status == "built" and np.array_equal(got.db.emb, emb)
    err = capsys.readouterr().err
    assert f"the saved search index {saved.parent} is not what was saved there (damaged since?): rebuilding it" in err
    assert saved_index.open_database(path).status == "reused"


def test_the_sampled_digest_of_a_large_index_sees_a_damaged_row(tmp_path, monkeypatch):
    monkeypatch.setattr(saved_index, "DIGEST_WHOLE_BYTES", 1 << 16)  # the sampled digest, on a small file
    f = tmp_path / "emb.npy"
    np.save(f, np.zeros((4096, 256), dtype=np.float32))  # 4 MiB
    before = saved_index.content_digest(f)
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size - 100)
        fh.write(b"\x7f")
    assert saved_index.content_digest(f) != before


# ----------------------------------------------------------------------------
# 3. Signals: never a traceback, 143 for SIGTERM and 130 for SIGINT
# ----------------------------------------------------------------------------


def test_a_signal_as_a_program_finishes_is_never_a_traceback(tmp_path):
    """SIGTERM or SIGINT in the last milliseconds (after the output, during interpreter shutdown) used to
    end in a traceback from wherever Python was. Exit statuses as a shell reads them (death by a signal
    N is 128 + N): 0 when the program was already gone, else 143 for SIGTERM and 130 for SIGINT."""
    root = write_class_folder(tmp_path / "photos", n_classes=2, per_class=2, size=8)
    for i, delay in enumerate((0.0, 0.001, 0.003, 0.006, 0.01, 0.02)):
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGINT
        proc = subprocess.Popen([sys.executable, "-u", str(REPO / "triplet_sampler.py"), "--data-dir", str(root),
                                 "--output", str(tmp_path / f"t{i}.csv")], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        line = proc.stdout.readline()  # the last thing main does
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        status = 128 - proc.returncode if proc.returncode < 0 else proc.returncode
        assert b"wrote" in line and b"Traceback" not in err, err.decode()
        assert status in (0, 128 + sig), (sig, proc.returncode, err.decode())


def test_cli_run_called_from_other_code_restores_the_handlers(capsys):
    import argparse

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cli.run(lambda args: print("ran"), argparse.ArgumentParser(), [])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert capsys.readouterr().out == "ran\n"


# ----------------------------------------------------------------------------
# 4. Nothing left behind: the next run removes a killed run's temporaries
# ----------------------------------------------------------------------------


def test_a_killed_writers_temporaries_are_removed_by_the_next_run(tmp_path, capsys):
    import triplet_sampler

    root = write_class_folder(tmp_path / "photos", n_classes=2, per_class=6, size=8)
    out = tmp_path / "out"
    out.mkdir()
    gone = dead_pid()
    stale = [out / f".t.csv.{gone}.k3j9x_1a.tmp", out / f".t_heldout.csv.{gone}.zz9zz9zz.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 1000)  # what a kill -9 mid-write leaves (up to 100 MB for a sampler CSV)
    live = out / f".t.csv.{os.getppid()}.abcdefgh.tmp"  # a running process's write in progress
    live.write_bytes(b"x")
    other = out / f".other.csv.{gone}.abcdefgh.tmp"  # another output's: not this run's to judge
    other.write_bytes(b"x")
    triplet_sampler.main(triplet_sampler.get_args_parser().parse_args(
        ["--data-dir", str(root), "--output", str(out / "t.csv"), "--val-fraction", "0.5", "--seed", "1"]))
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    assert f"removed {stale[0]}, a temporary left by an interrupted run (pid {gone}, no longer running)" in \
        capsys.readouterr().err


def test_a_killed_evals_staging_folder_is_removed_by_the_next_write(tmp_path):
    folder = tmp_path / "eval"
    stage = folder / f".staging.{dead_pid()}.a1b2c3d4.tmp"
    stage.mkdir(parents=True)
    (stage / "metrics.json").write_text("half")
    with file_io.staged_outputs(folder, last="metrics.json") as new:
        (new / "metrics.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json"]


def test_temporaries_carry_their_output_and_pid(tmp_path):
    with file_io.atomic_path(tmp_path / "db.txt") as tmp:
        assert tmp.name.startswith(f".db.txt.{os.getpid()}.") and tmp.suffix == ".tmp"
        assert file_io.stale_temporaries(tmp_path / "db.txt") == []  # its own: never stale


def test_a_pid_reused_by_a_younger_process_does_not_keep_a_temporary(tmp_path):
    old = tmp_path / f".db.txt.{os.getpid()}.abcdefgh.tmp"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 10 ** 7, time.time() - 10 ** 7))  # written long before this process began
    parent = tmp_path / f".db.txt.{os.getppid()}.abcdefgh.tmp"
    parent.write_bytes(b"x")
    os.utime(parent, (1, 1))
    assert file_io.stale_temporaries(tmp_path / "db.txt") == [parent]  # never this process's own name


def test_an_import_removes_a_killed_runs_partial_downloads(tmp_path):
    images = tmp_path / "out" / "images"
    images.mkdir(parents=True)
    partial = images / f".0123456789abcdef.{dead_pid()}.x1y2z3w4.part"
    partial.write_bytes(b"half an image")
    import_triplets.fetch_all([], images, tmp_path / "out" / "manifest.csv", {}, import_triplets.FetchOptions(), 1,
                              False, False)
    assert not partial.exists()


# ----------------------------------------------------------------------------
# 5. Bounded and truthful I/O: a trickling server, a full disk
# ----------------------------------------------------------------------------


class Trickle(BaseHTTPRequestHandler):
    """Announces 10,000 bytes, then sends one every 0.2 s."""

    def do_GET(self):  # noqa: N802 (http.server API)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "10000")
        self.end_headers()
        try:
            for _ in range(10000):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:  # the client hung up
            pass

    def log_message(self, *args):
        pass


class Whole(Trickle):
    """Sends a small PNG at once."""

    def do_GET(self):  # noqa: N802
        import io

        buf = io.BytesIO()
        Image.fromarray(class_image(0, 0, size=8)).save(buf, format="PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(buf.getvalue())))
        self.end_headers()
        self.wfile.write(buf.getvalue())


def serve(handler, monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_trickling_server_meets_the_deadline(tmp_path, monkeypatch, capsys):
    """A byte every 0.2 s never hits a 20 s per-read timeout: the import waited as long as the server
    kept sending. --deadline bounds each image's whole download, retries included."""
    server, base = serve(Trickle, monkeypatch)
    try:
        (tmp_path / "list.csv").write_text(f"{base}/q.png,{base}/p.png,{base}/n.png\n")
        start = time.monotonic()
        with pytest.raises(cli.UserError, match="none of the 1 triplet"):
            import_triplets.main(import_triplets.get_args_parser().parse_args(
                [str(tmp_path / "list.csv"), "--output-dir", str(tmp_path / "out"), "--deadline", "1",
                 "--allow-private-hosts", "--no-progress"]))
        assert time.monotonic() - start < 15
        err = capsys.readouterr().err
        assert f"{base}/q.png: no complete download within --deadline 1 s (" in err
        # transform_validation.py --download: the same bound, the .part kept for a resume
        start = time.monotonic()
        with pytest.raises(cli.UserError, match=r"did not finish within --deadline 1 s \(\d+ bytes in .*part\); "
                                                r"re-run to resume"):
            transform_validation.download(f"{base}/t.zip", None, tmp_path / "dl", deadline_s=1)
        assert time.monotonic() - start < 15
    finally:
        server.shutdown()
        server.server_close()


class FullDisk:
    """A file whose every write fails as a full disk does."""

    def __init__(self, *args, **kwargs):
        pass

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        pass


def test_a_full_disk_is_reported_as_such_not_as_a_connection_error(tmp_path, monkeypatch):
    from deepranking import downloads

    server, base = serve(Whole, monkeypatch)
    monkeypatch.setattr(downloads, "open", FullDisk, raising=False)  # the download's writes only
    try:
        (tmp_path / "list.csv").write_text(f"{base}/q.png,{base}/p.png,{base}/n.png\n")
        with pytest.raises(cli.UserError) as info:
            import_triplets.main(import_triplets.get_args_parser().parse_args(
                [str(tmp_path / "list.csv"), "--output-dir", str(tmp_path / "out"), "--allow-private-hosts",
                 "--no-progress", "--workers", "1"]))
        message = str(info.value)
        assert "No space left on device" in message and "the import stopped" in message
        assert "connection" not in message
        with pytest.raises(cli.UserError, match=r"cannot write .*t.zip.part: No space left on device; the partial "
                                                r"download is kept"):
            transform_validation.download(f"{base}/t.zip", None, tmp_path / "dl")
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------
# 6. Warnings closed: a bad zip is set aside; "not found" only for what is missing
# ----------------------------------------------------------------------------


def test_a_zip_of_the_wrong_md5_is_set_aside_and_fetched_again(tmp_path, monkeypatch, capsys):
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "t.zip").write_bytes(b"not the zip")
    fetched = []
    monkeypatch.setattr(transform_validation, "fetch", lambda url, part, final, deadline: (
        fetched.append(url), part.write_bytes(b"the zip")))
    import hashlib

    got = transform_validation.download("http://example.org/t.zip", hashlib.md5(b"the zip").hexdigest(), dest)
    assert got.read_bytes() == b"the zip" and (dest / "t.zip.bad").read_bytes() == b"not the zip"
    assert "moved it to" in capsys.readouterr().err and fetched == ["http://example.org/t.zip"]


def test_a_file_that_is_there_is_never_not_found(tmp_path):
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "nowhere.csv")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(cli.UserError, match="triplet CSV is a symbolic link to a missing file"):
        file_io.check_input_file(tmp_path / "dangling.csv", "triplet CSV")
    with pytest.raises(cli.UserError, match="triplet CSV is not a file"):
        file_io.check_input_file(tmp_path / "folder.csv", "triplet CSV")
    with pytest.raises(cli.UserError, match="triplet CSV not found"):
        file_io.check_input_file(tmp_path / "nowhere.csv", "triplet CSV")

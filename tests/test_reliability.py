"""Bad disks and concurrent runs: one clear line, exit 2, nothing half-written, nothing lost."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch

import train_net
from deepranking import checkpoint, cli, file_io
from conftest import REPO
from test_train_net import TINY, csvs, fails, train  # noqa: F401  (csvs is a fixture)


def test_atomic_write_full_disk_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(cli.UserError) as info:
        file_io.atomic_write_text(target, "new")
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOTDIR])
def test_atomic_write_unwritable_folder_is_one_line(tmp_path, monkeypatch, code):
    import tempfile

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(cli.UserError, match=f"cannot write .*out.txt: {os.strerror(code)}"):
        file_io.atomic_write_text(tmp_path / "out.txt", "x")


KILLED_MID_WRITE = """
import argparse, os, signal, sys
from pathlib import Path
from deepranking import cli, file_io

def write_then_killed(args):
    root = Path(args.root)
    if args.where == "files":
        with file_io.atomic_paths([root / "db.txt", root / "db.txt.meta.json"]) as tmps:
            tmps[0].write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
    elif args.where == "caught":  # a broad handler on the way must not swallow it, as for Ctrl-C
        try:
            with file_io.atomic_paths([root / "db.txt"]) as tmps:
                tmps[0].write_text("half")
                os.kill(os.getpid(), signal.SIGTERM)
        except Exception:
            print("swallowed")
    else:
        with file_io.staged_outputs(root / "out") as stage:
            (stage / "metrics.json").write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
    print("not reached: SIGTERM raises in the main thread")

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("where")
try:
    cli.run(write_then_killed, parser)
finally:  # the program's own main: from its end on, a signal ends the process at once (no traceback)
    assert signal.getsignal(signal.SIGTERM) is cli._end_now
"""


@pytest.mark.parametrize("where", ["files", "staged", "caught"])
def test_sigterm_mid_write_removes_the_temporaries_and_keeps_the_old_outputs(tmp_path, where):
    """kill's default action ended the process inside the write, leaving .<name>.*.tmp files (GBs
    for a 100,000 x 4,096 text database) and eval's .staging-* folder that nothing removed later."""
    (tmp_path / "db.txt").write_text("old")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("old")
    result = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path), where], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (143, "", "terminated\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.txt", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.json"]
    assert (tmp_path / "db.txt").read_text() == (tmp_path / "out" / "metrics.json").read_text() == "old"


def test_atomic_write_onto_a_folder_or_under_a_file(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(cli.UserError, match="Is a directory"):
        file_io.atomic_write_text(tmp_path / "d", "x")
    (tmp_path / "f").write_text("")
    with pytest.raises(cli.UserError, match="cannot write .*f/x.txt"):
        file_io.atomic_write_text(tmp_path / "f" / "x.txt", "x")


def test_outputs_respect_the_umask(tmp_path):
    code = ("import os; os.umask(0o027); from deepranking import file_io; "
            f"file_io.atomic_write_text({str(tmp_path / 'a.txt')!r}, 'x'); "
            f"print(oct(os.stat({str(tmp_path / 'a.txt')!r}).st_mode & 0o777))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0o640"  # not mkstemp's 0o600


def test_a_second_run_into_the_same_folder_fails_at_once(csvs, tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process owns it
    err = fails(capsys, "--triplets", csvs[0], "--output-dir", out, *TINY)
    assert f"is in use by another run (pid {os.getppid()} on {socket.gethostname()})" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, the owner's lock kept


def test_a_stale_lock_from_a_dead_process_is_taken_over(csvs, tmp_path, capsys):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    train("--triplets", csvs[0], "--max-steps", 1, "--output-dir", out, *TINY)
    assert "taking over" in capsys.readouterr().err
    assert not (out / ".lock").exists()  # released at the end
    assert (out / "temp_0.model").exists()


def test_a_failing_checkpoint_save_keeps_the_last_good_one(csvs, tmp_path, capsys, monkeypatch):
    real = torch.save
    saves = []

    def second_save_fills_the_disk(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", second_save_fills_the_disk)
    out = tmp_path / "full"
    err = fails(capsys, "--triplets", csvs[0], "--save-every", 1, "--output-dir", out, *TINY)
    assert f"cannot write {out / 'temp_0.model'}: No space left on device" in err
    assert f"the last good checkpoint is {out / 'temp_0.model'}" in err
    assert checkpoint.load_checkpoint(out / "temp_0.model")["step"] == 1  # the first save is intact
    assert not list(out.glob(".*.tmp"))


def test_missing_imagenet_weights_fail_before_any_image_is_decoded(csvs, tmp_path, capsys, monkeypatch):
    import urllib.error

    from deepranking import image_cache

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    def decoded(*a, **k):
        raise AssertionError("images were decoded before the weights were checked")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(image_cache, "cache_images", decoded)
    args = [a for a in TINY]
    args[args.index("--weights") + 1] = "imagenet"
    err = fails(capsys, "--triplets", csvs[0], "--output-dir", tmp_path / "o", *args)
    assert "cannot download ImageNet weights for resnet18" in err


def test_unexpected_os_errors_are_one_line(capsys):
    def boom(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/file")

    with pytest.raises(SystemExit) as exc:
        cli.run(boom, train_net.argparse.ArgumentParser(), [])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == "error: cannot access /some/file: Permission denied\n"


@pytest.mark.parametrize("argv", [
    ["triplet_sampler.py", "--data-dir", "FILE", "--output", "OUT/t.csv"],
    ["transform_validation.py", "--data-dir", "FILE"],
])
def test_a_file_given_as_a_folder_is_named_as_such(tmp_path, argv):
    f = tmp_path / "afile"
    f.write_text("")
    args = [str(f) if a == "FILE" else a.replace("OUT", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:]], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: dataset folder is a file, not a folder: {f}"


def test_outputs_are_proved_writable_before_any_work(tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(cli.UserError, match=r"cannot write train embeddings output .*e\.txt: Read-only file system"):
        file_io.check_output_path(tmp_path / "new" / "e.txt", False, "train embeddings output")
    assert not (tmp_path / "new").exists()  # nothing created by the check


def test_weight_growth_between_log_steps_is_named_at_the_next_checkpoint(csvs, tmp_path, capsys, monkeypatch):
    """The growth check ran on log steps only: weights that reached 1e20 after the last one went unsaid."""
    norms = iter([1.0])  # the norm when the run starts; every later one has exploded
    monkeypatch.setattr(train_net, "weight_norm", lambda trainee: next(norms, 1e20))
    train("--triplets", csvs[0], "--epochs", 1, "--log-every", 1000, "--output-dir", tmp_path / "o", *TINY)
    assert "the trained weights' norm grew 1e+20x since this run started" in capsys.readouterr().err


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_to_force(csvs, tmp_path, capsys, monkeypatch):
    """A full disk at the first checkpoint left config.json and metrics.jsonl, and a rerun with other flags
    was refused until --force, for a folder holding nothing a resume could use."""
    real = torch.save

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    err = fails(capsys, "--triplets", csvs[0], "--max-steps", 1, "--output-dir", out, *TINY)
    assert "No space left on device" in err and "no checkpoint was written" in err
    assert list(out.iterdir()) == []
    monkeypatch.setattr(torch, "save", real)
    train("--triplets", csvs[0], "--max-steps", 1, "--lr", 0.01, "--output-dir", out, *TINY)  # other flags
    assert (out / "temp_0.model").exists() and (out / "config.json").exists()

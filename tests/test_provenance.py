"""Embedding files know their model: fingerprints, refused mixtures, pairs written as one unit."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import deep_rank_net as drn
import eval as eval_script
import gen_embeddings
import query
from deepranking import cli, embedding_io, file_io
from deepranking.checkpoint import load_checkpoint, model_fingerprint, write_checkpoint
from deepranking.cli import UserError
from deepranking.embedding_io import read_embeddings, record_path
from test_gen_embeddings import make_checkpoint


def fingerprint_of(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    _, spec = drn.model_from_checkpoint(ckpt, "cpu")
    return model_fingerprint(ckpt, spec.to_dict(), path)


def gen(ckpt: Path, data: Path, train: Path | None, test: Path | None, *extra: str) -> None:
    argv = ["--model", str(ckpt), "--data-dir", str(data), "--device", "cpu", "--no-progress", *extra]
    if train is not None:
        argv += ["--train-output", str(train)]
    if test is not None:
        argv += ["--test-output", str(test)]
    if train is None:
        argv += ["--splits", "val"]
    elif test is None:
        argv += ["--splits", "train"]
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(argv))


def run_cli(module, capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # only this command's output
    with pytest.raises(SystemExit) as exc:
        cli.run(module.main, module.get_args_parser(), [str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    return make_checkpoint(out / "a.model", seed=0), make_checkpoint(out / "b.model", seed=1)


@pytest.fixture(scope="module")
def pair_a(tmp_path_factory, tiny_imagenet, models):
    """train + test embedding files of model a."""
    out = tmp_path_factory.mktemp("pair_a")
    train, test = out / "train.txt", out / "test.txt"
    gen(models[0], tiny_imagenet, train, test)
    return train, test


# ---------------------------------------------------------------- the fingerprint


def test_fingerprint_same_weights_same_id_other_weights_other_id(tmp_path, models):
    a, b = models
    fa = fingerprint_of(a)
    # Re-saved in another file, at another step, with DDP key prefixes and keys in another order.
    ckpt = load_checkpoint(a)
    state = {f"module.{k}": v.clone() for k, v in reversed(list(ckpt["model"].items()))}
    resaved = tmp_path / "resaved.model"
    write_checkpoint(resaved, {**{k: v for k, v in ckpt.items() if k not in ("format", "version")},
                               "model": state, "step": 99, "epoch": 3})
    fr = fingerprint_of(resaved)
    assert fr["id"] == fa["id"] and len(fa["id"]) == 64
    assert fr["step"] == 99 and fr["checkpoint"] == str(resaved.resolve())  # for humans, not compared
    assert fingerprint_of(b)["id"] != fa["id"]  # other weights
    # One changed value is another model.
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    changed = {**ckpt["model"], key: ckpt["model"][key].clone()}
    changed[key].view(-1)[0] += 1e-3
    assert model_fingerprint({**ckpt, "model": changed}, fa["preprocessing"])["id"] != fa["id"]
    # Same weights, other pixels: another model too.
    other_pixels = {**fa["preprocessing"], "cache_size": 64}
    assert model_fingerprint(ckpt, other_pixels)["id"] != fa["id"]


def test_files_record_the_model_and_pandas_still_reads_the_text(pair_a, models):
    train, test = pair_a
    fa = fingerprint_of(models[0])
    for path in (train, test):
        emb = read_embeddings(path, progress=False)
        assert emb.model["id"] == fa["id"] and emb.record_note is None
        df = pd.read_csv(path)  # a default call: no comment lines, no extra header
        assert list(df.columns[:3]) == ["path", "label", "e0"] and len(df) == len(emb)
        np.testing.assert_array_equal(df.iloc[:, 2:].to_numpy(np.float32), emb.emb)
        record = json.loads(record_path(path).read_text())
        assert record["model"]["id"] == fa["id"] and record["rows"] == len(emb)
        assert len(record["images"]["stamps"]) == len(emb)


@pytest.mark.parametrize("name", ["db.npz", "db.npy"])
def test_binary_files_record_the_model(tmp_path, name):
    model = {"id": "f" * 64, "checkpoint": "/x.model", "step": 5, "preprocessing": {}}
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    embedding_io.write_embeddings(tmp_path / name, ["a.jpg", "b.jpg", "c.jpg"], list("xyz"), emb,
                                  progress=False, model=model)
    got = read_embeddings(tmp_path / name, progress=False)
    assert got.model == model
    if name.endswith(".npz"):
        assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the record is inside


def test_old_files_load_as_unknown_model_and_stale_companions_are_ignored(tmp_path, pair_a):
    train, _ = pair_a
    old = tmp_path / "old.txt"
    old.write_bytes(train.read_bytes())  # no companion: a file from before fingerprints
    emb = read_embeddings(old, progress=False)
    assert emb.model is None and "records no model" in emb.record_note
    # A copy that lost its mtime keeps its record (the companion's SHA-256 still matches) ...
    copy = tmp_path / "copy.txt"
    copy.write_bytes(train.read_bytes())
    record_path(copy).write_bytes(record_path(train).read_bytes())
    assert read_embeddings(copy, progress=False).model is not None
    # ... a data file that changed under its companion (half-replaced, edited) does not.
    lines = copy.read_text().splitlines(keepends=True)
    copy.write_text("".join(lines[:-1]))
    emb = read_embeddings(copy, progress=False)
    assert emb.model is None and "describes another version" in emb.record_note


# ---------------------------------------------------------------- eval.py and query.py refuse mixtures


def test_eval_refuses_files_of_two_models(tmp_path, tiny_imagenet, models, pair_a, capsys):
    train, _ = pair_a
    test_b = tmp_path / "test_b.txt"
    gen(models[1], tiny_imagenet, None, test_b)  # the val split, embedded by model b
    fa, fb = fingerprint_of(models[0]), fingerprint_of(models[1])
    code, err = run_cli(eval_script, capsys, "--train-embeddings", train, "--test-embeddings", test_b,
                        "--output-dir", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "different models" in err
    assert str(train) in err and str(test_b) in err and fa["id"][:12] in err and fb["id"][:12] in err
    assert not (tmp_path / "out").exists()


def test_eval_refuses_the_same_images_twice_unless_allowed(tmp_path, pair_a, capsys):
    train, _ = pair_a
    code, err = run_cli(eval_script, capsys, "--train-embeddings", train, "--test-embeddings", train,
                        "--output-dir", tmp_path / "out")
    assert code == 2 and "the same file" in err and "--allow-same-files" in err
    assert len(err.strip().splitlines()) == 1
    # A copy is the same images too.
    copy = tmp_path / "copy.txt"
    copy.write_bytes(train.read_bytes())
    code, err = run_cli(eval_script, capsys, "--train-embeddings", train, "--test-embeddings", copy,
                        "--output-dir", tmp_path / "out")
    assert code == 2 and "the same images" in err
    eval_script.main(eval_script.get_args_parser().parse_args(
        ["--train-embeddings", str(train), "--test-embeddings", str(train), "--output-dir", str(tmp_path / "out"),
         "--allow-same-files", "--k", "3", "--num-demo-queries", "0"]))
    err = capsys.readouterr().err
    assert "warning:" in err and "the same file" in err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["recall_at_1"] == 1.0  # what the warning is about
    # Test rows that are only partly train rows inflate the scores as surely.
    part = tmp_path / "part.txt"
    rows = train.read_text().splitlines()
    part.write_text("\n".join(rows[:3]) + "\n")
    code, err = run_cli(eval_script, capsys, "--train-embeddings", train, "--test-embeddings", part,
                        "--output-dir", tmp_path / "out2")
    assert code == 2 and f"2 of the 2 test images are also in {train}" in err and "--allow-same-files" in err
    assert not (tmp_path / "out2").exists()


def test_eval_warns_about_unknown_models(tmp_path, pair_a, capsys):
    train, test = pair_a
    old = tmp_path / "old_test.txt"
    old.write_bytes(test.read_bytes())
    eval_script.main(eval_script.get_args_parser().parse_args(
        ["--train-embeddings", str(train), "--test-embeddings", str(old), "--output-dir", str(tmp_path / "out"),
         "--k", "3", "--num-demo-queries", "0"]))
    err = capsys.readouterr().err
    assert "warning: cannot check that" in err and "records no model" in err


def test_query_refuses_a_database_of_another_model(tmp_path, tiny_imagenet, models, pair_a, capsys):
    train, _ = pair_a
    img = next((tiny_imagenet / "train").rglob("*.JPEG"))
    fa, fb = fingerprint_of(models[0]), fingerprint_of(models[1])
    code, err = run_cli(query, capsys, "--model", models[1], "--embeddings", train, "--device", "cpu", img)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "different models" in err
    assert str(train) in err and fa["id"][:12] in err and fb["id"][:12] in err
    # The right model answers.
    query.main(query.get_args_parser().parse_args(["--model", str(models[0]), "--embeddings", str(train),
                                                   "--device", "cpu", "--top", "1", str(img)]))
    assert Path(capsys.readouterr().out.splitlines()[2].split()[-1]).resolve() == img.resolve()


# ---------------------------------------------------------------- the pair is written as one unit


def pair_files(train: Path, test: Path) -> dict:
    return {p.name: p.read_bytes() for p in (train, test, record_path(train), record_path(test))}


def test_interrupt_between_the_two_writes_keeps_the_old_pair(tmp_path, tiny_imagenet, models, monkeypatch):
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    gen(models[0], tiny_imagenet, train, test)
    before = pair_files(train, test)
    real = embedding_io._write_one
    calls = []

    def write_then_interrupt(*a, **kw):
        calls.append(a[0])
        if len(calls) == 2:  # the train file is complete (under its temporary name); Ctrl-C now
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(embedding_io, "_write_one", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        gen(models[1], tiny_imagenet, train, test, "--force")
    assert calls == [train, test]
    assert pair_files(train, test) == before  # byte-identical, both files and both companions
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporary left


def test_ctrl_c_during_the_renames_waits_for_the_whole_pair(tmp_path, tiny_imagenet, models, monkeypatch):
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    gen(models[0], tiny_imagenet, train, test)
    real_replace = os.replace
    renamed = []

    def replace_with_sigint(src, dst):
        if not renamed:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered between the renames
        real_replace(src, dst)
        renamed.append(Path(dst).name)

    monkeypatch.setattr(file_io.os, "replace", replace_with_sigint)
    # Python's own Ctrl-C handler, whatever the shell gave: a job started with & in a script inherits
    # SIGINT ignored, and the renames then rightly restore "ignored" and raise nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            gen(models[1], tiny_imagenet, train, test, "--force")
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(file_io.os, "replace", real_replace)
    assert renamed == ["train.txt", "train.txt.meta.json", "test.txt", "test.txt.meta.json"]
    fb = fingerprint_of(models[1])["id"]
    assert [read_embeddings(p, progress=False).model["id"] for p in (train, test)] == [fb, fb]


def test_atomic_paths_leaves_everything_on_error(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    with pytest.raises(RuntimeError):
        with file_io.atomic_paths([a, b]) as (ta, tb):
            ta.write_text("new a")
            raise RuntimeError("disk full")
    assert a.read_text() == "old a" and not b.exists() and sorted(os.listdir(tmp_path)) == ["a.txt"]
    with file_io.atomic_paths([a, b]) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    with pytest.raises(UserError, match="cannot write"):
        with file_io.atomic_paths([tmp_path / "no" / "x", tmp_path]) as _:
            pass

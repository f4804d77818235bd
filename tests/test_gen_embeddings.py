"""gen_embeddings.py: one row per image, right labels, values equal to embedding in memory, safe outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deep_rank_net as drn
import gen_embeddings
from deepranking import distributed, embedding
from deepranking.checkpoint import load_checkpoint, model_record, write_checkpoint
from deepranking.cli import UserError
from deepranking.embedding_io import read_embeddings
from deepranking.image_data import list_class_folder
from deepranking.preprocessing import Preprocessing, load_image

REPO = Path(__file__).resolve().parents[1]
DIM = 16
SIZE = 32


def make_checkpoint(path: Path, dim: int = DIM, seed: int = 0) -> Path:
    """An untrained resnet18 DeepRankNet checkpoint at 32 px, cached at 32 px (weights random but fixed)."""
    torch.manual_seed(seed)
    model = drn.DeepRankNet(arch="resnet18", embedding_dim=dim, weights="none")
    spec = Preprocessing(image_size=SIZE, cache_size=SIZE)
    write_checkpoint(path, {**model_record(model, spec), "epoch": 0, "step": 0, "args": {}})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "net.model")


def run_main(*argv: str) -> None:
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args([*argv, "--device", "cpu", "--no-progress"]))


def run_script(*argv: str, env_extra: dict | None = None, module: list[str] | None = None):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, *(module or []), str(REPO / "gen_embeddings.py"), *argv, "--device", "cpu", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def reference_embeddings(ckpt: Path, paths: list[str]) -> np.ndarray:
    """Embed the images directly in memory (decoded at their own 32 px size)."""
    model, spec = drn.model_from_checkpoint(load_checkpoint(ckpt), "cpu")
    assert spec.cache_size == SIZE  # the checkpoint's cache side is the images' own size
    images = torch.stack([load_image(p) for p in paths]).numpy()  # uint8 [N, 32, 32, 3]
    return embedding.embed_images(model, images, spec, batch_size=7, device="cpu", progress=False)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_imagenet, checkpoint):
    out = tmp_path_factory.mktemp("emb")
    train, test = out / "train_embedding.txt", out / "test_embedding.txt"
    run_main("--model", str(checkpoint), "--data-dir", str(tiny_imagenet), "--train-output", str(train),
             "--test-output", str(test), "--batch-size", "5")
    return train, test


def test_writes_both_splits_one_row_per_image(outputs, tiny_imagenet, checkpoint):
    train, test = outputs
    for split, path, n in (("train", train, 24), ("val", test, 9)):
        emb = read_embeddings(path, progress=False)
        listed = list_class_folder(tiny_imagenet / split)
        assert len(emb) == n == len(listed)
        assert emb.paths == listed.paths  # same order, relative paths resolve to the images
        assert list(emb.labels) == listed.label_names  # class name (wnid), not an index
        assert emb.labels[0] == "n00000000" and emb.dim == DIM
        # Relative to the output file's folder, as DESIGN.md says.
        first_row = path.read_text().splitlines()[1]
        assert first_row.startswith(os.path.relpath(listed.paths[0], path.parent) + ",")
        np.testing.assert_allclose(emb.emb, reference_embeddings(checkpoint, listed.paths), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(emb.emb, axis=1), 1.0, atol=1e-5)


def test_over_the_cache_budget_streams_the_same_rows(outputs, tmp_path, tiny_imagenet, checkpoint, capsys):
    """--cache-budget 0: decoded on the fly in worker processes, no cache entry, the same embeddings."""
    cache = tmp_path / "cache"
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    run_main("--model", str(checkpoint), "--data-dir", str(tiny_imagenet), "--train-output", str(train),
             "--test-output", str(test), "--batch-size", "5", "--cache-dir", str(cache), "--cache-budget", "0")
    assert "decoding them on the fly instead" in capsys.readouterr().err
    assert not cache.exists() or not any(cache.iterdir())
    for streamed, cached in ((train, outputs[0]), (test, outputs[1])):
        a, b = read_embeddings(streamed, progress=False), read_embeddings(cached, progress=False)
        assert a.paths == b.paths
        np.testing.assert_allclose(a.emb, b.emb, atol=1e-6)


def test_refuses_existing_output_before_any_work(tmp_path, tiny_imagenet, checkpoint, outputs):
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    test.write_text("keep me")
    with pytest.raises(UserError, match="already exists.*--force"):
        run_main("--model", str(checkpoint), "--data-dir", str(tiny_imagenet),
                 "--train-output", str(train), "--test-output", str(test))
    assert test.read_text() == "keep me" and not train.exists()  # train was not written either
    run_main("--model", str(checkpoint), "--data-dir", str(tiny_imagenet),
             "--train-output", str(train), "--test-output", str(test), "--force")
    assert len(read_embeddings(test, progress=False)) == 9
    np.testing.assert_allclose(read_embeddings(train, progress=False).emb,
                               read_embeddings(outputs[0], progress=False).emb, atol=1e-5)


@pytest.mark.parametrize("train_name, test_name", [
    ("e.txt", "e.txt"),  # the same file
    ("c.txt", "c.txt.meta.json"),  # the test data file is the train file's provenance record
    ("d.npy", "d.npy.meta.csv"),  # ... or a .npy file's path,label sidecar
])
def test_outputs_that_share_a_file_are_refused_before_any_work(tmp_path, tiny_imagenet, checkpoint, train_name,
                                                               test_name):
    with pytest.raises(UserError, match="same file|would both write"):
        run_main("--model", str(checkpoint), "--data-dir", str(tiny_imagenet),
                 "--train-output", str(tmp_path / train_name), "--test-output", str(tmp_path / test_name))
    assert list(tmp_path.iterdir()) == []


def test_class_folder_has_only_train_split(tmp_path, class_folder, checkpoint, capsys):
    train, test = tmp_path / "a" / "train.npz", tmp_path / "a" / "test.npz"
    run_main("--model", str(checkpoint), "--data-dir", str(class_folder),
             "--train-output", str(train), "--test-output", str(test))
    captured = capsys.readouterr()
    assert "no val split" in captured.err and "images/s" in captured.out
    emb = read_embeddings(train, progress=False)
    assert len(emb) == 18 and sorted(set(emb.labels)) == ["class00", "class01", "class02"]
    assert not test.exists()
    # Asking for val explicitly is an error, not a skip.
    with pytest.raises(UserError, match="no 'val' folder"):
        run_main("--model", str(checkpoint), "--data-dir", str(class_folder), "--splits", "val",
                 "--test-output", str(tmp_path / "v.txt"))


@pytest.mark.parametrize("case", ["missing", "truncated", "state_dict", "pickled"])
def test_bad_checkpoint(tmp_path, class_folder, checkpoint, case):
    bad = tmp_path / "bad.model"
    if case == "truncated":
        bad.write_bytes(checkpoint.read_bytes()[:1000])
    elif case == "state_dict":
        torch.save({"w": torch.zeros(2)}, bad)
    elif case == "pickled":
        torch.save(torch.nn.Linear(2, 2), bad)
    match = {"missing": "checkpoint not found", "truncated": "truncated or corrupt",
             "state_dict": "not a deep-ranking checkpoint", "pickled": "not a deep-ranking checkpoint"}[case]
    with pytest.raises(UserError, match=match):
        run_main("--model", str(bad), "--data-dir", str(class_folder), "--train-output", str(tmp_path / "t.txt"))
    assert not (tmp_path / "t.txt").exists()


def test_bad_dataset_and_unreadable_image(tmp_path, class_folder, checkpoint):
    out = str(tmp_path / "t.txt")
    with pytest.raises(UserError, match="dataset folder not found"):
        run_main("--model", str(checkpoint), "--data-dir", str(tmp_path / "nope"), "--train-output", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders with images"):
        run_main("--model", str(checkpoint), "--data-dir", str(tmp_path / "empty"), "--train-output", out)
    bad = class_folder / "class01" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        run_main("--model", str(checkpoint), "--data-dir", str(class_folder), "--train-output", out)
    assert not Path(out).exists()
    with pytest.raises(UserError, match="--splits"):
        run_main("--model", str(checkpoint), "--data-dir", str(class_folder), "--splits", "test")


def test_cli_error_is_one_line_exit_2(tmp_path, class_folder, checkpoint):
    out = tmp_path / "t.txt"
    out.write_text("old")
    result = run_script("--model", str(checkpoint), "--data-dir", str(class_folder), "--train-output", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: train embeddings output already exists: {out} "
                                                  f"(use --force to overwrite)"]
    assert out.read_text() == "old"


def test_shard_bounds_cover_everything_in_order():
    assert distributed.shard_bounds(10, 3) == [0, 3, 6, 10]
    assert distributed.shard_bounds(1, 2) == [0, 0, 1]  # an empty shard is fine


def test_torchrun_two_processes_equals_single_process(tmp_path, tiny_imagenet, checkpoint, outputs):
    train, test = tmp_path / "train.txt", tmp_path / "test.npz"
    result = run_script("--model", str(checkpoint), "--data-dir", str(tiny_imagenet),
                        "--train-output", str(train), "--test-output", str(test),
                        module=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                        env_extra={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/s on 2 x cpu" in result.stdout
    for got, want in ((train, outputs[0]), (test, outputs[1])):
        a, b = read_embeddings(got, progress=False), read_embeddings(want, progress=False)
        assert a.paths == b.paths and list(a.labels) == list(b.labels)
        np.testing.assert_allclose(a.emb, b.emb, atol=1e-5)
    # shards removed; the text file's companion holds its model record (.npz holds it inside)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.npz", "train.txt", "train.txt.meta.json"]


def test_a_log_file_shows_the_embedding_estimate_and_a_line_at_each_interval(tmp_path, tiny_imagenet, checkpoint,
                                                                             capsys, monkeypatch):
    """Output not on a terminal (captured): after batches 3-8 the time the split will take, and a progress
    line per STEADY_INTERVAL_S (0 here: every batch) instead of a bar."""
    from deepranking import progress

    monkeypatch.setattr(progress, "STEADY_INTERVAL_S", 0.0)
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(
        ["--model", str(checkpoint), "--data-dir", str(tiny_imagenet), "--train-output", str(tmp_path / "a.txt"),
         "--test-output", str(tmp_path / "b.txt"), "--batch-size", "2", "--device", "cpu"]))
    err = capsys.readouterr().err.splitlines()
    estimates = [line for line in err if "(measured over batches 3-8)" in line]
    # the train split's 12 batches are timed; the val split's 5 end before batch 8
    assert len(estimates) == 1 and estimates[0].startswith("embedding: ") and estimates[0].endswith(" for 24 img")
    steady = [line for line in err if line.startswith("embedding: img ")]
    assert [line.split(",")[0] for line in steady] == (
        [f"embedding: img {n}/24 ({n / 24:.0%})" for n in range(2, 25, 2)]
        + [f"embedding: img {n}/9 ({n / 9:.0%})" for n in (2, 4, 6, 8, 9)])
    assert all(" left" in line for line in steady)

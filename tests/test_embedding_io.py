"""Embedding files: exact round trips (text and binary) and clear errors."""

import numpy as np
import pytest

import embedding_io
from cli_utils import UserError


def sample(tmp_path, n=7, d=5):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb[0, 0] = np.float32(1e-30)  # tiny, huge and awkward values must survive too
    emb[1, -1] = np.float32(3.4e38)
    emb[2, -1] = np.float32(1 / 3)
    paths = [str(tmp_path / "imgs" / f"{i}.jpg") for i in range(n)]
    labels = ["plain", 'with "quotes"', "with, comma"] + ["x"] * (n - 3)
    return paths, labels, emb


@pytest.mark.parametrize("name", ["emb.txt", "emb.npz", "emb.npy"])
def test_round_trip_is_exact(tmp_path, name):
    paths, labels, emb = sample(tmp_path)
    out = tmp_path / "out" / name
    embedding_io.write_embeddings(out, paths, labels, emb, progress=False)
    got = embedding_io.read_embeddings(out, progress=False)
    assert np.array_equal(got.emb, emb) and got.emb.dtype == np.float32
    assert got.paths == paths and list(got.labels) == labels and got.dim == 5


def test_text_format_header_and_relative_paths(tmp_path):
    paths, labels, emb = sample(tmp_path, n=3, d=2)
    out = tmp_path / "emb.txt"
    embedding_io.write_embeddings(out, paths, labels, emb, progress=False)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path,label,e0,e1"
    assert lines[1].startswith("imgs/0.jpg,plain,")
    assert lines[3].startswith('imgs/2.jpg,"with, comma",')
    assert embedding_io.read_embeddings(out, progress=False).paths[0] == paths[0]


@pytest.mark.parametrize("content,message", [
    ("", "empty"),
    ("path,label,x0\n", "header"),
    ("path,label,e0,e1\na.jpg,c,1.0\n", "line 2"),
    ("path,label,e0,e1\na.jpg,c,1.0,abc\n", "line 2"),
    ("path,label,e0,e1\n", "no embeddings"),
])
def test_malformed_files_are_clear_errors(tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    with pytest.raises(UserError, match=message):
        embedding_io.read_embeddings(bad, progress=False)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        embedding_io.read_embeddings(tmp_path / "nope.txt", progress=False)

"""query.py's saved index: built by the first query, reused (memory-mapped) after, rebuilt when the database changes."""

from __future__ import annotations

import os

import numpy as np
import pytest

import query
from deepranking import ann_search, saved_index
from deepranking.embedding_io import read_embeddings, write_embeddings

HAS_FAISS = ann_search.faiss_available()


def make_db(path, n=300, d=8, seed=0, model=None):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    paths = [f"imgs/c{i % 5}/{i}.jpg" for i in range(n)]
    write_embeddings(path, [str(path.parent / p) for p in paths], [f"c{i % 5}" for i in range(n)], emb,
                     progress=False, model=model or {"id": "a" * 64, "checkpoint": None, "step": 0})
    return emb


@pytest.mark.parametrize("name", ["db.txt", "db.npz", "db.npy"])
def test_built_then_reused_then_rebuilt_when_the_database_changes(tmp_path, name):
    db_path = tmp_path / name
    make_db(db_path)
    first = saved_index.open_database(db_path)
    assert first.status == "built"
    folder = saved_index.index_dir(db_path)
    assert sorted(p.name for p in folder.iterdir()) == ["emb.npy", "key.json", "rows.json"]
    second = saved_index.open_database(db_path)
    assert second.status == "reused" and isinstance(second.db.emb, np.memmap)
    direct = read_embeddings(db_path, progress=False)
    np.testing.assert_array_equal(second.db.emb, direct.emb)
    assert second.db.paths == direct.paths and list(second.db.labels) == list(direct.labels)
    assert second.db.model == direct.model
    # Another database under the same name: rebuilt, never the stale rows.
    new_emb = make_db(db_path, n=301, seed=1, model={"id": "b" * 64})
    third = saved_index.open_database(db_path)
    assert third.status == "built" and len(third.db) == 301 and third.db.model["id"] == "b" * 64
    np.testing.assert_array_equal(third.db.emb, new_emb)


def test_a_half_written_index_is_rebuilt(tmp_path):
    db_path = tmp_path / "db.txt"
    make_db(db_path)
    saved_index.open_database(db_path)
    (saved_index.index_dir(db_path) / "key.json").unlink()  # killed before the key was written
    assert saved_index.open_database(db_path).status == "built"


@pytest.mark.parametrize("damage", ["rows_list", "paths_null", "emb_edited"])
def test_a_damaged_or_edited_index_is_rebuilt_with_the_databases_rows(tmp_path, damage):
    db_path = tmp_path / "db.txt"
    emb = make_db(db_path)
    saved_index.open_database(db_path)
    folder = saved_index.index_dir(db_path)
    if damage == "rows_list":
        (folder / "rows.json").write_text("[]")
    elif damage == "paths_null":
        (folder / "rows.json").write_text('{"paths": null, "labels": []}')
    else:  # edited in place, same size: only the stamp in key.json tells
        saved = np.load(folder / "emb.npy", mmap_mode="r+")
        saved[5] = np.nan
        saved.flush()
        del saved
        stat = (folder / "emb.npy").stat()  # a later mtime even where timestamps are coarse
        os.utime(folder / "emb.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    got = saved_index.open_database(db_path)
    assert got.status == "built"
    np.testing.assert_array_equal(got.db.emb, emb)


def test_an_unwritable_folder_falls_back_to_the_file(tmp_path, capsys):
    db_path = tmp_path / "db.txt"
    make_db(db_path)
    saved_index.index_dir(db_path).write_text("a file where the folder would go")
    got = saved_index.open_database(db_path)
    assert got.status == "unsaved" and len(got.db) == 300
    assert "cannot save the search index" in capsys.readouterr().err


def test_query_reuses_the_saved_index_with_the_same_answers(tmp_path, tiny_imagenet, capsys):
    import gen_embeddings
    from test_gen_embeddings import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "net.model")
    db = tmp_path / "train.txt"
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(
        ["--model", str(ckpt), "--data-dir", str(tiny_imagenet), "--splits", "train", "--train-output", str(db),
         "--device", "cpu", "--no-progress"]))
    img = str(next((tiny_imagenet / "train").rglob("*.JPEG")))
    argv = ["--model", str(ckpt), "--embeddings", str(db), "--device", "cpu", "--top", "5", img]
    outputs = []
    for expected in ("built", "reused"):
        capsys.readouterr()
        query.main(query.get_args_parser().parse_args(argv))
        captured = capsys.readouterr()
        assert f"(saved index {expected})" in captured.err
        outputs.append(captured.out)
    query.main(query.get_args_parser().parse_args(argv + ["--no-saved-index"]))
    assert outputs[0] == outputs[1] == capsys.readouterr().out
    if HAS_FAISS:
        query.main(query.get_args_parser().parse_args(argv + ["--ann", "faiss"]))
        assert len(list(saved_index.index_dir(db).glob("ivf-*-nlist1-seed0.faiss"))) == 1

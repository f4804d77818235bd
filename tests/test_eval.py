"""eval.py on hand-made embedding files with answers computed by hand."""

import json

import numpy as np
import pytest
from PIL import Image

from deepranking import cli, database
from deepranking import embedding_io
import eval as eval_script


def write_files(tmp_path, dim_test=2):
    imgs = tmp_path / "imgs"
    imgs.mkdir(parents=True)
    names = []
    for i in range(8):  # 0-5 the database, 6-7 the queries (no query may be a database image)
        p = imgs / f"{i}.png"
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(p)
        names.append(str(p))
    # Database on a line: class a at x=0,1,2; class b at x=10,11,12.
    train_emb = np.array([[0, 0], [1, 0], [2, 0], [10, 0], [11, 0], [12, 0]], dtype=np.float32)
    embedding_io.write_embeddings(tmp_path / "train.txt", names[:6], ["a"] * 3 + ["b"] * 3, train_emb, progress=False)
    # Queries: one "a" near 0; one "b" at 5, closer to the a's: 2 at 3, 1 at 4, then 0 and 10 tie at 5
    # (the tie goes to the lower database index, 0).
    test_emb = np.array([[0.1, 0], [5.0, 0]], dtype=np.float32)[:, :dim_test]
    embedding_io.write_embeddings(tmp_path / "test.txt", names[6:], ["a", "b"], test_emb, progress=False)
    return tmp_path / "train.txt", tmp_path / "test.txt"


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        cli.run(eval_script.main, eval_script.get_args_parser(), [str(a) for a in argv])
    return exc.value.code, capsys.readouterr()


def test_metrics_and_pictures_by_hand(tmp_path, capsys):
    train, test = write_files(tmp_path)
    out = tmp_path / "out"
    args = eval_script.get_args_parser().parse_args(
        ["--train-embeddings", str(train), "--test-embeddings", str(test), "--k", "2", "--output-dir", str(out)])
    eval_script.main(args)
    m = json.loads((out / "metrics.json").read_text())
    # Query a: 2 nearest are a, a -> 1.0. Query b at 5: nearest are 2 (a), 1 (a) -> 0.0.
    assert m["test_precision_at_k"] == pytest.approx(0.5)
    assert m["test_precision_at_k_se"] == pytest.approx(0.5)  # per query [1, 0]: sample std sqrt(1/2) / sqrt(2)
    assert m["hit_at_k"] == pytest.approx(0.5)
    assert m["recall_at_1"] == pytest.approx(0.5)
    # MAP@R, R = 3: query a -> 1; query b: order 2,1,0,3 -> no b in the first 3 -> 0.
    assert m["map_at_r"] == pytest.approx(0.5)
    # Train, self excluded, k=2: x=0 -> 1,2 (a,a); x=2 -> 1,0; x=10 -> 11,12 ... all pure.
    assert m["train_precision_at_k"] == pytest.approx(1.0)
    assert m["precision_at_k_curve"]["test"] == pytest.approx([0.5, 0.5])
    table = (out / "per_class_precision.csv").read_text().splitlines()
    # No words.txt above these images: the name column repeats the class id.
    assert table[0] == "class,name,n_queries,precision_at_k" and table[1].startswith("a,a,1,1.0")
    for name in ["precision_at_k.png"] + [f"retrieval_{i}.png" for i in range(2)]:
        with Image.open(out / name) as im:
            assert im.size[0] > 200 and im.size[1] > 150
    # Refused without --force; the metrics are untouched.
    before = (out / "metrics.json").read_bytes()
    code, captured = run(capsys, "--train-embeddings", train, "--test-embeddings", test, "--output-dir", out)
    assert code == 2 and "already exists" in captured.err
    assert (out / "metrics.json").read_bytes() == before


def test_triplet_accuracy(tmp_path):
    from deepranking import image_data

    train, test = write_files(tmp_path)
    imgs = sorted((tmp_path / "imgs").glob("*.png"), key=lambda p: int(p.stem))
    csv = tmp_path / "t.csv"
    # (0; 1 vs 5): 1 closer -> right. (0; 5 vs 1): wrong.
    image_data.write_triplet_csv(csv, [str(imgs[0])] * 2, [str(imgs[1]), str(imgs[5])], [str(imgs[5]), str(imgs[1])])
    acc = eval_script.triplet_accuracy(csv, database.open(train, progress=False), database.open(test, progress=False))
    assert acc == pytest.approx(0.5)


def test_bad_inputs(tmp_path, capsys):
    train, test = write_files(tmp_path, dim_test=1)
    code, captured = run(capsys, "--train-embeddings", train, "--test-embeddings", test, "--output-dir", tmp_path / "o")
    assert code == 2 and "dimension mismatch" in captured.err
    code, captured = run(capsys, "--train-embeddings", tmp_path / "nope.txt", "--test-embeddings", test,
                         "--output-dir", tmp_path / "o")
    assert code == 2 and "nope.txt" in captured.err
    train2, test2 = write_files(tmp_path / "x")
    code, captured = run(capsys, "--train-embeddings", train2, "--test-embeddings", test2, "--k", "7",
                         "--output-dir", tmp_path / "o")
    assert code == 2 and "larger than the database" in captured.err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_a_full_disk_mid_way_leaves_no_partial_set_of_outputs(tmp_path, capsys, monkeypatch):
    import errno

    from deepranking import plots

    train, test = write_files(tmp_path)
    out = tmp_path / "out"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "precision_at_k", full)  # after per_class_precision.csv was written
    code, captured = run(capsys, "--train-embeddings", train, "--test-embeddings", test, "--output-dir", out,
                         "--k", 2)
    assert code == 2 and captured.err.strip().endswith(
        f"cannot write {out}: No space left on device (nothing of this run was kept there)")
    assert list(out.iterdir()) == []  # not per_class_precision.csv alone: all or none


def test_a_read_only_output_folder_fails_before_reading_anything(tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    from deepranking import embedding_io as eio

    train, test = write_files(tmp_path)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    def never(*a, **k):
        raise AssertionError("read the embeddings before checking the output folder")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(eio, "read_embeddings", never)
    code, captured = run(capsys, "--train-embeddings", train, "--test-embeddings", test, "--output-dir",
                         tmp_path / "ro")
    assert code == 2 and captured.err.strip() == (
        f"error: cannot write metrics file {tmp_path / 'ro' / 'metrics.json'}: Read-only file system")
    assert not (tmp_path / "ro").exists()


def test_queries_by_index_and_by_path_as_the_file_spells_it(tmp_path):
    import argparse

    from deepranking.cli import UserError

    _, test = write_files(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "imgs", target_is_directory=True)
    linked = tmp_path / "linked.txt"  # the file holds the paths through the link, as a user listed them
    emb = embedding_io.read_embeddings(test, progress=False)
    embedding_io.write_embeddings(linked, [str(tmp_path / "link" / "6.png"), str(tmp_path / "link" / "7.png")],
                                  list(emb.labels), emb.emb, progress=False)
    rows = embedding_io.read_embeddings(linked, progress=False)

    def pick(*queries):
        return eval_script.pick_queries(argparse.Namespace(queries=list(queries), test_embeddings=linked), rows)

    assert pick("1", str(tmp_path / "link" / "6.png")) == [1, 0]
    assert pick(str(tmp_path / "link" / "." / "7.png")) == [1]
    with pytest.raises(UserError, match="index 2 is out of range"):
        pick("2")
    with pytest.raises(UserError, match="--queries image is not in .*: ²"):
        pick("²")  # a superscript digit is not an index (int() would raise ValueError)


def test_small_classes_print_the_precision_ceiling_and_r_precision_first(tmp_path, capsys):
    train, test = write_files(tmp_path)  # classes of 3 database images each
    out = tmp_path / "out"
    eval_script.main(eval_script.get_args_parser().parse_args(
        ["--train-embeddings", str(train), "--test-embeddings", str(test), "--k", "4", "--output-dir", str(out),
         "--num-demo-queries", "0", "--no-progress"]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("recall@1: 0.5000   R-precision: ")  # R-precision has no ceiling: first
    assert lines[1] == ("test precision@4:  0.5000 ± 0.2500 (max achievable 0.75: 2 classes have fewer than 4 "
                        "images in the database)  (2 val queries, 6 db)")
    assert lines[2].startswith("train precision@4: ") and "(max achievable 0.50)" in lines[2]
    assert lines[4] == "classes, best first: a 0.75, b 0.25"  # 2 classes: each once
    m = json.loads((out / "metrics.json").read_text())
    assert (m["test_precision_at_k_max"], m["train_precision_at_k_max"], m["classes_below_k"]) == (0.75, 0.5,
                                                                                                  ["a", "b"])

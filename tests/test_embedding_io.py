"""Embedding files: exact round trips (text and binary) and clear errors."""

import warnings

import numpy as np
import pytest

from deepranking import embedding_io
from deepranking.cli import UserError


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


@pytest.mark.parametrize("name", ["emb.txt", "emb.npz", "emb.npy"])
def test_duplicate_rows_and_zero_dimensions_are_refused(tmp_path, name):
    # a twin row would be a perfect match for its query (leave-one-out leaves out the row alone)
    paths, labels, emb = sample(tmp_path)
    paths[5] = paths[2]
    out = tmp_path / name
    embedding_io.write_embeddings(out, paths, labels, emb, progress=False)
    with pytest.raises(UserError, match=r"1 duplicate image row\(s\), the first .*2\.jpg on rows 3 and 6"):
        embedding_io.read_embeddings(out, progress=False)
    if name == "emb.npz":  # 0-d rows cannot be written as text; a binary file can hold them
        np.savez(out, emb=np.zeros((3, 0), np.float32), paths=np.array(["a", "b", "c"]), labels=np.array(["x"] * 3))
        with pytest.raises(UserError, match="0 dimensions"):
            embedding_io.read_embeddings(out, progress=False)


@pytest.mark.parametrize("arrays, message", [
    (dict(emb=np.ones((2, 3), np.complex64)), "emb holds complex64 values, not real numbers"),
    (dict(emb=np.ones((2, 3), bool)), "emb holds bool values"),
    (dict(emb=np.array([["1", "2"], ["3", "4"]])), "emb holds <U1 values"),
    (dict(paths=np.array([1, 2])), "paths must be a 1-D array of strings, found int64"),
    (dict(paths=np.array([b"a", b"b"])), "paths must be a 1-D array of strings, found |S1"),
    (dict(labels=np.array([["x", "y"], ["x", "y"]])), r"labels must be a 1-D array of strings, found <U1 of shape \(2, 2\)"),
    (dict(paths=np.array(["a", ""])), "row 2 has an empty path"),
])
def test_malformed_npz_arrays_are_clear_errors(tmp_path, arrays, message):
    out = tmp_path / "bad.npz"
    np.savez(out, **{"emb": np.ones((2, 3), np.float32), "paths": np.array(["a", "b"]),
                     "labels": np.array(["x", "y"]), **arrays})
    with pytest.raises(UserError, match=message):
        embedding_io.read_embeddings(out, progress=False)


def test_empty_labels_are_refused_on_write_and_on_read(tmp_path):
    """An empty label makes those rows one class "": eval.py would count every neighbour a match."""
    paths, labels, emb = sample(tmp_path)
    labels[3] = ""
    with pytest.raises(UserError, match=r"embedding row 4 .*3\.jpg.* has an empty label"):
        embedding_io.write_embeddings(tmp_path / "w.txt", paths, labels, emb, progress=False)
    assert not (tmp_path / "w.txt").exists()
    # Files made elsewhere: a text file with an empty label cell, a .npy sidecar, an .npz.
    labels[3] = "x"
    for name in ("emb.txt", "emb.npy"):
        embedding_io.write_embeddings(tmp_path / name, paths, labels, emb, progress=False)
    text = tmp_path / "emb.txt"
    lines = text.read_text().splitlines(keepends=True)
    lines[4] = lines[4].replace(",x,", ",,", 1)  # data row 4 (file line 5)
    text.write_text("".join(lines))
    with pytest.raises(UserError, match="line 5 has an empty label"):
        embedding_io.read_embeddings(text, progress=False)
    meta = embedding_io.meta_path(tmp_path / "emb.npy")
    meta.write_text(meta.read_text().replace(",x\n", ",\n", 1))
    with pytest.raises(UserError, match="row 4 has an empty label"):
        embedding_io.read_embeddings(tmp_path / "emb.npy", progress=False)
    np.savez(tmp_path / "emb.npz", emb=emb[:2], paths=np.array(["a", "b"]), labels=np.array(["x", ""]))
    with pytest.raises(UserError, match="row 2 has an empty label"):
        embedding_io.read_embeddings(tmp_path / "emb.npz", progress=False)


def test_rows_longer_than_the_header_are_refused_not_shifted(tmp_path):
    """pandas would take the path column as the index: label read as path, e0 as label."""
    paths, labels, emb = sample(tmp_path)
    for name in ("emb.txt", "emb.npy"):
        embedding_io.write_embeddings(tmp_path / name, paths, labels, emb, progress=False)
    text = tmp_path / "emb.txt"
    lines = text.read_text().splitlines(keepends=True)
    text.write_text(lines[0].replace(",e4", "") + "".join(lines[1:]))  # a header one column short
    with pytest.raises(UserError, match=r"line 2 has more fields than the header's 6 \(path,label,e0..e3\)"):
        embedding_io.read_embeddings(text, progress=False)
    meta = embedding_io.meta_path(tmp_path / "emb.npy")
    rows = meta.read_text().splitlines(keepends=True)
    meta.write_text(rows[0] + "".join(r.rstrip("\n") + ",extra\n" for r in rows[1:]))  # every row one too long
    with pytest.raises(UserError, match=r"emb.npy.meta.csv: line 2 has more fields than the header's 2"):
        embedding_io.read_embeddings(tmp_path / "emb.npy", progress=False)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        embedding_io.read_embeddings(tmp_path / "nope.txt", progress=False)


def test_vectorised_formatter_is_byte_identical_to_printf():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, size=60_000, dtype=np.uint64).astype(np.uint32)
    every_kind = bits.view(np.float32)  # all exponents: tiny, huge, subnormal, inf
    every_kind = every_kind[~np.isnan(every_kind)]
    powers = np.float32(10.0) ** np.arange(-9, 10).astype(np.float32)
    values = np.concatenate([
        every_kind,
        (rng.standard_normal(20_000) / 64).astype(np.float32),  # what a unit 4096-d embedding holds
        powers, np.nextafter(powers, np.float32(0)), np.nextafter(powers, np.float32(np.inf)),
        np.array([0.0, -0.0, 0.5, 1 / 3, 99999.9995, 9.9999997e-05, 123456789, 999999999], dtype=np.float32),
    ])
    values = values[: len(values) // 4 * 4]
    expected = "".join(",".join("%.8e" % v for v in row) + "\n" for row in values.reshape(-1, 4).tolist())
    written = embedding_io.format_values(values, 4)
    assert written == expected.encode("ascii")
    parsed = np.array(written.replace(b"\n", b",").split(b",")[:-1], dtype=np.float64).astype(np.float32)
    assert np.array_equal(parsed.view(np.uint32), values.view(np.uint32))  # exact, -0.0 included


def test_rows_with_extra_columns_are_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text('path,label,e0\na.jpg,"c,d",1\nb.jpg,c,1,2\n')
    with pytest.raises(UserError, match="line 3 has 4 columns, expected 3"):
        embedding_io.read_embeddings(bad, progress=False)


def test_worker_processes_give_the_same_file(tmp_path, monkeypatch):
    paths, labels, emb = sample(tmp_path, n=40, d=6)
    single = tmp_path / "single.txt"
    embedding_io.write_embeddings(single, paths, labels, emb, progress=False)
    # Force the multi-process writer on tiny data: 2 workers, 8-row tasks.
    monkeypatch.setattr(embedding_io, "_PARALLEL_MIN_VALUES", 1)
    monkeypatch.setattr(embedding_io, "_WRITE_ROWS_PER_TASK", 8)
    monkeypatch.setattr(embedding_io, "_workers", lambda n: 2)
    multi = tmp_path / "multi.txt"
    embedding_io.write_embeddings(multi, paths, labels, emb, progress=False)
    assert multi.read_bytes() == single.read_bytes()
    got = embedding_io.read_embeddings(multi, progress=False)
    assert np.array_equal(got.emb, emb) and got.paths == paths and list(got.labels) == labels


def test_text_read_in_blocks_is_exact_and_locates_errors_in_later_blocks(tmp_path, monkeypatch):
    paths, labels, emb = sample(tmp_path, n=11, d=4)
    out = tmp_path / "emb.txt"
    embedding_io.write_embeddings(out, paths, labels, emb, progress=False)
    monkeypatch.setattr(embedding_io, "_READ_BLOCK_VALUES", 12)  # 3 rows of 4 values per block: 4 blocks
    got = embedding_io.read_embeddings(out, progress=False)
    assert np.array_equal(got.emb, emb) and got.paths == paths and list(got.labels) == labels

    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    for line_no, broken, message in [
        (9, "x.jpg,c,1,2,oops,4\n", "line 9 has non-numeric value 'oops' in column e2"),  # 3rd block
        (11, "x.jpg,c,1,2\n", "line 11 has a missing value .* in column e2"),  # 4th block, short row
        (10, "x.jpg,c,1,2,3,4,5\n", "line 10 has 7 columns, expected 6"),  # too many columns
    ]:
        bad = tmp_path / f"bad{line_no}.txt"
        bad.write_text("".join(lines[:line_no - 1] + [broken] + lines[line_no:]), encoding="utf-8")
        with pytest.raises(UserError, match=message):
            embedding_io.read_embeddings(bad, progress=False)
    # booleans alone in the last block (rows 9..): pandas types that block's columns bool, not text
    bad = tmp_path / "bools.txt"
    bad.write_text("".join(lines[:10] + ["x.jpg,c,True,False,True,False\n"]), encoding="utf-8")
    with pytest.raises(UserError, match="line 11 has non-numeric value 'True' in column e0"):
        embedding_io.read_embeddings(bad, progress=False)


@pytest.mark.parametrize("name, message", [("bad.npz", "not a .npz archive"), ("bad.npy", "not a .npy array")])
def test_a_text_file_under_a_binary_name_says_what_it_is_not(tmp_path, name, message):
    # np.load reads it as a pickle and suggests allow_pickle: the message must not
    bad = tmp_path / name
    bad.write_text("path,label,e0\na.jpg,x,1.0\n")
    embedding_io.meta_path(bad).write_text("path,label\na.jpg,x\n")
    with pytest.raises(UserError, match=message):
        embedding_io.read_embeddings(bad, progress=False)


@pytest.mark.parametrize("name", ["big.txt", "big.npz"])
def test_a_value_past_float32_is_named_without_a_numpy_warning(tmp_path, name):
    out = tmp_path / name
    if name.endswith(".txt"):
        out.write_text("path,label,e0,e1\na.jpg,x,1.0,2.0\nb.jpg,x,1e39,2.0\n")
    else:
        np.savez(out, emb=np.array([[1.0, 2.0], [1e39, 2.0]]), paths=np.array(["a.jpg", "b.jpg"]),
                 labels=np.array(["x", "x"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow RuntimeWarning would print two lines before the error
        with pytest.raises(UserError, match=r"row 2 \(.*b\.jpg\) has NaN or infinite values"):
            embedding_io.read_embeddings(out, progress=False)


def test_npz_labels_may_be_class_numbers(tmp_path):
    out = tmp_path / "numbers.npz"
    np.savez(out, emb=np.ones((2, 3), np.float32), paths=np.array(["a", "b"]), labels=np.array([3, 7]))
    assert list(embedding_io.read_embeddings(out, progress=False).labels) == ["3", "7"]


def test_a_text_file_cut_inside_its_last_number_is_warned_about(tmp_path, capsys):
    """A copy that stopped early cut inside the last value: the row parses, with another number."""
    paths, labels, emb = sample(tmp_path, n=3, d=2)
    out = tmp_path / "emb.txt"
    embedding_io.write_embeddings(out, paths, labels, emb, progress=False)
    embedding_io.read_embeddings(out, progress=False)
    assert "warning" not in capsys.readouterr().err  # a whole file ends with a newline
    out.write_bytes(out.read_bytes()[:-4])  # '-1.23456789e-01\n' -> '-1.23456789e-'
    with pytest.raises(UserError, match="line 4"):
        embedding_io.read_embeddings(out, progress=False)  # not a number any more: refused
    out.write_bytes(out.read_bytes()[:-2])  # -> '-1.234567': a number, and a wrong one
    got = embedding_io.read_embeddings(out, progress=False)
    err = capsys.readouterr().err
    assert "does not end with a newline" in err and "imgs/2.jpg" in err
    assert got.emb[2, 1] != emb[2, 1] and got.record is None  # the record no longer describes it


@pytest.mark.parametrize("name", ["e.npy", "e.npz"])
def test_a_matrix_larger_than_memory_is_out_of_memory_not_malformed(tmp_path, monkeypatch, name):
    """A MemoryError while reading reaches cli.run, which prints its out-of-memory line (exit 2):
    calling the file malformed would send the user looking for a fault that is not there."""
    path = tmp_path / name
    embedding_io.write_embeddings(path, ["a/x.jpg", "b/y.jpg"], ["a", "b"], np.eye(2, dtype=np.float32),
                                  progress=False)
    real_load = np.load

    def load(file, *args, **kwargs):
        data = real_load(file, *args, **kwargs)
        if name.endswith(".npz"):  # the archive opens; its big array is read on access
            class Archive:
                files = data.files

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    data.close()

                def __getitem__(self, key):
                    raise MemoryError("Unable to allocate 1.53 GiB")
            return Archive()
        raise MemoryError("Unable to allocate 1.53 GiB")

    monkeypatch.setattr(np, "load", load)
    with pytest.raises(MemoryError):
        embedding_io.read_embeddings(path)

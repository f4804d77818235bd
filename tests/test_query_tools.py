"""query.py, get_distance.py and ann_search.py on a tiny real database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepranking import ann_search, embedding_io
import gen_embeddings
import get_distance
import query
from deepranking.cli import UserError
from deepranking.embedding_io import read_embeddings
from test_gen_embeddings import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
HAS_FAISS = ann_search.faiss_available()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_imagenet):
    """(checkpoint, database embedding file of the 24 train images)."""
    out = tmp_path_factory.mktemp("query")
    ckpt = make_checkpoint(out / "net.model")
    db = out / "train_embedding.txt"
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(
        ["--model", str(ckpt), "--data-dir", str(tiny_imagenet), "--splits", "train", "--train-output", str(db),
         "--device", "cpu", "--no-progress"]))
    return ckpt, db


def run_query(setup, *argv: str) -> None:
    ckpt, db = setup
    args = query.get_args_parser().parse_args(["--model", str(ckpt), "--embeddings", str(db), "--device", "cpu",
                                               *argv])
    query.main(args)


def parse_table(text: str) -> list[list[tuple[float, str]]]:
    """Printed tables -> per query a list of (distance, path)."""
    results = []
    for line in text.splitlines():
        if line.startswith("query "):
            results.append([])
        elif line.strip() and not line.strip().startswith("rank"):
            _rank, dist, _label, path = line.split(maxsplit=3)
            results[-1].append((float(dist), path))
    return results


def train_image(root: Path, label: int, i: int) -> Path:
    wnid = f"n{label:08d}"
    return root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"


# ---------------------------------------------------------------- query.py


def test_image_finds_itself_first(setup, tiny_imagenet, capsys):
    img = train_image(tiny_imagenet, 1, 3)
    run_query(setup, "--top", "5", str(img))
    out = capsys.readouterr().out
    (rows,) = parse_table(out)
    assert len(rows) == 5
    assert Path(rows[0][1]).resolve() == img.resolve() and rows[0][0] < 1e-3
    dists = [d for d, _ in rows]
    assert dists == sorted(dists) and dists[1] > 1e-3
    assert "n00000001" in out.splitlines()[2]  # label column


def test_exclude_self(setup, tiny_imagenet, tmp_path, capsys):
    img = train_image(tiny_imagenet, 0, 0)
    run_query(setup, "--top", "3", "--exclude-self", str(img))
    (rows,) = parse_table(capsys.readouterr().out)
    assert len(rows) == 3 and all(Path(p).resolve() != img.resolve() for _, p in rows)
    # the same image through a link is still itself
    link = tmp_path / "link"
    link.symlink_to(img.parent, target_is_directory=True)
    run_query(setup, "--top", "3", "--exclude-self", str(link / img.name))
    (rows,) = parse_table(capsys.readouterr().out)
    assert len(rows) == 3 and all(Path(p).resolve() != img.resolve() for _, p in rows) and rows[0][0] > 1e-4


def test_folder_and_glob_queries_and_grid(setup, tiny_imagenet, tmp_path, capsys):
    folder = tiny_imagenet / "train" / "n00000002"
    pattern = str(tiny_imagenet / "train" / "n00000000" / "images" / "*_[01].JPEG")  # quoted: we expand it
    grid = tmp_path / "grid.png"
    run_query(setup, "--top", "4", "--grid", str(grid), str(folder), pattern)
    captured = capsys.readouterr()
    results = parse_table(captured.out)
    assert len(results) == 8 + 2  # every image of the folder (recursively), then the 2 glob matches
    assert "queries against 24 x 16 (exact search)" in captured.err
    for rows in results:
        assert rows[0][0] < 1e-3  # each query is in the database
    with Image.open(grid) as im:
        im.load()
        assert im.format == "PNG" and im.height > 10 * 96 and im.width >= 5 * 96
    with pytest.raises(UserError, match="already exists"):
        run_query(setup, "--grid", str(grid), pattern)
    # the grid's table is refused as the PNG is: a user's other.csv is not replaced by it
    (tmp_path / "other.csv").write_text("precious\n")
    with pytest.raises(UserError, match=r"grid's table already exists: .*other\.csv \(use --force"):
        run_query(setup, "--grid", str(tmp_path / "other.png"), pattern)
    assert (tmp_path / "other.csv").read_text() == "precious\n" and not (tmp_path / "other.png").exists()


def test_exclude_self_on_a_one_image_database_says_why_nothing_is_left(setup, tmp_path):
    from deepranking.embedding_io import write_embeddings

    db = read_embeddings(setup[1], progress=False)
    one = tmp_path / "one.txt"
    write_embeddings(one, db.paths[:1], list(db.labels[:1]), db.emb[:1], progress=False, model=db.model)
    args = query.get_args_parser().parse_args(["--model", str(setup[0]), "--embeddings", str(one), "--device", "cpu",
                                               "--top", "5", "--exclude-self", db.paths[0]])
    with pytest.raises(UserError, match="the database holds 1 image"):
        query.main(args)


def test_query_errors(setup, tmp_path, tiny_imagenet, capsys):
    img = str(train_image(tiny_imagenet, 0, 0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no query images matched"):
        run_query(setup, str(tmp_path / "empty"), str(tmp_path / "*.jpg"))
    # Beside a real query, each item that matched nothing is named, not dropped without a word.
    run_query(setup, "--top", "2", img, str(tmp_path / "empty"), str(tiny_imagenet / "train" / "*" / "*.jpeg"))
    captured = capsys.readouterr()
    assert f"no query image in {tmp_path / 'empty'}: folder left out" in captured.err
    assert "*.jpeg: pattern left out" in captured.err and captured.out.count("query ") == 1
    with pytest.raises(UserError, match="query not found"):
        run_query(setup, str(tmp_path / "missing.jpg"))
    ckpt, db = setup
    with pytest.raises(UserError, match="embedding file not found"):
        query.main(query.get_args_parser().parse_args(
            ["--model", str(ckpt), "--embeddings", str(tmp_path / "nope.txt"), img]))
    other = make_checkpoint(tmp_path / "dim8.model", dim=8)
    with pytest.raises(UserError, match="8-dimensional embeddings but .* 16-dimensional"):
        query.main(query.get_args_parser().parse_args(["--model", str(other), "--embeddings", str(db), img]))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="bad.png"):
        run_query(setup, str(bad))


def test_query_cli_exit_2(setup, tmp_path):
    ckpt, db = setup
    result = subprocess.run([sys.executable, str(REPO / "query.py"), "--model", str(ckpt), "--embeddings", str(db),
                             str(tmp_path / "*.png")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no query images matched") and len(result.stderr.splitlines()) == 1


# ---------------------------------------------------------------- ANN


def test_choose_backend(monkeypatch):
    assert ann_search.choose_backend("exact", 10**7) == "exact"
    assert ann_search.choose_backend("auto", 1000) == "exact"
    assert ann_search.choose_backend("auto", 300_000) == ("faiss" if HAS_FAISS else "exact")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    assert ann_search.choose_backend("auto", 300_000) == "exact"
    with pytest.raises(UserError, match="pip install faiss-cpu"):
        ann_search.choose_backend("faiss", 10)


def test_search_paths_of_query_py_equal_knn_search():
    """query.py's exact path (one ExactIndex, many searches, self exclusion) gives knn_search's answers."""
    from deepranking.retrieval import knn_search

    rng = np.random.default_rng(1)
    db = rng.standard_normal((300, 16)).astype(np.float32)
    db[7] = db[3]  # an exact tie: the lower row index comes first
    args = query.get_args_parser().parse_args(["--model", "m", "--embeddings", "e", "q.jpg"])
    searcher = query.build_searcher(db, "exact", "cpu", args)
    q = np.concatenate([rng.standard_normal((20, 16)).astype(np.float32), db[3:4]])
    for k in (1, 30):
        dist, idx = query.search(searcher, q, k, args)
        d_ref, i_ref = knn_search(q, db, k)
        np.testing.assert_array_equal(idx, i_ref)
        np.testing.assert_allclose(dist, d_ref, atol=1e-6)
    assert idx[-1, :2].tolist() == [3, 7]
    # --exclude-self: a database image asked as a query never answers itself; -1 = not in the database.
    rows = np.array([-1] * 20 + [3])
    _, idx = query.search(searcher, q, 5, args, self_rows=rows)
    assert idx[-1, 0] == 7 and 3 not in idx[-1]
    np.testing.assert_array_equal(idx[:20], knn_search(q[:20], db, 5)[1])
    # --top larger than the database: everything except the query itself.
    _, idx = query.search(searcher, q, 1000, args, self_rows=rows)
    assert idx.shape == (21, 299) and 3 not in idx[-1]
    if HAS_FAISS:  # FAISS with every cluster probed answers as the exact search does, --exclude-self too
        args.nprobe = 4
        ivf = ann_search.build_ivf_index(db, nlist=4, seed=0)
        for k in (5, 300, 1000):
            got, want = (query.search(s, q, k, args, self_rows=rows) for s in (ivf, searcher))
            assert got[1].shape == want[1].shape == (21, min(k, 299)) and 3 not in got[1][-1]
            np.testing.assert_array_equal(got[1][:20], want[1][:20])
            np.testing.assert_allclose(got[0], want[0], atol=1e-4)


def test_recall_at_k():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    assert ann_search.recall_at_k(exact, exact) == 1.0
    assert ann_search.recall_at_k(np.array([[0, 9, -1], [5, 4, 3]]), exact) == pytest.approx(4 / 6)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu not installed")
def test_ivf_matches_exact_when_all_clusters_probed():
    import torch

    from deepranking.retrieval import knn_search

    rng = np.random.default_rng(0)
    db = rng.standard_normal((2000, 8)).astype(np.float32)
    q = rng.standard_normal((20, 8)).astype(np.float32)
    index = ann_search.build_ivf_index(db, nlist=16, seed=0)
    dist, idx = ann_search.ivf_search(index, q, 5, nprobe=16)
    d_exact, i_exact = knn_search(torch.from_numpy(q), torch.from_numpy(db), 5)
    np.testing.assert_array_equal(idx, np.asarray(i_exact))
    np.testing.assert_allclose(dist, np.asarray(d_exact), rtol=1e-4, atol=1e-4)
    _, idx1 = ann_search.ivf_search(index, q, 5, nprobe=1)  # one cluster: approximate
    assert 0.3 < ann_search.recall_at_k(idx1, np.asarray(i_exact)) <= 1.0


@pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu not installed")
def test_query_with_faiss_and_saved_index(setup, tiny_imagenet, tmp_path, capsys):
    img = str(train_image(tiny_imagenet, 2, 5))
    run_query(setup, "--top", "4", img)
    exact = parse_table(capsys.readouterr().out)
    index = tmp_path / "db.faiss"
    run_query(setup, "--top", "4", "--ann", "faiss", "--index", str(index), img)
    captured = capsys.readouterr()
    assert "(faiss search)" in captured.err and index.is_file()
    got = parse_table(captured.out)
    assert [p for _, p in got[0]] == [p for _, p in exact[0]]  # 1 cluster (24 rows): exact
    np.testing.assert_allclose([d for d, _ in got[0]], [d for d, _ in exact[0]], atol=1e-4)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu not installed")
def test_faiss_index_file_is_rebuilt_for_a_replaced_database_even_one_with_an_older_mtime(
        setup, tiny_imagenet, tmp_path, capsys):
    """`cp -p` / `rsync -t` of another database with as many rows must not be searched with
    the index built from the old one (its vectors would be shown under the new paths)."""
    ckpt, db = setup
    old = embedding_io.read_embeddings(db, progress=False)
    mine, index = tmp_path / "db.txt", tmp_path / "db.faiss"
    embedding_io.write_embeddings(mine, old.paths, old.labels, old.emb, progress=False, model=old.model)
    img = str(train_image(tiny_imagenet, 2, 5))

    def top(*flags):
        query.main(query.get_args_parser().parse_args(["--model", str(ckpt), "--embeddings", str(mine), "--device",
                                                       "cpu", "--top", "6", *flags, img]))
        return parse_table(capsys.readouterr().out)[0]

    top("--ann", "faiss", "--index", str(index), "--no-saved-index")
    built = index.stat().st_mtime_ns
    top("--ann", "faiss", "--index", str(index), "--no-saved-index")
    assert index.stat().st_mtime_ns == built  # the same database: reused
    # Another database of as many rows (each path now has another image's vector), dated before the index.
    perm = np.roll(np.arange(len(old)), 5)
    embedding_io.write_embeddings(mine, old.paths, old.labels, old.emb[perm], progress=False, model=old.model)
    for f in embedding_io.files_of(mine):
        if f.exists():
            os.utime(f, ns=(built - 10**10, built - 10**10))
    got = top("--ann", "faiss", "--index", str(index), "--no-saved-index")
    assert index.stat().st_mtime_ns != built
    exact = top("--no-saved-index")
    assert [p for _, p in got] == [p for _, p in exact]
    np.testing.assert_allclose([d for d, _ in got], [d for d, _ in exact], atol=1e-4)


# ---------------------------------------------------------------- get_distance.py


def distance(setup, a: Path, b: Path, capsys) -> float:
    ckpt, _ = setup
    get_distance.main(get_distance.get_args_parser().parse_args(
        ["--model", str(ckpt), "--image1", str(a), "--image2", str(b), "--device", "cpu"]))
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    return float(out)


def test_get_distance(setup, tiny_imagenet, capsys):
    a, b = train_image(tiny_imagenet, 0, 1), train_image(tiny_imagenet, 1, 2)
    assert distance(setup, a, a, capsys) < 1e-5
    d_ab, d_ba = distance(setup, a, b, capsys), distance(setup, b, a, capsys)
    assert d_ab == pytest.approx(d_ba, abs=1e-6) and 0 < d_ab <= 2
    # Same number as the two rows of the embedding file.
    db = read_embeddings(setup[1], progress=False)
    rows = [db.paths.index(str(p.resolve())) for p in (a, b)]
    assert d_ab == pytest.approx(float(np.linalg.norm(db.emb[rows[0]] - db.emb[rows[1]])), abs=1e-5)
    # ... and the digits query.py prints for the pair (the saved database's exact search).
    run_query(setup, "--top", str(len(db)), str(a))
    printed = {path: d for d, path in parse_table(capsys.readouterr().out)[0]}
    assert d_ab == printed[query.display_path(db.paths[rows[1]])]


def test_get_distance_errors(setup, tiny_imagenet, tmp_path):
    ckpt, _ = setup
    a = str(train_image(tiny_imagenet, 0, 1))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    cases = [
        (["--model", str(ckpt), "--image1", str(bad), "--image2", a], "bad.jpg"),
        (["--model", str(tmp_path / "m.model"), "--image1", a, "--image2", a], "checkpoint not found"),
    ]
    # A damaged model: NaN in a weight gives NaN embeddings, a std of 0 in the record infinite pixels.
    import torch
    from deepranking.checkpoint import load_checkpoint

    nan_weights, zero_std = load_checkpoint(ckpt), load_checkpoint(ckpt)
    first = next(k for k, v in nan_weights["model"].items() if v.is_floating_point() and v.dim() == 4)
    nan_weights["model"][first] = torch.full_like(nan_weights["model"][first], float("nan"))
    zero_std["preprocessing"]["std"] = [0.0, 0.0, 0.0]
    torch.save(nan_weights, tmp_path / "nan.model")
    torch.save(zero_std, tmp_path / "std0.model")
    cases += [
        (["--model", str(tmp_path / "nan.model"), "--image1", a, "--image2", a],
         "the model gives NaN or infinite embeddings for 2 of 2 image"),
        (["--model", str(tmp_path / "std0.model"), "--image1", a, "--image2", a], "preprocessing record is invalid"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            get_distance.main(get_distance.get_args_parser().parse_args([*argv, "--device", "cpu"]))
    # Through the command line: one line on stderr, exit 2, nothing on stdout.
    result = subprocess.run([sys.executable, str(REPO / "get_distance.py"), "--model", str(ckpt), "--image1", a,
                             "--image2", str(tmp_path / "x.jpg"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: image2 not found: {tmp_path / 'x.jpg'}"]

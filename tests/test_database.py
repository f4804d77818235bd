"""deepranking/database.py: a database in one file or in a folder of shards gives the same rows,
neighbours and metrics; search by blocks equals one exact search; a folder grows shard by shard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import eval as eval_script
import gen_embeddings
import query
import update_database
from conftest import write_tiny_imagenet
from deepranking import ann_search, database, retrieval
from deepranking.cli import UserError
from test_gen_embeddings import make_checkpoint, run_script
from test_retrieval import brute_force
from test_update_database import add_images

HAS_FAISS = ann_search.faiss_available()
DIM = 3 * 32 * 32  # --features pixels at 32 px: 5 shards of 20 rows per 1M block


def gen(*argv: str) -> None:
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args([*argv, "--device", "cpu", "--no-progress"]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 4-class TinyImageNet (25 train + 5 val images a class), embedded as raw pixels (3,072-d) into
    text files and into database folders of 7-row shards."""
    root = tmp_path_factory.mktemp("db")
    images = write_tiny_imagenet(root / "tin", n_classes=4, train_per_class=25, val_per_class=5)
    pixels = ["--features", "pixels", "--data-dir", str(images)]
    gen(*pixels, "--train-output", str(root / "train.txt"), "--test-output", str(root / "test.txt"))
    gen(*pixels, "--train-output", str(root / "train_db"), "--test-output", str(root / "test_db"), "--shard-rows", "7")
    return root, images


def test_a_folder_holds_the_rows_of_the_file(data):
    root, _ = data
    one, shards = database.open(root / "train.txt", progress=False), database.open(root / "train_db")
    assert isinstance(shards, database.ShardedDatabase) and len(shards.shards) == 15  # 100 rows, 7 a shard
    assert [s.rows for s in shards.shards] == [7] * 14 + [2]
    assert len(shards) == len(one) == 100 and shards.dim == one.dim == DIM
    assert shards.paths == one.paths and list(shards.labels) == list(one.labels)
    np.testing.assert_array_equal(shards[0:100], one.emb)  # bit for bit
    np.testing.assert_array_equal(shards[np.array([99, 3, 50, 3])], one.emb[[99, 3, 50, 3]])
    np.testing.assert_array_equal(shards.stamps, one.stamps)
    assert shards.model == one.model and shards.images_root == one.images_root
    manifest = json.loads((root / "train_db" / "manifest.json").read_text())
    assert (manifest["rows"], manifest["dim"], manifest["shard_rows"], manifest["next_shard"]) == (100, DIM, 7, 15)
    rows = (root / "train_db" / "shard-00000.rows.csv").read_text().splitlines()
    assert rows[0] == "path,label,size,mtime_ns" and rows[1].startswith("../tin/train/n00000000/images/")
    assert not [p for p in (root / "train_db").iterdir() if p.name.startswith(".")]  # no staging left


def test_eval_of_a_folder_by_blocks_equals_eval_of_the_file(data):
    """1M of budget holds 20 of the 3,072-d rows: the folder is scored in 5 blocks, merged."""
    root, _ = data
    metrics = []
    for train, test, budget in (("train.txt", "test.txt", "auto"), ("train_db", "test_db", "1M")):
        out = root / f"eval_{train}"
        eval_script.main(eval_script.get_args_parser().parse_args(
            ["--train-embeddings", str(root / train), "--test-embeddings", str(root / test), "--k", "5",
             "--output-dir", str(out), "--device", "cpu", "--no-progress", "--memory-budget", budget,
             "--num-demo-queries", "2", "--force"]))
        m = json.loads((out / "metrics.json").read_text())
        metrics.append({k: v for k, v in m.items() if k not in ("train_embeddings", "test_embeddings")})
        assert (out / "retrieval_1.png").is_file()
    assert metrics[0] == metrics[1]
    assert database.Budget(10**6).block_rows(DIM) == 20


@pytest.fixture
def pixel_queries(monkeypatch, data):
    """query.py embeds with --model; the pixel databases were made without a checkpoint. Give it the
    pixel features (the rows gen_embeddings --features pixels wrote) and the databases' fingerprint."""
    import deep_rank_net
    from deepranking import checkpoint, reference_features

    model, spec = reference_features.reference_features("pixels", "resnet18", "imagenet", None, None, "cpu")
    fingerprint = database.open(data[0] / "train_db").model
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path: {})
    monkeypatch.setattr(deep_rank_net, "model_from_checkpoint", lambda ckpt, device: (model, spec))
    monkeypatch.setattr(checkpoint, "model_fingerprint", lambda *a, **kw: fingerprint)


def test_query_of_a_folder_equals_query_of_the_file(data, pixel_queries, capsys):
    root, images = data
    probe = str(sorted((images / "train").rglob("*.JPEG"))[7])
    answers = []
    for db, extra in (("train.txt", []), ("train_db", ["--memory-budget", "1M"])):
        capsys.readouterr()
        query.main(query.get_args_parser().parse_args(
            ["--model", "pixels", "--embeddings", str(root / db), "--device", "cpu", "--top", "6", "--exclude-self",
             *extra, probe]))
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]
    rows = answers[0].splitlines()[2:]
    assert len(rows) == 6 and not any(row.endswith(probe) for row in rows)  # itself left out


@pytest.mark.parametrize("block_rows", [1, 6, 25, 100])
def test_search_by_blocks_equals_one_exact_search(tmp_path, block_rows):
    """Rows in shards of 7, searched block_rows at a time: the same neighbours, distances and order as
    retrieval.ExactIndex over the whole matrix, with ties (duplicated rows), excluded rows and largest."""
    rng = np.random.default_rng(block_rows)
    emb = rng.normal(size=(40, 6)).astype(np.float32)
    emb[10:14] = emb[3]  # exact ties: the lower row first
    db = write_folder(tmp_path / "db", emb, shard_rows=7)
    index = database.StreamingIndex(db, database.Budget(block_rows * 4 * 6 * 4), "cpu")
    assert (index._whole is None) == (block_rows < 40)
    exact = retrieval.ExactIndex(emb, "cpu")
    q = np.concatenate([rng.normal(size=(5, 6)).astype(np.float32), emb[[3, 12, 39]]])
    exclude = np.array([-1, -1, 4, -1, 0, 3, 12, 39])
    for kwargs in ({}, {"exclude_rows": exclude}, {"largest": True}, {"exclude_rows": exclude, "largest": True}):
        for k in (1, 5, 39):
            got, want = index.search(q, k, **kwargs), exact.search(q, k, **kwargs)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(index.search(q, 8)[1], brute_force(q, emb, 8)[1])
    with pytest.raises(UserError, match="out of range"):
        index.search(q, 40, exclude_rows=exclude)


def write_folder(folder: Path, emb: np.ndarray, shard_rows: int, model: dict | None = None) -> database.ShardedDatabase:
    """A database folder of ``emb`` with made-up image paths, written as gen_embeddings.py writes one."""
    paths = [str(folder.parent / "img" / f"{i}.png") for i in range(len(emb))]
    out = database.Output(folder, paths, [f"c{i % 3}" for i in range(len(emb))], emb.shape[1], model=model,
                          shard_rows=shard_rows)
    with out.writer(0) as writer:
        for a in range(0, len(emb), 5):  # batches that straddle the shards
            writer.write(emb[a:a + 5])
    database.commit([out], progress=False)
    return database.open(folder)


def test_merge_keeps_the_first_k_by_distance_then_row():
    a = (np.array([[1.0, 3.0]], np.float32), np.array([[5, 2]]))
    b = (np.array([[1.0, 2.0, np.inf]], np.float32), np.array([[4, 9, -1]]))
    dist, idx = database.merge_neighbours(a, b, 3)
    assert idx.tolist() == [[4, 5, 9]] and dist.tolist() == [[1.0, 1.0, 2.0]]
    dist, idx = database.merge_neighbours(None, b, 3, largest=True)
    assert idx.tolist() == [[9, 4, -1]]


def test_torchrun_two_ranks_write_their_own_shards(data, tmp_path):
    """Each rank writes the shards of its half (names computed alike, no gather); the folder equals a
    single-process one row for row."""
    root, images = data
    out = tmp_path / "db"
    result = run_script("--features", "pixels", "--data-dir", str(images), "--splits", "train",
                        "--train-output", str(out), "--shard-rows", "30",
                        module=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                        env_extra={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = database.open(out), database.open(root / "train_db")
    assert [s.rows for s in got.shards] == [30, 20, 30, 20]  # ranks: rows 0-49 and 50-99
    assert got.paths == want.paths
    np.testing.assert_array_equal(got[0:100], want[0:100])


def test_refuses_folders_that_are_not_databases(tmp_path, data):
    root, images = data
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a database"):
        gen("--features", "pixels", "--data-dir", str(images), "--splits", "train", "--train-output", str(other),
            "--shard-rows", "10", "--force")
    with pytest.raises(UserError, match="no manifest.json"):
        database.open(other)
    with pytest.raises(UserError, match="already exists"):
        gen("--features", "pixels", "--data-dir", str(images), "--splits", "train",
            "--train-output", str(root / "train_db"), "--shard-rows", "10")
    broken = tmp_path / "broken"
    write_folder(broken, np.ones((9, 4), np.float32), shard_rows=4)
    np.save(broken / "shard-00001.npy", np.ones((3, 4), np.float32))
    with pytest.raises(UserError, match="shard shard-00001.npy holds"):
        database.open(broken)


def test_a_failed_run_leaves_no_shards_and_the_old_database(tmp_path, data, monkeypatch):
    """An error after some shards were written (here: the third batch) removes them; a database that was
    there stays as it was, and a --force run then replaces it, old shards and indexes gone."""
    from deepranking import embedding

    root, images = data
    out = tmp_path / "db"
    argv = ["--features", "pixels", "--data-dir", str(images), "--splits", "train", "--train-output", str(out),
            "--shard-rows", "10", "--batch-size", "10"]
    gen(*argv)
    before = sorted(p.name for p in out.iterdir())
    (out / "ivf-nlist4-pq0-seed0").mkdir()
    real = embedding.embed_path_batches

    def failing(paths, *a, **kw):
        for i, block in enumerate(real(paths, *a, **kw)):
            if i == 2:
                raise UserError("the disk is full")
            yield block

    monkeypatch.setattr(embedding, "embed_path_batches", failing)
    with pytest.raises(UserError, match="disk is full"):
        gen(*argv, "--force")
    assert sorted(p.name for p in out.iterdir()) == sorted(before + ["ivf-nlist4-pq0-seed0"])
    monkeypatch.setattr(embedding, "embed_path_batches", real)
    gen(*argv, "--force")
    after = database.open(out)
    assert [s.name for s in after.shards][0] == "shard-00010" and len(after) == 100
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [f"shard-{i:05d}{ext}" for i in range(10, 20) for ext in (".npy", ".rows.csv")])


def test_budget_flag_environment_and_auto(monkeypatch):
    assert database.memory_budget(2 * 10**9).nbytes == 2 * 10**9
    monkeypatch.setenv(database.BUDGET_ENV, "300M")
    assert database.memory_budget().nbytes == 300 * 10**6
    monkeypatch.setenv(database.BUDGET_ENV, "lots")
    with pytest.raises(UserError, match="DEEP_RANK_MEMORY_BUDGET"):
        database.memory_budget()
    monkeypatch.delenv(database.BUDGET_ENV)
    auto = database.memory_budget().nbytes
    assert database.MIN_BUDGET <= auto <= database.AUTO_MAX
    b = database.Budget(4 * 10**8)  # a quarter on the block, a sixteenth in floats on distances
    assert (b.block_rows(128), b.chunk_floats, b.query_rows(128)) == (195312, 25 * 10**6, 97656)


# ------------------------------------------------------------------ growing a folder


def test_update_writes_new_shards_and_rewrites_only_the_affected_ones(tmp_path):
    from conftest import write_class_folder

    ckpt = make_checkpoint(tmp_path / "net.model")
    folder = write_class_folder(tmp_path / "photos", n_classes=3, per_class=10)
    db = tmp_path / "db"
    gen("--model", str(ckpt), "--data-dir", str(folder), "--train-output", str(db), "--shard-rows", "8")
    before = database.open(db)
    before_emb = before[0:len(before)]  # its shards 1 and 2 go with the update
    assert [s.rows for s in before.shards] == [8, 8, 8, 6]
    stat = {p.name: p.stat().st_mtime_ns for p in db.iterdir()}
    # 3 new images, one changed (row 9: shard 1), one removed (row 20: shard 2); shards 0 and 3 untouched
    added = add_images(folder, 1, range(10, 13))
    changed = Path(before.paths[9])
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 10, 10)).save(changed)
    os.utime(changed, ns=(0, changed.stat().st_mtime_ns + 10**9))
    Path(before.paths[20]).unlink()
    plan = update_database.main(update_database.get_args_parser().parse_args(
        ["--model", str(ckpt), "--database", str(db), "--device", "cpu", "--no-progress"]))
    assert (plan.new, plan.changed, plan.removed, plan.unchanged) == (3, 1, 1, 28)
    after = database.open(db)
    names = [s.name for s in after.shards]
    assert names == ["shard-00000", "shard-00004", "shard-00005", "shard-00003", "shard-00006"]
    assert [s.rows for s in after.shards] == [8, 8, 7, 6, 3]
    for name in ("shard-00000", "shard-00003"):  # never rewritten
        assert (db / f"{name}.npy").stat().st_mtime_ns == stat[f"{name}.npy"]
    assert not (db / "shard-00001.npy").exists() and not (db / "shard-00002.npy").exists()
    # The rows of a rebuild, in another order: changed row in place, new images last.
    assert after.paths[9] == str(changed) and after.paths[-3:] == [str(p) for p in added]
    rebuilt = tmp_path / "rebuilt.txt"
    gen("--model", str(ckpt), "--data-dir", str(folder), "--train-output", str(rebuilt))
    want = database.open(rebuilt, progress=False)
    row = {p: i for i, p in enumerate(want.paths)}
    order = [row[p] for p in after.paths]
    assert sorted(order) == list(range(len(want)))
    np.testing.assert_allclose(after[0:len(after)], want.emb[order], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(after.stamps, want.stamps[order])
    kept = [i for i, p in enumerate(after.paths) if p in before.paths and p != str(changed)]
    old = {p: i for i, p in enumerate(before.paths)}
    np.testing.assert_array_equal(after[np.array(kept)], before_emb[[old[after.paths[i]] for i in kept]])
    again = update_database.main(update_database.get_args_parser().parse_args(
        ["--model", str(ckpt), "--database", str(db), "--device", "cpu", "--no-progress"]))
    assert len(again.to_embed) == 0 and again.removed == 0
    with pytest.raises(UserError, match="updated in place"):
        update_database.main(update_database.get_args_parser().parse_args(
            ["--model", str(ckpt), "--database", str(db), "--output", str(tmp_path / "x"), "--device", "cpu"]))


@pytest.mark.skipif(not HAS_FAISS, reason="faiss is optional (pip install faiss-cpu)")
def test_shard_indexes_probe_like_one_index_and_follow_an_update(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 8)).astype(np.float32)
    model = {"id": "m1"}
    db = write_folder(tmp_path / "db", emb, shard_rows=70, model=model)
    budget = database.Budget(10**7)
    ivf = database.ShardIVF(db, budget, nlist=4, nprobe=4)  # every list probed: the exact neighbours
    q = rng.normal(size=(6, 8)).astype(np.float32)
    _, idx = ivf.search(q, 10)
    np.testing.assert_array_equal(idx, retrieval.ExactIndex(emb, "cpu").search(q, 10)[1])
    files = sorted(p.name for p in ivf.folder.iterdir())
    assert files == ["shard-00000.faiss", "shard-00001.faiss", "shard-00002.faiss", "shard-00003.faiss",
                     "shard-00004.faiss", "trained.faiss", "trained.json"]
    stamp = (ivf.folder / "shard-00000.faiss").stat().st_mtime_ns
    _, self_idx = database.ShardIVF(db, budget, nlist=4, nprobe=4).search(emb[:3], 2, exclude_rows=np.arange(3))
    assert (self_idx != np.arange(3)[:, None]).all()
    assert (ivf.folder / "shard-00000.faiss").stat().st_mtime_ns == stamp  # reused, not rebuilt
    pq = database.ShardIVF(db, budget, nlist=4, nprobe=4, pq=2)  # 2 bytes a vector: approximate distances
    assert pq.folder.name == "ivf-nlist4-pq2-seed0" and pq.search(q, 10)[1].shape == (6, 10)
    with pytest.raises(UserError, match="must divide"):
        database.ShardIVF(db, budget, nlist=4, pq=3)
    # Drop the first 70 rows' shard by hand the way an update does: only the new shard is indexed.
    record = json.loads((tmp_path / "db" / "manifest.json").read_text())
    record["shards"], record["rows"] = record["shards"][1:], 230
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(record))
    assert database.refresh_indexes(database.open(tmp_path / "db"), budget) == 2  # flat and PQ
    assert not (ivf.folder / "shard-00000.faiss").exists()
    assert (ivf.folder / "shard-00001.faiss").stat().st_mtime_ns > 0

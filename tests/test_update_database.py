"""update_database.py: only new or changed images are embedded, and the result equals a full rebuild."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gen_embeddings
import update_database
from conftest import class_image, write_class_folder
from deepranking import cli, embedding
from deepranking.embedding_io import read_embeddings, write_embeddings
from test_gen_embeddings import make_checkpoint


def gen(ckpt: Path, folder: Path, out: Path) -> None:
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(
        ["--model", str(ckpt), "--data-dir", str(folder), "--train-output", str(out), "--device", "cpu",
         "--no-progress", "--force"]))


def update(ckpt: Path, db: Path, *extra: str) -> update_database.Plan:
    return update_database.main(update_database.get_args_parser().parse_args(
        ["--model", str(ckpt), "--database", str(db), "--device", "cpu", "--no-progress", *extra]))


@pytest.fixture
def embed_counter(monkeypatch):
    """Counts the images update_database.py sends through the network."""
    counted = []
    real = embedding.embed_paths

    def counting(paths, *a, **kw):
        counted.extend(paths)
        return real(paths, *a, **kw)

    monkeypatch.setattr(embedding, "embed_paths", counting)
    return counted


def add_images(folder: Path, label: int, indices, seed: int = 0) -> list[Path]:
    name = f"class{label:02d}"
    added = []
    for i in indices:
        p = folder / name / f"{name}_{i}.jpg"
        Image.fromarray(class_image(label, i, 32, seed)).save(p)
        added.append(p)
    return added


def assert_equal_databases(got: Path, want: Path) -> None:
    a, b = read_embeddings(got, progress=False), read_embeddings(want, progress=False)
    assert a.paths == b.paths and list(a.labels) == list(b.labels)
    np.testing.assert_allclose(a.emb, b.emb, atol=1e-6, rtol=0)
    assert a.model["id"] == b.model["id"]


def test_adding_10_images_to_600_embeds_10_and_equals_a_rebuild(tmp_path, embed_counter, capsys):
    ckpt = make_checkpoint(tmp_path / "net.model")
    folder = write_class_folder(tmp_path / "photos", n_classes=6, per_class=100)
    db = tmp_path / "db.txt"
    gen(ckpt, folder, db)
    before = read_embeddings(db, progress=False)
    assert len(before) == 600
    added = add_images(folder, 0, range(100, 105)) + add_images(folder, 3, range(100, 105))
    embed_counter.clear()
    plan = update(ckpt, db)
    assert (len(plan.to_embed), plan.new, plan.changed, plan.removed, plan.unchanged) == (10, 10, 0, 0, 600)
    assert sorted(embed_counter) == sorted(str(p) for p in added)  # only the new images went through the net
    assert "10 to embed (10 new, 0 changed), 0 removed, 600 unchanged" in capsys.readouterr().err
    after = read_embeddings(db, progress=False)
    # Every kept row is the old row, bit for bit.
    row = {p: i for i, p in enumerate(before.paths)}
    kept = [i for i, p in enumerate(after.paths) if p in row]
    np.testing.assert_array_equal(after.emb[kept], before.emb[[row[after.paths[i]] for i in kept]])
    rebuilt = tmp_path / "rebuilt.txt"
    gen(ckpt, folder, rebuilt)
    assert_equal_databases(db, rebuilt)  # same rows, same order (list_class_folder), values to 1e-6
    # Nothing changed since: nothing embedded, the file is not rewritten.
    stamp = os.stat(db).st_mtime_ns
    embed_counter.clear()
    plan = update(ckpt, db)
    assert plan.to_embed == [] and embed_counter == [] and os.stat(db).st_mtime_ns == stamp


@pytest.mark.parametrize("name", ["db.npz", "db.npy"])
def test_changed_and_removed_images_in_binary_databases(tmp_path, name, embed_counter):
    ckpt = make_checkpoint(tmp_path / "net.model")
    folder = write_class_folder(tmp_path / "photos", n_classes=3, per_class=8)
    db = tmp_path / name
    gen(ckpt, folder, db)
    (folder / "class01" / "class01_3.jpg").unlink()  # removed
    changed = folder / "class02" / "class02_0.jpg"
    Image.fromarray(class_image(2, 0, 32, seed=7)).save(changed)  # other pixels, other size/mtime
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    added = add_images(folder, 0, [50, 51])
    embed_counter.clear()
    dry = update(ckpt, db, "--dry-run")
    assert (dry.new, dry.changed, dry.removed, dry.unchanged) == (2, 1, 1, 22) and embed_counter == []
    plan = update(ckpt, db)
    assert (plan.new, plan.changed, plan.removed) == (2, 1, 1)
    assert sorted(embed_counter) == sorted([str(changed)] + [str(p) for p in added])
    rebuilt = tmp_path / ("rebuilt" + Path(name).suffix)
    gen(ckpt, folder, rebuilt)
    assert_equal_databases(db, rebuilt)


def test_an_image_replaced_while_gen_embeddings_runs_is_embedded_again_by_the_update(tmp_path, monkeypatch):
    """The stamps are taken before decoding: with the new file's stamp beside the old vector,
    the update called the database up to date and kept the stale row."""
    ckpt = make_checkpoint(tmp_path / "net.model")
    folder = write_class_folder(tmp_path / "photos", n_classes=2, per_class=4)
    victim = folder / "class00" / "class00_1.jpg"
    real = embedding.embed_path_batches

    def embed_then_replace(paths, *a, **kw):
        yield from real(paths, *a, **kw)
        Image.fromarray(class_image(1, 0, 32, seed=9)).save(victim)  # the user replaces it meanwhile
        os.utime(victim, ns=(os.stat(victim).st_atime_ns, os.stat(victim).st_mtime_ns + 10**9))

    monkeypatch.setattr(embedding, "embed_path_batches", embed_then_replace)
    db = tmp_path / "db.txt"
    gen(ckpt, folder, db)
    monkeypatch.setattr(embedding, "embed_path_batches", real)
    plan = update(ckpt, db)
    assert (plan.new, plan.changed, plan.removed) == (0, 1, 0)
    gen(ckpt, folder, tmp_path / "rebuilt.txt")
    assert_equal_databases(db, tmp_path / "rebuilt.txt")


def test_refuses_another_model_and_databases_without_a_record(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "a.model")
    other = make_checkpoint(tmp_path / "b.model", seed=1)
    folder = write_class_folder(tmp_path / "photos", n_classes=2, per_class=4)
    db = tmp_path / "db.txt"
    gen(ckpt, folder, db)
    before = db.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.run(update_database.main, update_database.get_args_parser(),
                ["--model", str(other), "--database", str(db), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "different models" in err
    assert db.read_bytes() == before
    old = tmp_path / "old.txt"
    data = read_embeddings(db, progress=False)
    write_embeddings(old, data.paths, data.labels, data.emb, progress=False)  # no model recorded
    with pytest.raises(cli.UserError, match="records no model.*gen_embeddings.py"):
        update(ckpt, old)
    # --output elsewhere refuses to overwrite without --force
    out = tmp_path / "out.txt"
    out.write_text("keep")
    with pytest.raises(cli.UserError, match="already exists"):
        update(ckpt, db, "--output", str(out))
    assert out.read_text() == "keep"

"""triplet_sampler: sampling invariants, determinism, layouts, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepranking import image_data
import triplet_sampler
from deepranking.cli import UserError
from conftest import REPO, write_class_folder


def run_main(argv: list[str]) -> None:
    triplet_sampler.main(triplet_sampler.get_args_parser().parse_args(argv))


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "triplet_sampler.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def labels_of(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def check_invariants(labels, t: triplet_sampler.Triplets, num_pos: int, num_neg: int) -> None:
    """Class relations, row grouping and positive distinctness of sampled index triplets."""
    q, p, n = t.query, t.positive, t.negative
    assert (labels[q] == labels[p]).all()
    assert (labels[q] != labels[n]).all()
    assert (q != p).all()
    counts = np.bincount(labels)
    expected_queries = np.flatnonzero(counts[labels] >= 2)
    # Queries in index order, each in one consecutive block of n_pos * num_neg rows.
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    np.testing.assert_array_equal(q[starts], expected_queries)
    block = np.diff(np.r_[starts, len(q)])
    n_pos = np.minimum(num_pos, counts[labels[expected_queries]] - 1)
    np.testing.assert_array_equal(block, n_pos * num_neg)
    for s, b, k in zip(starts, block, n_pos):
        pos = p[s:s + b].reshape(k, num_neg)
        assert (pos == pos[:, :1]).all()          # each positive's num_neg rows consecutive
        assert len(np.unique(pos[:, 0])) == k     # positives of a query distinct


@pytest.mark.parametrize("num_pos,num_neg", [(1, 1), (2, 2), (3, 1), (6, 3)])
def test_sample_triplets_invariants(num_pos, num_neg):
    labels = labels_of([1, 2, 3, 7, 40, 5])
    t = triplet_sampler.sample_triplets(labels, num_pos, num_neg, np.random.default_rng(1))
    check_invariants(labels, t, num_pos, num_neg)
    # Classes of size < num_pos + 1 are reported as short.
    counts = np.bincount(labels)
    np.testing.assert_array_equal(t.short_classes, np.flatnonzero((counts >= 2) & (counts - 1 < num_pos)))
    # Single-image class 0 is never a query but does serve as a negative.
    assert 0 not in labels[t.query]


def test_sample_distinct_uniform_and_distinct():
    rng = np.random.default_rng(0)
    # Sparse rows (2k <= n) use redraw-on-collision; dense rows use random keys.
    n = np.array([10] * 20000 + [3] * 20000)
    out = triplet_sampler.sample_distinct(n, 3, rng)
    assert ((out >= 0) & (out < n[:, None])).all()
    s = np.sort(out, axis=1)
    assert (s[:, 1:] != s[:, :-1]).all()
    freq = np.bincount(out[:20000].ravel(), minlength=10) / (20000 * 3)
    assert np.abs(freq - 0.1).max() < 0.01
    short = triplet_sampler.sample_distinct(np.array([2, 1]), 4, rng)
    np.testing.assert_array_equal(np.sort(short[0, :2]), [0, 1])
    assert (short[0, 2:] == -1).all() and short[1, 0] == 0 and (short[1, 1:] == -1).all()


def test_negatives_cover_all_other_classes():
    labels = labels_of([5, 5, 5, 5])
    t = triplet_sampler.sample_triplets(labels, 1, 50, np.random.default_rng(3))
    for c in range(4):
        negs = t.negative[labels[t.query] == c]
        assert set(np.unique(negs)) == set(np.flatnonzero(labels != c))


def test_cli_tiny_imagenet_2x2_relative_paths(tiny_imagenet, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "triplets.csv"
    run_main(["--data-dir", str(tiny_imagenet), "--training", "1", "--num_pos_images", "2",
              "--num_neg_images", "2", "--output", str(out)])
    assert "wrote 96 triplets (24 queries)" in capsys.readouterr().out
    text = out.read_text()
    assert text.startswith("query,positive,negative\n")
    assert "../" in text.splitlines()[1]            # relative to the CSV's own folder
    q, p, n = image_data.read_triplet_csv(out)
    assert len(q) == 3 * 8 * 2 * 2
    assert all(Path(x).is_file() for x in np.concatenate([q, p, n]))
    lab = np.array([image_data.label_from_path(x) for x in np.concatenate([q, p, n])]).reshape(3, -1)
    assert (lab[0] == lab[1]).all() and (lab[0] != lab[2]).all()
    listing = image_data.list_class_folder(tiny_imagenet / "train")
    idx = {path: i for i, path in enumerate(listing.paths)}
    t = triplet_sampler.Triplets(*(np.array([idx[x] for x in col]) for col in (q, p, n)),
                                 short_classes=np.array([], dtype=np.int64))
    check_invariants(listing.labels, t, 2, 2)


def test_cli_val_split(tiny_imagenet, tmp_path):
    out = tmp_path / "val.csv"
    run_main(["--data-dir", str(tiny_imagenet), "--training", "0", "--output", str(out)])
    q, p, n = image_data.read_triplet_csv(out)
    assert len(q) == 9 and all("/val/" in x for x in q)


def test_same_seed_identical_different_seed_differs(tiny_imagenet, tmp_path):
    outs = {}
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        outs[name] = tmp_path / f"{name}.csv"
        run_main(["--data-dir", str(tiny_imagenet), "--num_pos_images", "2", "--num_neg_images", "2",
                  "--seed", str(seed), "--output", str(outs[name])])
    assert outs["a"].read_bytes() == outs["b"].read_bytes()
    assert outs["a"].read_bytes() != outs["c"].read_bytes()


def test_class_folder_mixed_case_and_small_classes(tmp_path, capsys):
    root = tmp_path / "photos"
    exts = [".jpg", ".JPG", ".Png", ".JPEG", ".jpeg"]
    for c, count in [("cats", 5), ("dogs", 3), ("lonely", 1)]:
        (root / c).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / c / f"{c}{i}{exts[i]}",
                                                     format="PNG" if exts[i] == ".Png" else "JPEG")
    (root / "cats" / "notes.txt").write_text("not an image")
    out = tmp_path / "t.csv"
    run_main(["--data-dir", str(root), "--num_pos_images", "3", "--output", str(out)])
    err = capsys.readouterr().err
    assert "warning: skipped 1 class(es) with fewer than 2 images" in err and "lonely (1)" in err
    # dogs (3 images) can give only 2 positives: one message for the short class.
    assert err.count("--num_pos_images 3 is more than 1 class(es)") == 1 and "dogs" in err
    q, p, n = image_data.read_triplet_csv(out)
    assert len(q) == 5 * 3 + 3 * 2                  # cats: 3 positives each, dogs: all 2 others
    assert not any("lonely" in x for x in q) and not any("lonely" in x for x in p)
    assert any(x.endswith(".Png") for x in np.concatenate([q, p]))
    assert any(x.endswith(".JPG") for x in np.concatenate([q, p]))
    assert not any(x.endswith(".txt") for x in np.concatenate([q, p, n]))


def test_val_fraction_heldout(class_folder, tmp_path):
    out = tmp_path / "train.csv"
    run_main(["--data-dir", str(class_folder), "--val-fraction", "0.34", "--output", str(out)])
    q, p, n = image_data.read_triplet_csv(out)
    hq, hp, hn = image_data.read_triplet_csv(tmp_path / "train_heldout.csv")
    paths = image_data.list_class_folder(class_folder).paths
    # image_data.heldout_images' rule: the images whose SHA-1 of "<class>/<file>" is below 0.34, 3 per class here
    assert set(hq) == {x for x, h in zip(paths, image_data.heldout_images(paths, 0.34)) if h}
    held_per_class = np.unique([image_data.label_from_path(x) for x in hq], return_counts=True)[1]
    assert held_per_class.tolist() == [3, 3, 3]
    assert not set(hq) & set(np.concatenate([q, p, n]))
    for cols in [(q, p, n), (hq, hp, hn)]:
        lab = [np.array([image_data.label_from_path(x) for x in c]) for c in cols]
        assert (lab[0] == lab[1]).all() and (lab[0] != lab[2]).all()
        assert not (cols[0] == cols[1]).any()


def test_val_fraction_pair_is_written_all_or_none(class_folder, tmp_path):
    """A path no CSV can hold among the held-out images only: the main CSV was already rewritten
    when the held-out one failed, so the pair no longer matched."""
    out = tmp_path / "train.csv"
    argv = ["--data-dir", str(class_folder), "--val-fraction", "0.34", "--output", str(out), "--seed", "3"]
    run_main(argv)
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in tmp_path.glob("*.csv")}  # a rewrite: new inode
    held = image_data.read_triplet_csv(tmp_path / "train_heldout.csv")[0]
    assert not set(held) & set(np.concatenate(image_data.read_triplet_csv(out)))
    paths = image_data.list_class_folder(class_folder).paths

    def renamed(x: str) -> str:
        return str(Path(x).with_name(f"{Path(x).stem},{Path(x).suffix}"))

    # a held-out image that its new name leaves held out (the rule hashes the file name)
    victim = Path(next(x for x in sorted(set(held))
                       if image_data.heldout_images([renamed(x) if p == x else p for p in paths], 0.34)[
                           paths.index(x)]))
    victim.rename(renamed(str(victim)))
    with pytest.raises(UserError, match="commas, quotes or newlines"):
        run_main(argv + ["--force"])
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in tmp_path.glob("*.csv")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "photos"])  # no temporary left


def test_val_fraction_of_classes_too_small_writes_nothing(tmp_path):
    """Every class keeps 2 images (a query and a positive): classes of 2 give none, whatever the fraction."""
    pairs = write_class_folder(tmp_path / "pairs", n_classes=3, per_class=2)
    out = tmp_path / "train.csv"
    with pytest.raises(UserError, match="holds out no image .every class keeps at least 2 images"):
        run_main(["--data-dir", str(pairs), "--val-fraction", "0.9", "--output", str(out)])
    assert not out.exists() and not (tmp_path / "train_heldout.csv").exists()


def test_a_tiny_val_fraction_still_holds_out_one_image_per_class(class_folder, tmp_path):
    out = tmp_path / "train.csv"
    run_main(["--data-dir", str(class_folder), "--val-fraction", "0.01", "--output", str(out)])
    held = image_data.read_triplet_csv(tmp_path / "train_heldout.csv")[0]
    assert sorted(image_data.label_from_path(x) for x in set(held)) == ["class00", "class01", "class02"]


def test_single_class_and_singleton_classes_rejected(tmp_path):
    one = write_class_folder(tmp_path / "one", n_classes=1, per_class=4)
    with pytest.raises(UserError, match="at least 2 classes"):
        run_main(["--data-dir", str(one), "--output", str(tmp_path / "a.csv")])
    singles = write_class_folder(tmp_path / "singles", n_classes=3, per_class=1)
    with pytest.raises(UserError, match="single image"):
        run_main(["--data-dir", str(singles), "--output", str(tmp_path / "b.csv")])
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()


@pytest.mark.parametrize("argv,message", [
    (["--data-dir", "no-such-dir"], "dataset folder not found"),
    (["--training", "2"], "invalid choice"),
    (["--num_pos_images", "0"], "expected a positive integer"),
    (["--num_neg_images", "x"], "expected a positive integer"),
    (["--training", "0"], "no 'val' folder"),
    (["--seed", "-1"], "expected a seed (an integer in [0, 4294967295]), got -1"),
])
def test_bad_inputs_exit_2(class_folder, tmp_path, argv, message):
    argv = ["--data-dir", str(class_folder), "--output", "t.csv", *argv]
    res = run_cli(argv, tmp_path)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert "error:" in last and message in last and "Traceback" not in res.stderr
    assert not (tmp_path / "t.csv").exists()


def test_existing_output_left_untouched(class_folder, tmp_path):
    out = tmp_path / "t.csv"
    out.write_text("precious\n")
    res = run_cli(["--data-dir", str(class_folder), "--output", str(out)], tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("error: output CSV already exists") and "--force" in res.stderr
    assert out.read_text() == "precious\n"
    res = run_cli(["--data-dir", str(class_folder), "--output", str(out), "--force"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert out.read_text().startswith("query,positive,negative\n")


def test_a_csv_too_big_for_memory_is_refused_before_work(tmp_path, capsys, monkeypatch):
    import triplet_sampler

    from deepranking import cli
    from conftest import write_tiny_imagenet

    data = write_tiny_imagenet(tmp_path / "tin", n_classes=2, train_per_class=4, val_per_class=1)
    monkeypatch.setattr(triplet_sampler, "available_memory", lambda: 10 * 2**20)  # 10 MiB free
    out = tmp_path / "t.csv"
    with pytest.raises(SystemExit) as exc:
        cli.run(triplet_sampler.main, triplet_sampler.get_args_parser(),
                ["--data-dir", str(data), "--num_pos_images", "3", "--num_neg_images", "100000", "--output", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "makes 2,400,000 triplet rows" in err and "use smaller numbers" in err
    assert not out.exists()

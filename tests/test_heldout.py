"""One held-out split (--val-fraction) for every program: image_data.heldout_images.

The rule: an image is held out when the first 8 bytes of SHA-1("<class>/<file name>"),
read as a fraction of 2**64, fall below the fraction; each class keeps 2 images and, with a
fraction > 0, gives at least 1 when it has more. triplet_sampler.py, train_net.py and
import_triplets.py must hold out the same images for the same data, whatever the seed,
the data folder's place or the spelling (relative / absolute) of the paths.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

import import_triplets
import triplet_sampler
from deepranking import image_data
from conftest import write_class_folder

# Hand-made paths; the SHA-1 fractions of their keys (worked out once, and again in the test):
#   cat/a.jpg 0.182  cat/b.jpg 0.978  cat/c.jpg 0.460  cat/d.jpg 0.101  cat/e.jpg 0.545
#   dog/f.jpg 0.028  dog/g.jpg 0.387  dog/h.jpg 0.172  (dog's images lie in dog/images/)
#   bird/i.jpg 0.286  bird/j.jpg 0.855
PATHS = ["/r/cat/a.jpg", "/r/cat/b.jpg", "/r/cat/c.jpg", "/r/cat/d.jpg", "/r/cat/e.jpg", "/r/dog/images/f.jpg",
         "/r/dog/images/g.jpg", "/r/dog/images/h.jpg", "/r/bird/i.jpg", "/r/bird/j.jpg"]


def fraction_of(key: str) -> float:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def held(paths, fraction) -> set[str]:
    return {str(p) for p, h in zip(paths, image_data.heldout_images(paths, fraction)) if h}


def test_keys_name_the_class_and_the_file_only():
    assert [image_data.image_key(p) for p in PATHS[3:6]] == ["cat/d.jpg", "cat/e.jpg", "dog/f.jpg"]
    assert fraction_of("cat/d.jpg") == pytest.approx(0.101, abs=1e-3)
    assert image_data.image_key("/elsewhere/data/cat/d.jpg") == "cat/d.jpg"


@pytest.mark.parametrize("fraction, expected", [
    # cat: a and d fall below 0.3; dog: f and h do, but a class of 3 keeps 2: f alone (the lowest); bird
    # (2 images) gives none
    (0.3, [1, 0, 0, 1, 0, 1, 0, 0, 0, 0]),
    # cat: a, c, d below 0.5 (3 = 5 - 2, the most it gives)
    (0.5, [1, 0, 1, 1, 0, 1, 0, 0, 0, 0]),
    # cat: all but b below 0.9, more than 3: the 3 lowest (d, a, c)
    (0.9, [1, 0, 1, 1, 0, 1, 0, 0, 0, 0]),
    # cat: none below 0.05, yet a class of 3+ gives 1: its lowest, d; dog: f (0.028)
    (0.05, [0, 0, 0, 1, 0, 1, 0, 0, 0, 0]),
    (0.0, [0] * 10),
])
def test_hand_made_keys(fraction, expected):
    assert image_data.heldout_images(PATHS, fraction).astype(int).tolist() == expected
    for path, h in zip(PATHS, expected):  # every held image is below the fraction, or its class's lowest
        key = image_data.image_key(path)
        if h and fraction_of(key) >= fraction:
            same_class = [image_data.image_key(p) for p in PATHS if image_data.label_from_path(p) ==
                          image_data.label_from_path(path)]
            assert fraction_of(key) == min(map(fraction_of, same_class))


def test_relative_and_absolute_spellings_agree(tmp_path, monkeypatch):
    photos = write_class_folder(tmp_path / "photos", n_classes=2, per_class=8)
    absolute = image_data.list_class_folder(photos).paths
    monkeypatch.chdir(photos / "class01")
    relative = [str(p).replace(str(photos / "class01") + "/", "") if "class01" in p else p for p in absolute]
    assert any(not r.startswith("/") for r in relative)
    np.testing.assert_array_equal(image_data.heldout_images(relative, 0.3), image_data.heldout_images(absolute, 0.3))


def sampler(data, out, *flags):
    triplet_sampler.main(triplet_sampler.get_args_parser().parse_args(
        ["--data-dir", str(data), "--output", str(out), "--force", *map(str, flags)]))


def names(paths) -> set[str]:
    return {image_data.image_key(p) for p in paths}


def test_triplet_sampler_and_train_net_hold_out_the_same_images(tmp_path):
    photos = write_class_folder(tmp_path / "one" / "photos", n_classes=3, per_class=10)
    paths = image_data.list_class_folder(photos).paths
    expected = held(paths, 0.3)
    assert expected and len(expected) < 18

    # triplet_sampler.py --val-fraction: the held-out CSV's queries, whatever the seed
    for seed in (0, 7):
        sampler(photos, tmp_path / f"s{seed}.csv", "--val-fraction", 0.3, "--seed", seed)
        assert set(image_data.read_triplet_csv(tmp_path / f"s{seed}_heldout.csv")[0]) == expected

    # train_net.py --val-fraction on the sampler's CSV of every image (relative paths in it)
    sampler(photos, tmp_path / "full.csv", "--num_pos_images", 2)
    data = image_data.load_triplet_data(tmp_path / "full.csv", None, 0.3)
    assert set(data.paths[data.val[:, 0]]) == expected
    assert not expected & set(data.paths[data.train.ravel()])

    # the same CSV with absolute paths, read from another folder
    q, p, n = image_data.read_triplet_csv(tmp_path / "full.csv")
    (tmp_path / "elsewhere").mkdir()
    absolute = tmp_path / "elsewhere" / "abs.csv"
    absolute.write_text("query,positive,negative\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(q, p, n)))
    data_abs = image_data.load_triplet_data(absolute, None, 0.3)
    assert set(data_abs.paths[data_abs.val[:, 0]]) == expected

    # the same classes and files in another data folder: the same names held out
    moved = shutil.copytree(photos, tmp_path / "two" / "pictures")
    sampler(moved, tmp_path / "moved.csv", "--val-fraction", 0.3, "--seed", 3)
    assert names(image_data.read_triplet_csv(tmp_path / "moved_heldout.csv")[0]) == names(expected)


def test_import_triplets_and_train_net_hold_out_the_same_images(tmp_path):
    photos = image_data.list_class_folder(write_class_folder(tmp_path / "photos", n_classes=4, per_class=4)).paths
    # 12 query images, positives and negatives from 4 others (as in the Deep Ranking paper's list);
    # local files: import_triplets copies them to DATA/images/<sha1[:16]>.jpg
    listed = tmp_path / "list.csv"
    listed.write_text("query,positive,negative\n" + "".join(
        f"{q},{photos[12 + i % 4]},{photos[12 + (i + 1) % 4]}\n" for i, q in enumerate(photos[:12])))

    def run_import(out, *flags):
        import_triplets.main(import_triplets.get_args_parser().parse_args(
            [str(listed), "--output-dir", str(out), "--allow-local-files", "--no-progress", *map(str, flags)]))

    run_import(tmp_path / "a" / "data", "--val-fraction", 0.3, "--seed", 5)
    imported_val = image_data.read_triplet_csv(tmp_path / "a" / "data" / "triplets_val.csv")[0]
    run_import(tmp_path / "b" / "data")  # no split: train_net.py --val-fraction splits it
    data = image_data.load_triplet_data(tmp_path / "b" / "data" / "triplets.csv", None, 0.3)
    assert names(imported_val) and names(data.paths[data.val[:, 0]]) == names(imported_val)
    # all 12 query images are one class for the rule ("data"): about 0.3 of them, at least 1, at most 10
    assert {image_data.image_key(x).split("/")[0] for x in imported_val} == {"data"}
    queries = sorted(set(image_data.read_triplet_csv(tmp_path / "b" / "data" / "triplets.csv")[0]))
    assert set(imported_val) == {x.replace("/b/data/", "/a/data/") for x in held(queries, 0.3)}

"""make_sample_data.py: the bundled Fashion-MNIST sample and the TinyImageNet layout it writes."""

from __future__ import annotations

import collections
import gzip
import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepranking import image_data
import make_sample_data as msd
from deepranking.cli import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "make_sample_data.py"
HAVE_DEBIAN = all(
    (msd.DEBIAN_DIR / f"{stem}.gz").is_file() for pair in msd.IDX_FILES.values() for stem in pair
)
needs_debian = pytest.mark.skipif(not HAVE_DEBIAN, reason="Debian package dataset-fashion-mnist not installed")
EXPECTED_WNIDS = [
    "fm0_tshirt_top", "fm1_trouser", "fm2_pullover", "fm3_dress", "fm4_coat",
    "fm5_sandal", "fm6_shirt", "fm7_sneaker", "fm8_bag", "fm9_ankle_boot",
]


def run_main(*argv: str) -> None:
    msd.main(msd.get_args_parser().parse_args([*argv, "--no-progress"]))


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv, "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def as_grey28(path: Path) -> np.ndarray:
    """Decode a written JPEG back to float [28, 28] grey for comparison with the source."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((28, 28), Image.BICUBIC), dtype=np.float32)


@pytest.fixture(scope="module")
def bundle() -> dict:
    return msd.load_bundle()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """The full bundle written with the defaults (read-only for the tests)."""
    root = tmp_path_factory.mktemp("fm") / "fashion-tin"
    run_main("--output", str(root))
    return root


def test_bundle_shapes_labels_and_balance(bundle):
    assert msd.BUNDLE_PATH.stat().st_size < 600_000
    assert bundle["class_names"] == list(msd.FASHION_MNIST_CLASSES)
    for split, per_class in (("train", 60), ("val", 15)):
        images, labels = bundle[f"{split}_images"], bundle[f"{split}_labels"]
        assert images.shape == (10 * per_class, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (10 * per_class,) and labels.dtype == np.uint8
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        # Real, distinct pictures: dark background, bright object, no duplicates.
        assert len(np.unique(images.reshape(len(images), -1), axis=0)) == len(images)
        assert images[:, 0, 0].mean() < 20 and images.max() > 200
    flat = lambda a: {x.tobytes() for x in a}  # noqa: E731
    assert not flat(bundle["train_images"]) & flat(bundle["val_images"])


def test_layout_is_tiny_imagenet(written):
    assert {p.name for p in written.iterdir()} == {"wnids.txt", "words.txt", "train", "val"}
    wnids = (written / "wnids.txt").read_text().splitlines()
    assert wnids == EXPECTED_WNIDS == sorted(wnids)
    words = [line.split("\t") for line in (written / "words.txt").read_text().splitlines()]
    assert words == [[w, n] for w, n in zip(EXPECTED_WNIDS, msd.FASHION_MNIST_CLASSES)]
    assert sorted(p.name for p in (written / "train").iterdir()) == wnids
    jpegs = []
    for wnid in wnids:
        class_dir = written / "train" / wnid
        assert {p.name for p in class_dir.iterdir()} == {"images", f"{wnid}_boxes.txt"}
        names = {p.name for p in (class_dir / "images").iterdir()}
        assert names == {f"{wnid}_{i}.JPEG" for i in range(60)}
        boxes = [line.split("\t") for line in (class_dir / f"{wnid}_boxes.txt").read_text().splitlines()]
        assert sorted(b[0] for b in boxes) == sorted(names)
        assert all(b[1:] == ["0", "0", "63", "63"] for b in boxes)
        jpegs += [class_dir / "images" / n for n in names]
    assert {p.name for p in (written / "val").iterdir()} == {"images", "val_annotations.txt"}
    rows = [line.split("\t") for line in (written / "val" / "val_annotations.txt").read_text().splitlines()]
    assert [r[0] for r in rows] == [f"val_{i}.JPEG" for i in range(150)]
    assert {p.name for p in (written / "val" / "images").iterdir()} == {r[0] for r in rows}
    assert all(len(r) == 6 and r[2:] == ["0", "0", "63", "63"] for r in rows)
    assert collections.Counter(r[1] for r in rows) == {w: 15 for w in wnids}
    # Classes are interleaved in val, as in the real split (not 15 coats in a row).
    assert [r[1] for r in rows] != sorted(r[1] for r in rows)
    jpegs += [written / "val" / "images" / r[0] for r in rows]
    for path in jpegs:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))


def test_layout_works_with_image_data(written):
    train = image_data.list_class_folder(written / "train")
    assert train.class_names == EXPECTED_WNIDS and len(train) == 600
    with pytest.raises(UserError, match="transform_validation"):
        image_data.resolve_split_dir(written, "val")


def test_images_and_labels_match_the_source(written, bundle):
    # Train: <wnid>_<i> is the i-th image of that class in the bundle.
    for c, wnid in enumerate(EXPECTED_WNIDS):
        source = bundle["train_images"][bundle["train_labels"] == c].astype(np.float32)
        for i in (0, 59):
            got = as_grey28(written / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
            errors = np.abs(source - got).mean(axis=(1, 2))
            # The right source image is by far the closest (JPEG + two resizes cost ~10 grey levels).
            assert errors[i] < 16 and errors.argmin() == i
    # Val: the nearest bundle image of every val JPEG carries the annotated class.
    val = bundle["val_images"].astype(np.float32)
    rows = [line.split("\t") for line in (written / "val" / "val_annotations.txt").read_text().splitlines()]
    for name, wnid, *_ in rows:
        got = as_grey28(written / "val" / "images" / name)
        errors = np.abs(val - got).mean(axis=(1, 2))
        assert errors.min() < 32  # small detailed val images lose more to the resizes; the class check below is the point
        assert EXPECTED_WNIDS[bundle["val_labels"][errors.argmin()]] == wnid


def test_same_seed_identical_files_other_seed_differs(tmp_path):
    common = ("--train-per-class", "5", "--val-per-class", "3", "--size", "32")
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run_main("--output", str(tmp_path / name), "--seed", seed, *common)
    a, b, c = (tree_digest(tmp_path / n) for n in "abc")
    assert a == b and len(a) == 2 + 10 * 6 + 1 + 30  # wnids, words, 10 x (boxes + 5), annotations, 30 val
    assert a.keys() == c.keys() and a != c
    with Image.open(tmp_path / "a" / "val" / "images" / "val_0.JPEG") as im:
        assert im.size == (32, 32)
    assert (tmp_path / "a" / "train" / "fm3_dress" / "fm3_dress_boxes.txt").read_text().split("\n")[0] \
        == "fm3_dress_0.JPEG\t0\t0\t31\t31"


def test_refuses_existing_output_and_keeps_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("--output", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.stderr
    # --force only replaces a dataset folder, never an unrelated one.
    result = run_cli("--output", str(out), "--force")
    assert result.returncode == 2 and "refusing to replace" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_replaces_a_previous_dataset(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    run_main("--output", str(out), "--train-per-class", "2", "--val-per-class", "1", "--size", "16")
    (out / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="already exists"):
        run_main("--output", str(out), "--train-per-class", "3", "--val-per-class", "1", "--size", "16")
    run_main("--output", str(out), "--train-per-class", "3", "--val-per-class", "1", "--size", "16", "--force")
    assert not (out / "stale.txt").exists()
    assert len(list((out / "train" / "fm0_tshirt_top" / "images").iterdir())) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_missing_debian_files_give_install_hint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("--output", str(tmp_path / "out"), "--source", str(empty))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "apt-get install -y dataset-fashion-mnist" in result.stderr
    assert "train-images-idx3-ubyte.gz" in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="does not exist.*apt-get install"):
        msd.load_fashion_mnist_idx(tmp_path / "nowhere")


def test_more_images_than_available(tmp_path):
    for flag, n, have in (("--train-per-class", "61", 60), ("--val-per-class", "16", 15)):
        with pytest.raises(UserError, match=f"requested {n} .* only {have}"):
            run_main("--output", str(tmp_path / "out"), flag, n)
    assert not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="--output is required"):
        run_main()
    with pytest.raises(UserError, match="needs the full dataset"):
        run_main("--build-bundle", "--source", "bundled", "--output", str(tmp_path / "x.npz"))
    result = run_cli("--output", str(tmp_path / "o"), "--train-per-class", "0")
    assert result.returncode == 2 and "positive integer" in result.stderr
    result = run_cli("--output", str(tmp_path / "o"), "--tints", "1")
    assert result.returncode == 2 and "at least 2: one tint would colour every image red" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


def test_idx_folder_source_matches_bundle(tmp_path, bundle):
    """An explicit IDX folder (plain and .gz files mixed) is read like Debian's files."""
    idx = tmp_path / "idx"
    idx.mkdir()
    for split, (img_stem, lab_stem) in msd.IDX_FILES.items():
        _write_idx(idx / f"{img_stem}.gz", bundle[f"{split}_images"], compress=True)
        _write_idx(idx / lab_stem, bundle[f"{split}_labels"], compress=False)
    common = ("--train-per-class", "4", "--val-per-class", "2", "--size", "24", "--seed", "3")
    run_main("--output", str(tmp_path / "from_idx"), "--source", str(idx), *common)
    run_main("--output", str(tmp_path / "from_npz"), *common)
    assert tree_digest(tmp_path / "from_idx") == tree_digest(tmp_path / "from_npz")


def test_corrupt_idx_files_are_named(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x89PNG not an idx file")
    with pytest.raises(UserError, match="bad magic number"):
        msd.read_idx(bad)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28) + bytes(100))
    with pytest.raises(UserError, match="expected 7840"):
        msd.read_idx(short)
    not_gz = tmp_path / "x-idx1-ubyte.gz"
    not_gz.write_bytes(b"plain bytes")
    with pytest.raises(UserError, match="cannot read IDX file"):
        msd.read_idx(not_gz)


def test_write_function_for_other_callers(tmp_path):
    """The importable writer takes RGB arrays and any class names; ids stay sortable."""
    rng = np.random.default_rng(0)
    names = [f"Thing #{i}" for i in range(12)]
    # Smooth colour images (random noise is JPEG's worst case): one colour per image plus a ramp.
    ramp = np.linspace(0, 60, 16)[None, :, None]
    train = np.clip(rng.integers(0, 190, size=(24, 1, 1, 3)) + ramp, 0, 255).astype(np.uint8)
    val = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    wnids = msd.write_tiny_imagenet_layout(tmp_path / "d", train, np.arange(24) % 12, val, np.arange(12),
                                           names, size=16, seed=0, progress=False)
    assert wnids[:2] == ["fm00_thing_0", "fm01_thing_1"] and wnids == sorted(wnids)
    got = np.asarray(Image.open(tmp_path / "d" / "train" / wnids[5] / "images" / f"{wnids[5]}_1.JPEG"))
    assert got.shape == (16, 16, 3) and np.abs(got.astype(int) - train[17]).mean() < 6
    with pytest.raises(UserError, match="already exists"):
        msd.write_tiny_imagenet_layout(tmp_path / "d", train, np.arange(24) % 12, val, np.arange(12),
                                       names, size=16, seed=0, progress=False)


@needs_debian
def test_debian_subset(tmp_path):
    out = tmp_path / "debian"
    run_main("--output", str(out), "--source", "debian", "--train-per-class", "3",
             "--val-per-class", "2", "--size", "32")
    for wnid in EXPECTED_WNIDS:
        assert len(list((out / "train" / wnid / "images").iterdir())) == 3
    assert len((out / "val" / "val_annotations.txt").read_text().splitlines()) == 20
    with pytest.raises(UserError, match="only 6000"):
        run_main("--output", str(tmp_path / "o"), "--source", "debian", "--train-per-class", "6001")


@needs_debian
def test_bundle_rebuilds_byte_for_byte(tmp_path):
    """The committed bundle is exactly what the documented command produces."""
    rebuilt = tmp_path / "bundle.npz"
    run_main("--build-bundle", "--output", str(rebuilt))
    assert rebuilt.read_bytes() == msd.BUNDLE_PATH.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        run_main("--build-bundle", "--output", str(rebuilt))


def test_tinted_classes_are_colour_times_the_grey_image(bundle, tmp_path):
    """--tints T: class c*T + t is class c's images times hue t; each class draws its own images, no repeats."""
    tints, per_class = 4, 5
    data = msd.tinted_subset(bundle, tints, per_class, 3, seed=0)
    colours = msd.tint_colours(tints)
    np.testing.assert_allclose(colours[1], [0.5, 1.0, 0.0])  # hue 90 degrees: yellow-green
    assert len(data["class_names"]) == 10 * tints and data["class_names"][tints + 2] == "Trouser hue 180"
    for split, n in (("train", per_class), ("val", 3)):
        images, labels, source = data[f"{split}_images"], data[f"{split}_labels"], data[f"{split}_source_index"]
        assert images.shape[1:] == (28, 28, 3) and images.dtype == np.uint8
        assert np.bincount(labels, minlength=10 * tints).tolist() == [n] * (10 * tints)
        for label in range(10 * tints):
            rows = np.flatnonzero(labels == label)
            assert len(set(source[rows])) == n  # no grey image twice in one class
            assert (bundle[f"{split}_labels"][source[rows]] == label // tints).all()  # the right garment
            grey = bundle[f"{split}_images"][source[rows]].astype(float)  # [n, 28, 28]
            expected = np.rint(grey[..., None] * colours[label % tints])
            np.testing.assert_array_equal(images[rows], expected)
    again = msd.tinted_subset(bundle, tints, per_class, 3, seed=0)
    other = msd.tinted_subset(bundle, tints, per_class, 3, seed=1)
    assert np.array_equal(again["train_images"], data["train_images"])
    assert not np.array_equal(other["train_source_index"], data["train_source_index"])
    # Through the command line: 40 class folders with readable names.
    root = tmp_path / "tinted"
    subprocess.run([sys.executable, "make_sample_data.py", "--output", str(root), "--tints", str(tints),
                    "--train-per-class", "2", "--val-per-class", "1", "--size", "32", "--no-progress"],
                   check=True, cwd=msd.REPO_DIR, capture_output=True)
    listing = image_data.list_class_folder(root / "train")
    assert len(set(listing.labels)) == 10 * tints and len(listing.paths) == 2 * 10 * tints
    names = image_data.read_class_names(root / "words.txt")
    assert names["fm09_pullover_hue_090"] == "Pullover hue 090"

"""image_cache: decoded-image cache keyed by file list, sizes and mtimes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepranking import image_cache
from deepranking import image_data, preprocessing
from conftest import class_image, write_class_folder
from deepranking.preprocessing import UnreadableImageError


@pytest.fixture
def images(tmp_path) -> list[str]:
    root = write_class_folder(tmp_path / "imgs", n_classes=2, per_class=5, size=32, ext=".png")
    return image_data.list_class_folder(root).paths


def direct(path: str, size: int) -> np.ndarray:
    im = preprocessing.load_rgb(path)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im)


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


def test_round_trip_equals_direct_decode(images, tmp_path):
    cache = tmp_path / "c"
    arr = image_cache.cache_images(images, 32, cache_dir=cache, progress=False)
    assert isinstance(arr, np.memmap)
    assert arr.shape == (len(images), 32, 32, 3) and arr.dtype == np.uint8
    assert not arr.flags.writeable
    for i, p in enumerate(images):
        np.testing.assert_array_equal(arr[i], direct(p, 32))
    # PNG is lossless: the cached pixels are exactly the generated ones.
    np.testing.assert_array_equal(arr[0], class_image(0, 0, 32))
    names = cache_files(cache)
    assert len(names) == 2 and {Path(n).suffix for n in names} == {".u8", ".json"}


def test_second_call_hits_cache(images, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    first = np.array(image_cache.cache_images(images, 32, cache_dir=cache, progress=False))

    def boom(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(preprocessing, "load_rgb", boom)
    second = image_cache.cache_images(images, 32, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(second, first)
    # A different size is a different entry (and so decodes).
    with pytest.raises(AssertionError, match="decoded"):
        image_cache.cache_images(images, 16, cache_dir=cache, progress=False)


def test_env_var_selects_cache_dir(images, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEP_RANK_CACHE_DIR", str(tmp_path / "from-env"))
    image_cache.cache_images(images[:3], 32, progress=False)
    assert len(cache_files(tmp_path / "from-env")) == 2


def test_modified_file_changes_key(images, tmp_path):
    cache = tmp_path / "c"
    arr = image_cache.cache_images(images, 32, cache_dir=cache, progress=False)
    key_before, _ = image_cache.cache_key(images, 32)
    # Same byte size, new content and mtime: must not be served from the old entry.
    Image.fromarray(255 - class_image(0, 0, 32)).save(images[0])
    st = os.stat(images[0])
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    key_after, _ = image_cache.cache_key(images, 32)
    assert key_after != key_before
    new = image_cache.cache_images(images, 32, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(new[0], 255 - class_image(0, 0, 32))
    np.testing.assert_array_equal(new[1:], arr[1:])
    # A different file list (order) is also a different key.
    assert image_cache.cache_key(images[::-1], 32)[0] != key_after
    # An added (or removed) file too.
    assert image_cache.cache_key(images[:-1], 32)[0] != key_after


def test_incomplete_entry_is_rebuilt(images, tmp_path):
    cache = tmp_path / "c"
    image_cache.cache_images(images, 32, cache_dir=cache, progress=False)
    key, _ = image_cache.cache_key(images, 32)
    (cache / f"{key}.json").unlink()            # as after a crash before the header
    (cache / f"{key}.u8").write_bytes(b"junk")
    arr = image_cache.cache_images(images, 32, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(arr[2], direct(images[2], 32))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16"])
def test_other_modes_come_out_rgb(tmp_path, mode):
    rgb = Image.fromarray(class_image(1, 0, 20))
    if mode == "P":
        im = rgb.convert("P", palette=Image.ADAPTIVE)
    elif mode == "I;16":
        im = rgb.convert("L").convert("I;16")
    else:
        im = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path)
    arr = image_cache.cache_images([str(path)], 20, cache_dir=tmp_path / "c", progress=False)
    assert arr.shape == (1, 20, 20, 3)
    if mode in ("L", "LA"):
        # Grey replicated into three equal channels.
        assert (arr[0, ..., 0] == arr[0, ..., 1]).all() and (arr[0, ..., 1] == arr[0, ..., 2]).all()
        np.testing.assert_array_equal(arr[0, ..., 0], np.asarray(rgb.convert("L")))
    elif mode == "RGBA":
        np.testing.assert_array_equal(arr[0], np.asarray(rgb))


def test_corrupt_and_missing_files_named(images, tmp_path):
    corrupt = Path(images[3])
    corrupt.write_bytes(corrupt.read_bytes()[:40])       # truncated PNG
    missing = str(Path(images[0]).with_name("gone.png"))
    paths = images + [missing]
    cache = tmp_path / "c"
    with pytest.raises(UnreadableImageError) as info:
        image_cache.cache_images(paths, 32, cache_dir=cache, progress=False)
    msg = str(info.value)
    assert msg.startswith("2 of 11 images cannot be read")
    assert str(corrupt) in msg and missing in msg
    # Nothing was left in the cache: no entry, no temporary file.
    assert not cache.exists() or cache_files(cache) == []


def test_error_lists_at_most_ten(tmp_path):
    paths = [str(tmp_path / f"missing{i:02d}.jpg") for i in range(13)]
    with pytest.raises(UnreadableImageError) as info:
        image_cache.cache_images(paths, 8, cache_dir=tmp_path / "c", progress=False)
    msg = str(info.value)
    assert msg.startswith("13 of 13 images")
    assert "missing09.jpg" in msg and "missing10.jpg" not in msg and "and 3 more" in msg


def test_non_square_inputs_resized(tmp_path):
    arr_in = np.zeros((20, 40, 3), np.uint8)
    arr_in[:, :20] = (255, 0, 0)
    arr_in[:, 20:] = (0, 0, 255)
    wide = tmp_path / "wide.png"
    Image.fromarray(arr_in).save(wide)
    tall = tmp_path / "tall.png"
    Image.fromarray(np.full((50, 10, 3), 7, np.uint8)).save(tall)
    arr = image_cache.cache_images([str(wide), str(tall)], 16, cache_dir=tmp_path / "c",
                                   progress=False)
    assert arr.shape == (2, 16, 16, 3)
    # Stretched, not cropped: left half red, right half blue.
    assert (arr[0, :, :6] == (255, 0, 0)).all() and (arr[0, :, 10:] == (0, 0, 255)).all()
    assert (arr[1] == 7).all()
    np.testing.assert_array_equal(arr[0], direct(str(wide), 16))


def test_choose_cache_size(tmp_path):
    same = write_class_folder(tmp_path / "a", n_classes=2, per_class=3, size=24)
    paths = image_data.list_class_folder(same).paths
    assert image_cache.choose_cache_size(paths, 64) == 24      # already square and small
    assert image_cache.choose_cache_size(paths, 16) == 16      # larger than the model input
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((24, 30, 3), np.uint8)).save(odd)
    assert image_cache.choose_cache_size(paths + [str(odd)], 64) == 64   # non-square
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(other)
    assert image_cache.choose_cache_size(paths + [str(other)], 64) == 64  # mixed sizes
    assert image_cache.choose_cache_size(paths + [str(tmp_path / "nope.png")], 64) == 64
    assert image_cache.choose_cache_size([], 48) == 48


def test_empty_list(tmp_path):
    arr = image_cache.cache_images([], 8, cache_dir=tmp_path / "c", progress=False)
    assert arr.shape == (0, 8, 8, 3)


def test_a_cache_the_disk_cannot_hold_is_refused_before_decoding(tmp_path, monkeypatch):
    import collections
    import shutil

    from deepranking import cli

    root = tmp_path / "imgs"
    root.mkdir()
    files = []
    for i in range(3):
        f = root / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(f)
        files.append(str(f))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    cache = tmp_path / "cache"
    # A budget above the free space (given by hand): refused before decoding.
    with pytest.raises(cli.UserError, match=r"the image cache needs 2.3 kB in .*cache but only 100 B are free"):
        image_cache.cache_images(files, 16, cache_dir=cache, progress=False, budget=10**6)
    # The auto budget (half the free space) streams instead.
    streamed = image_cache.cache_images(files, 16, cache_dir=cache, progress=False)
    assert isinstance(streamed, image_cache.StreamedImages) and list(cache.iterdir()) == []
    monkeypatch.undo()

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(cli.UserError, match="cannot reserve .* for the image cache in .*: No space left on device"):
        image_cache.cache_images(files, 16, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []  # no partial entry, no temp file


# --- the size budget ----------------------------------------------------------------------------


def test_parse_size_and_flag():
    assert image_cache.parse_size("auto") == image_cache.parse_size(" AUTO ") == image_cache.AUTO_BUDGET
    assert [image_cache.parse_size(v) for v in ("0", "123", "300k", "1.5M", "20G", "2t", "20GB", " 7 ")] == [
        0, 123, 300_000, 1_500_000, 20 * 10**9, 2 * 10**12, 20 * 10**9, 7]
    for bad in ("", "-1", "G", "lots", "nan", "inf"):
        with pytest.raises(ValueError):
            image_cache.parse_size(bad)
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="expected a size such as 20G"):
        image_cache.cache_budget_flag("ten gigs")


def test_over_budget_streams_the_same_pixels_and_writes_nothing(images, tmp_path, capsys):
    cache = tmp_path / "c"
    streamed = image_cache.cache_images(images, 24, cache_dir=cache, progress=False, budget=1000)
    assert "needs 17.3 kB, over the image cache budget of 1 kB" in capsys.readouterr().err
    assert isinstance(streamed, image_cache.StreamedImages)
    assert streamed.shape == (len(images), 24, 24, 3) and len(streamed) == len(images)
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing written, not even a temp file
    cached = image_cache.cache_images(images, 24, cache_dir=tmp_path / "other", progress=False)
    assert isinstance(cached, np.memmap)
    np.testing.assert_array_equal(streamed[:], cached)  # slice
    np.testing.assert_array_equal(streamed[np.array([7, 0, 7])], cached[[7, 0, 7]])  # fancy index, repeats
    np.testing.assert_array_equal(streamed[3], cached[3])
    np.testing.assert_array_equal(streamed[np.int64(-1)], cached[-1])
    np.testing.assert_array_equal(streamed[np.array(2)], cached[np.array(2)])  # 0-d index
    mask = np.arange(len(images)) % 3 == 0
    np.testing.assert_array_equal(streamed[mask], cached[mask])  # a boolean mask selects, as in numpy
    np.testing.assert_array_equal(streamed[::-2], cached[::-2])
    np.testing.assert_array_equal(image_cache.subset(streamed, np.array([2, 5]))[:], cached[[2, 5]])
    np.testing.assert_array_equal(image_cache.subset(cached, np.array([2, 5])), cached[[2, 5]])
    # Budget 0 = never cache, even a tiny entry; the env var is the default budget.
    assert isinstance(image_cache.cache_images(images[:1], 8, cache_dir=cache, progress=False, budget=0),
                      image_cache.StreamedImages)


def test_budget_from_env_and_a_bad_env_value(images, tmp_path, monkeypatch):
    from deepranking import cli

    monkeypatch.setenv(image_cache.BUDGET_ENV, "1k")
    assert isinstance(image_cache.cache_images(images, 16, cache_dir=tmp_path / "c", progress=False),
                      image_cache.StreamedImages)
    monkeypatch.setenv(image_cache.BUDGET_ENV, "1G")
    assert isinstance(image_cache.cache_images(images, 16, cache_dir=tmp_path / "c", progress=False), np.memmap)
    monkeypatch.setenv(image_cache.BUDGET_ENV, "big")
    with pytest.raises(cli.UserError, match=r"\$DEEP_RANK_CACHE_BUDGET='big' is not a size"):
        image_cache.cache_images(images, 20, cache_dir=tmp_path / "c", progress=False)


def test_an_explicit_auto_budget_overrides_the_env(images, tmp_path, monkeypatch):
    # --cache-budget auto (AUTO_BUDGET) is half the free disk even when $DEEP_RANK_CACHE_BUDGET says 0;
    # no flag (None) is the env's 0.
    import train_net

    monkeypatch.setenv(image_cache.BUDGET_ENV, "0")
    auto = train_net.get_args_parser().parse_args(["--cache-budget", "auto"]).cache_budget
    unset = train_net.get_args_parser().parse_args([]).cache_budget
    assert (auto, unset) == (image_cache.AUTO_BUDGET, None)
    free = shutil.disk_usage(tmp_path).free
    assert image_cache.resolve_budget(tmp_path, auto, 0) == pytest.approx(0.5 * free, rel=0.01)
    assert image_cache.resolve_budget(tmp_path, unset, 0) == 0
    assert image_cache.resolve_budget(tmp_path, "20G", 0) == 20 * 10**9  # a caller's string is parsed too
    assert image_cache.resolve_budget(tmp_path, "AUTO", 0) == image_cache.resolve_budget(tmp_path, auto, 0)
    from deepranking import cli
    with pytest.raises(cli.UserError, match="image cache budget 'lots' is not a size"):
        image_cache.resolve_budget(tmp_path, "lots", 0)
    assert isinstance(image_cache.cache_images(images, 16, cache_dir=tmp_path / "c", progress=False,
                                               budget=unset), image_cache.StreamedImages)
    assert isinstance(image_cache.cache_images(images, 16, cache_dir=tmp_path / "c", progress=False,
                                               budget=auto), np.memmap)


def test_streaming_checks_every_header_first(images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths = images + [str(bad), str(tmp_path / "gone.png")]
    with pytest.raises(UnreadableImageError, match=r"(?s)2 of 12 images cannot be read.*bad\.png.*\n.*gone\.png"):
        image_cache.cache_images(paths, 16, cache_dir=tmp_path / "c", progress=False, budget=0)


def test_least_recently_used_entries_make_room(tmp_path, capsys):
    root = write_class_folder(tmp_path / "imgs", n_classes=1, per_class=4, size=8, ext=".png")
    paths = image_data.list_class_folder(root).paths
    cache = tmp_path / "c"
    entry = 4 * 16 * 16 * 3  # 3,072 bytes at 16 px
    assert [image_cache.format_size(v) for v in (entry, 19.7e9, 999_999, 999_999_999, 999, 0)] == [
        "3.07 kB", "19.7 GB", "1 MB", "1 GB", "999 B", "0 B"]
    a = image_cache.cache_images(paths, 16, cache_dir=cache, progress=False)
    b = image_cache.cache_images(paths[::-1], 16, cache_dir=cache, progress=False)
    del a, b
    (used_a, _, key_a), (used_b, _, key_b) = image_cache.cache_entries(cache)
    old = used_a - 2 * image_cache.EVICT_GRACE_S
    os.utime(cache / f"{key_a}.json", (old, old))
    os.utime(cache / f"{key_b}.json", (old + 1, old + 1))  # b used after a
    image_cache.cache_images(paths, 16, cache_dir=cache, progress=False)  # a hit marks a used now
    assert image_cache.cache_entries(cache)[-1][2] == key_a
    # Room for 2 entries: a third evicts the least recently used (b), keeps a.
    c = image_cache.cache_images(paths[1:] + paths[:1], 16, cache_dir=cache, progress=False, budget=2 * entry)
    assert isinstance(c, np.memmap)
    assert f"removed the least recently used entry {key_b}" in capsys.readouterr().err
    keys = [k for _, _, k in image_cache.cache_entries(cache)]
    assert len(keys) == 2 and key_a in keys and key_b not in keys
    assert not (cache / f"{key_b}.u8").exists()
    # Entries used within the grace period are never evicted: the next new one streams instead.
    capsys.readouterr()
    d = image_cache.cache_images(paths[2:] + paths[:2], 16, cache_dir=cache, progress=False, budget=2 * entry)
    assert isinstance(d, image_cache.StreamedImages)
    assert ("needs 3.07 kB, and the image cache budget of 6.14 kB has 0 B left beside the entries it could not "
            "remove (used in the last 10 minutes") in capsys.readouterr().err
    # A stage bound to fail (a file is missing) evicts nothing on its way.
    for _, _, key in image_cache.cache_entries(cache):
        os.utime(cache / f"{key}.json", (old, old))
    with pytest.raises(UnreadableImageError, match="image not found"):
        image_cache.cache_images(paths + [str(tmp_path / "gone.png")], 16, cache_dir=cache, progress=False,
                                 budget=2 * entry + 10)
    assert len(image_cache.cache_entries(cache)) == 2
    # mark_in_use refreshes an entry that a long stage keeps reading.
    mapped = image_cache.cache_images(paths, 16, cache_dir=cache, progress=False)  # entry a, opened now
    os.utime(cache / f"{key_a}.json", (old, old))  # ... and then read for a long time
    image_cache.mark_in_use(mapped)
    assert (cache / f"{key_a}.json").stat().st_mtime > old + 60
    image_cache.mark_in_use(np.zeros((1, 2, 2, 3), np.uint8))  # not a cache: nothing to do
    assert len(image_cache.cache_entries(cache)) == 2


def _first_batch(images, context):
    import torch

    from deepranking.image_data import PKImages

    loader = torch.utils.data.DataLoader(PKImages(images), sampler=[np.arange(len(images))], batch_size=None,
                                         num_workers=1, multiprocessing_context=context)
    return next(iter(loader))[0].numpy()


def test_streamed_images_decode_in_spawned_workers_and_errors_stay_one_line(images, tmp_path):
    import pickle

    streamed = image_cache.cache_images(images, 16, cache_dir=tmp_path / "c", progress=False, budget=0)
    assert len(pickle.dumps(streamed)) < 2000  # the paths, no pixels
    np.testing.assert_array_equal(_first_batch(streamed, "spawn"), streamed[:])
    assert image_cache.loader_workers(streamed, 0) >= 1
    assert image_cache.loader_workers(streamed, 12) == 12
    assert image_cache.loader_workers(np.zeros((1, 2, 2, 3), np.uint8), 0) == 0
    # A body truncated after the header check fails in the worker: the main process gets its message alone.
    data = Path(images[3]).read_bytes()
    Path(images[3]).write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError) as exc:
        _first_batch(streamed, "spawn")
    assert str(exc.value).startswith("cannot read image ") and images[3] in str(exc.value)
    assert "Traceback" not in str(exc.value)


def test_files_left_by_killed_builds_are_removed_but_not_a_live_build(images, tmp_path, capsys):
    cache = tmp_path / "c"
    cache.mkdir()
    old = time.time() - 2 * image_cache.EVICT_GRACE_S

    def plant(name: str, nbytes: int, mtime: float | None = old) -> Path:
        path = cache / name
        path.write_bytes(bytes(nbytes))
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    dead_tmp = plant(".abc.x1.tmp", 1000)  # a build that was killed: no lock on it
    live_tmp = plant(".def.x2.tmp", 2000)  # a build in progress: it holds the lock
    young_tmp = plant(".ghi.x3.tmp", 300, mtime=None)  # just created: its build may not have locked it yet
    orphan_u8 = plant("0123.u8", 4000)  # header never written
    young_u8 = plant("4567.u8", 500, mtime=None)  # its header may be on the way
    fd = os.open(live_tmp, os.O_RDONLY)
    try:
        assert image_cache._lock(fd, wait=False)
        cached = image_cache.cache_images(images, 16, cache_dir=cache, progress=False)
    finally:
        os.close(fd)
    assert isinstance(cached, np.memmap)
    err = capsys.readouterr().err
    assert "removed .abc.x1.tmp (1 kB)" in err and "removed 0123.u8 (4 kB)" in err and "did not finish" in err
    assert not dead_tmp.exists() and not orphan_u8.exists()
    assert live_tmp.exists() and young_tmp.exists() and young_u8.exists()
    entry = Path(cached.filename)
    assert entry.exists() and entry.with_suffix(".json").exists()  # the new entry itself is no orphan
    os.utime(young_u8, (old, old))  # now old; the "live" build's lock was released when its fd closed
    assert sorted(image_cache.remove_orphans(cache)) == sorted([(live_tmp, 2000), (young_u8, 500)])
    assert young_tmp.exists() and entry.exists() and entry.with_suffix(".json").exists()

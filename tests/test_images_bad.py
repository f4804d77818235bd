"""Bad images: high bit depth, decompression bombs, non-UTF-8 names, unreadable formats, empty classes.

Every case is checked in the library and through a real program (``cli.run`` in-process):
exit status 2, a single ``error:`` line, no traceback.
"""

from __future__ import annotations

import io
import shutil
import os
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import class_image, write_class_folder
from PIL import Image

from deepranking import cli, image_cache, image_data, preprocessing
from deepranking.cli import UserError
from deepranking.preprocessing import UnreadableImageError

# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Path, width: int, height: int, bit_depth: int, color_type: int, rows) -> Path:
    """A PNG written by hand: ``rows`` yields each scanline's bytes (filter byte 0 is added)."""
    z = zlib.compressobj(9)
    data = b"".join(z.compress(b"\x00" + row) for row in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data)
                           + _chunk(b"IEND", b""))
    return Path(path)


def write_png16(path: Path, samples: np.ndarray, color_type: int) -> Path:
    """16-bit PNG from uint16 samples [H, W, C] (C=3: RGB, colour type 2; C=4: RGBA, type 6)."""
    big = np.ascontiguousarray(samples, dtype=">u2")
    return write_png(path, big.shape[1], big.shape[0], 16, color_type, (r.tobytes() for r in big))


def write_tiff_rgb16(path: Path, samples: np.ndarray) -> Path:
    """Uncompressed little-endian 16-bit RGB TIFF from uint16 samples [H, W, 3]."""
    h, w, _ = samples.shape
    data = np.ascontiguousarray(samples, dtype="<u2").tobytes()
    n = 10
    bps_at = 8 + 2 + 12 * n + 4
    data_at = bps_at + 6
    short = lambda tag, v: struct.pack("<HHIHH", tag, 3, 1, v, 0)
    long_ = lambda tag, v, count=1, typ=4: struct.pack("<HHII", tag, typ, count, v)
    ifd = [short(256, w), short(257, h), long_(258, bps_at, 3, 3), short(259, 1), short(262, 2),
           long_(273, data_at), short(277, 3), short(278, h), long_(279, len(data)), short(284, 1)]
    Path(path).write_bytes(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", n) + b"".join(ifd)
                           + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data)
    return Path(path)


def rgb_of(path) -> np.ndarray:
    return np.asarray(preprocessing.load_rgb(path))


def run_program(module, argv: list[str], stderr=None) -> tuple[int, str, str]:
    """``cli.run(module.main, ...)`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), stderr or io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        cli.run(module.main, module.get_args_parser(), argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.stdout, sys.stderr = saved
    if isinstance(err, io.TextIOWrapper):
        err.flush()
        text = err.buffer.getvalue().decode("ascii")
    else:
        text = err.getvalue()
    return code, out.getvalue(), text


def assert_one_error(code: int, err: str) -> str:
    assert code == cli.EXIT_USER_ERROR, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def sampler(data_dir: Path, out: Path, stderr=None) -> tuple[int, str, str]:
    import triplet_sampler

    return run_program(triplet_sampler, ["--data-dir", str(data_dir), "--output", str(out)], stderr)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained resnet18 checkpoint at 32 px (enough for gen_embeddings to decode and embed)."""
    import torch

    import deep_rank_net as drn
    from deepranking.checkpoint import model_record, write_checkpoint

    torch.manual_seed(0)
    model = drn.DeepRankNet(arch="resnet18", embedding_dim=8, weights="none")
    spec = preprocessing.Preprocessing(image_size=32, cache_size=32)
    path = tmp_path_factory.mktemp("ckpt") / "net.model"
    write_checkpoint(path, {**model_record(model, spec), "epoch": 0, "step": 0, "args": {}})
    return path


def embed(checkpoint: Path, data_dir: Path, out: Path, tmp_path: Path) -> tuple[int, str, str]:
    import gen_embeddings

    return run_program(gen_embeddings, ["--model", str(checkpoint), "--data-dir", str(data_dir),
                                        "--splits", "train", "--train-output", str(out), "--device", "cpu",
                                        "--no-progress", "--cache-dir", str(tmp_path / "cache")])


# ----------------------------------------------------------------------------
# 1. High bit depth: scaled to 8 bits, never clipped
# ----------------------------------------------------------------------------


def test_16bit_grey_png_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 32768, 65535, 256, 255]], dtype=np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"  # what Pillow gives for a 16-bit grey PNG
    rgb = rgb_of(path)
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255, 1, 0])
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()  # grey stays grey


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_integer_modes_take_the_high_byte(mode):
    values = np.array([[0, 32768, 65535, 511]])
    if mode == "I":
        im = Image.fromarray(values.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        im = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
    assert im.mode == mode
    rgb = np.asarray(preprocessing._to_rgb(im))
    np.testing.assert_array_equal(rgb[0], [[0] * 3, [128] * 3, [255] * 3, [1] * 3])


def test_mode_i_out_of_range_and_float_mode():
    im = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(preprocessing._to_rgb(im))[0, :, 0], [0, 255])
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32))
    assert im.mode == "F"
    np.testing.assert_array_equal(np.asarray(preprocessing._to_rgb(im))[0, :, 0], [0, 128, 255, 255, 0, 0])


def test_16bit_pgm_and_float_tiff_files(tmp_path):
    pgm = tmp_path / "g16.pgm"
    pgm.write_bytes(b"P5\n3 1\n65535\n" + np.array([0, 32768, 65535], dtype=">u2").tobytes())
    np.testing.assert_array_equal(rgb_of(pgm)[0, :, 0], [0, 128, 255])
    tif = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tif)
    np.testing.assert_array_equal(rgb_of(tif)[0, :, 0], [0, 128, 255])


def test_16bit_rgb_rgba_png_and_tiff(tmp_path):
    samples = np.array([[[0, 32768, 65535], [65535, 256, 511]]], dtype=np.uint16)
    want = np.array([[[0, 128, 255], [255, 1, 1]]], dtype=np.uint8)
    np.testing.assert_array_equal(rgb_of(write_png16(tmp_path / "rgb16.png", samples, 2)), want)
    np.testing.assert_array_equal(rgb_of(write_tiff_rgb16(tmp_path / "rgb16.tif", samples)), want)
    alpha = np.full((1, 2, 1), 65535, dtype=np.uint16)
    rgba = write_png16(tmp_path / "rgba16.png", np.concatenate([samples, alpha], axis=2), 6)
    np.testing.assert_array_equal(rgb_of(rgba), want)


def test_16bit_images_through_the_cache(tmp_path):
    grey = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    g16 = tmp_path / "g16.png"
    Image.fromarray(grey).save(g16)
    arr = image_cache.cache_images([str(g16)], 8, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(arr[0, ..., 0], (grey >> 8).astype(np.uint8))


def test_16bit_image_through_gen_embeddings(tmp_path, checkpoint):
    """A 16-bit grey PNG embeds exactly like its 8-bit twin (it used to turn white)."""
    grey8 = class_image(1, 0, 32)[..., 0]
    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(data / "a" / "deep.png")
    Image.fromarray(grey8).save(data / "a" / "flat.png")
    Image.fromarray(class_image(2, 0, 32)).save(data / "b" / "other.png")
    out = tmp_path / "emb.npz"
    code, _, err = embed(checkpoint, data, out, tmp_path)
    assert code == 0, err
    from deepranking.embedding_io import read_embeddings

    emb = read_embeddings(out, progress=False)
    rows = {Path(p).name: e for p, e in zip(emb.paths, emb.emb)}
    np.testing.assert_array_equal(rows["deep.png"], rows["flat.png"])
    assert not np.array_equal(rows["deep.png"], rows["other.png"])


# ----------------------------------------------------------------------------
# 1b. EXIF orientation: photos decode upright, as a viewer shows them
# ----------------------------------------------------------------------------


def _tagged(path: Path, pixels: np.ndarray, orientation) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillows_transpose(tmp_path, orientation):
    from PIL import ImageOps
    pixels = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3) * 5  # no symmetry: every fix differs
    path = _tagged(tmp_path / "o.png", pixels, orientation)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = rgb_of(path)
    np.testing.assert_array_equal(got, want)
    assert got.shape == ((5, 3, 3) if orientation <= 4 else (3, 5, 3))  # 5-8 swap width and height


def test_exif_rotated_photo_through_the_cache(tmp_path):
    """A phone photo stored sideways (orientation 6: turn 90 degrees clockwise) is cached upright."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white: upright, it is the top half
    path = _tagged(tmp_path / "phone.jpg", pixels, 6)
    arr = image_cache.cache_images([str(path)], 20, cache_dir=tmp_path / "c", progress=False)
    assert arr[0, :8].min() > 200 and arr[0, 12:].max() < 50  # 20 x 20: top white, bottom black


@pytest.mark.parametrize("orientation", [0, 9, 1000])
def test_exif_orientation_out_of_range_leaves_pixels(tmp_path, orientation):
    pixels = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    path = _tagged(tmp_path / "o.png", pixels, orientation)
    np.testing.assert_array_equal(rgb_of(path), pixels)


def test_corrupt_exif_decodes_silently(tmp_path):
    pixels = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    path = tmp_path / "bad.png"
    # A header promising five entries and holding part of one.
    Image.fromarray(pixels).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(rgb_of(path), pixels)
    assert not shown, [str(w.message) for w in shown]  # Pillow's "Corrupt EXIF data" would print per image


# ----------------------------------------------------------------------------
# 2. Decompression bombs: refused by path
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 48 KB 1-bit PNG that decodes to 20000 x 20000."""
    row = b"\x00" * (20000 // 8)
    return write_png(tmp_path_factory.mktemp("bomb") / "bomb.png", 20000, 20000, 1, 0,
                     (row for _ in range(20000)))


def test_bomb_reported_by_path(bomb):
    assert bomb.stat().st_size < 100_000
    with pytest.raises(UnreadableImageError) as info:
        preprocessing.load_rgb(bomb)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (f"cannot read image {bomb}: decompression bomb (20000x20000 = 400 Mpixels > limit "
                   f"89.5 Mpixels; to allow it, set DEEP_RANK_MAX_IMAGE_PIXELS=<pixels>)")


def test_bomb_through_cache_and_choose_cache_size(bomb, tmp_path):
    ok = tmp_path / "ok.png"
    Image.fromarray(class_image(0, 0, 16)).save(ok)
    paths = [str(ok), str(bomb)]
    assert image_cache.choose_cache_size(paths, 32) == 32  # no traceback from the header probe
    with pytest.raises(UnreadableImageError) as info:
        image_cache.cache_images(paths, 16, cache_dir=tmp_path / "c", progress=False)
    assert str(info.value).startswith("1 of 2 images cannot be read")
    assert f"cannot read image {bomb}: decompression bomb (20000x20000" in str(info.value)


def test_own_limit_between_pillow_warning_and_error(tmp_path, monkeypatch):
    """Sizes where Pillow only warns are refused too, without the warning leaking out."""
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)     # Pillow: warns above 300, errors above 600
    monkeypatch.setattr(preprocessing, "MAX_IMAGE_PIXELS", 300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnreadableImageError, match=r"20x20 = 0.0004 Mpixels > limit 0.0003 Mpixels"):
            preprocessing.load_rgb(path)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_limit_raised_by_environment(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)     # Pillow alone would refuse 400 pixels
    monkeypatch.setattr(preprocessing, "MAX_IMAGE_PIXELS", 150)
    monkeypatch.setenv("DEEP_RANK_MAX_IMAGE_PIXELS", "400")
    assert rgb_of(path).shape == (20, 20, 3)
    monkeypatch.setenv("DEEP_RANK_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(UserError, match="DEEP_RANK_MAX_IMAGE_PIXELS must be a positive number"):
        preprocessing.load_rgb(path)


def test_bomb_through_gen_embeddings(bomb, tmp_path, checkpoint):
    data = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=32, ext=".png")
    target = data / "class00" / "bomb.png"
    target.write_bytes(bomb.read_bytes())
    code, _, err = embed(checkpoint, data, tmp_path / "emb.npz", tmp_path)
    assert_one_error(code, err)
    assert f"cannot read image {target}: decompression bomb (20000x20000 = 400 Mpixels" in err
    assert not (tmp_path / "emb.npz").exists()


# ----------------------------------------------------------------------------
# 3. File names that are not valid UTF-8
# ----------------------------------------------------------------------------


@pytest.fixture
def bad_name() -> str:
    if sys.platform == "win32" or sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"):
        pytest.skip("needs a POSIX file system with UTF-8 file names")
    return os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: "caf\udce9.png"


def test_display_path_escapes_undecodable_bytes(bad_name):
    assert image_data.display_path(bad_name) == "caf\\xe9.png"
    assert image_data.display_path(os.fsencode(bad_name)) == "caf\\xe9.png"
    assert image_data.display_path("café.png") == "café.png"
    assert image_data.display_path("\ud800x.png").encode("utf-8")  # not a byte escape: still printable
    assert image_data.is_image_file(bad_name)


def test_undecodable_name_decodes_and_caches(tmp_path, bad_name):
    path = tmp_path / bad_name
    Image.fromarray(class_image(0, 0, 16)).save(path)
    listed = [str(tmp_path / n) for n in os.listdir(tmp_path) if image_data.is_image_file(n)]
    assert listed == [str(path)]
    arr = image_cache.cache_images(listed, 16, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(arr[0], class_image(0, 0, 16))
    again = image_cache.cache_images(listed, 16, cache_dir=tmp_path / "c", progress=False)  # a cache hit
    np.testing.assert_array_equal(again, arr)


def test_undecodable_name_in_error_prints_on_strict_streams(tmp_path, bad_name):
    path = tmp_path / bad_name
    path.write_bytes(b"not a png")
    with pytest.raises(UnreadableImageError) as info:
        image_cache.cache_images([str(path)], 16, cache_dir=tmp_path / "c", progress=False)
    msg = str(info.value)
    assert f"cannot read image {tmp_path}/caf\\xe9.png" in msg
    for encoding in ("utf-8", "ascii"):
        stream = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict")
        print(f"error: {msg}", file=stream)
        stream.flush()
    with pytest.raises(UnreadableImageError, match=r"image not found: .*gone\\xe9\.png"):
        preprocessing.load_rgb(tmp_path / os.fsdecode(b"gone\xe9.png"))


def test_undecodable_name_refused_by_listing(tmp_path, bad_name):
    root = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=8, ext=".png")
    Image.fromarray(class_image(0, 9, 8)).save(root / "class00" / bad_name)
    with pytest.raises(UserError) as info:
        image_data.list_class_folder(root)
    msg = str(info.value)
    assert msg.startswith(f"1 image path(s) in {root} are not valid UTF-8")
    assert msg.splitlines()[1] == f"  {root}/class00/caf\\xe9.png"
    msg.encode("ascii")


def test_undecodable_name_through_triplet_sampler(tmp_path, bad_name):
    root = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=8, ext=".png")
    Image.fromarray(class_image(0, 9, 8)).save(root / "class00" / bad_name)
    strict = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    code, _, err = sampler(root, tmp_path / "t.csv", stderr=strict)
    line = assert_one_error(code, err)
    assert "are not valid UTF-8" in line and "caf\\xe9.png" in err
    assert not (tmp_path / "t.csv").exists()


# ----------------------------------------------------------------------------
# 4. Image formats this Pillow cannot read; empty class folders
# ----------------------------------------------------------------------------


@pytest.fixture
def no_heic_reader():
    if image_data._pillow_reads(".heic"):
        pytest.skip("a HEIF plugin is registered here")


def test_unreadable_format_listed_by_path(tmp_path, no_heic_reader):
    root = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=8, ext=".png")
    for name in ("b.HEIC", "a.heic"):
        (root / "class01" / name).write_bytes(b"junk" * 10)
    (root / "class00" / "c.jxl").write_bytes(b"junk")
    with pytest.raises(UserError) as info:
        image_data.list_class_folder(root)
    lines = str(info.value).splitlines()
    assert lines[0] == (f"3 image file(s) in {root} cannot be read: this Pillow has no reader for .heic, .jxl "
                        f"files (convert them to JPEG or PNG, or remove them):")
    assert lines[1:] == [f"  {root}/class00/c.jxl", f"  {root}/class01/a.heic", f"  {root}/class01/b.HEIC"]


def test_readable_plugin_format_is_used(tmp_path):
    root = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=8, ext=".png")
    Image.fromarray(class_image(0, 5, 8)).save(root / "class00" / "extra.jfif", format="JPEG")
    listing = image_data.list_class_folder(root)
    assert str(root / "class00" / "extra.jfif") in listing.paths


def test_junk_in_a_readable_format_reported_by_the_cache(tmp_path):
    junk = tmp_path / "x.avif"
    junk.write_bytes(b"junk" * 10)
    with pytest.raises(UnreadableImageError,
                       match=f"cannot read image {junk}: not an image, or a format this Pillow cannot read"):
        image_cache.cache_images([str(junk)], 8, cache_dir=tmp_path / "c", progress=False)


def test_unreadable_format_through_triplet_sampler(tmp_path, no_heic_reader):
    root = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=8, ext=".png")
    (root / "class01" / "photo.heic").write_bytes(b"junk" * 10)
    code, _, err = sampler(root, tmp_path / "t.csv")
    line = assert_one_error(code, err)
    assert "no reader for .heic" in line and f"  {root}/class01/photo.heic" in err
    assert not (tmp_path / "t.csv").exists()


def test_dangling_link_listed_and_reported(tmp_path):
    root = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=8, ext=".png")
    link = root / "class00" / "moved.png"
    link.symlink_to(tmp_path / "nowhere.png")
    paths = image_data.list_class_folder(root).paths
    assert str(link) in paths
    with pytest.raises(UnreadableImageError, match=f"image not found: {link}"):
        image_cache.cache_images(paths, 8, cache_dir=tmp_path / "c", progress=False)


def test_empty_class_folder_warned(tmp_path, capsys):
    root = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=8, ext=".png")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("no images here")
    listing = image_data.list_class_folder(root)
    assert listing.class_names == ["class00", "class01"]
    err = capsys.readouterr().err
    assert err == f"warning: skipped 2 class folder(s) with no image files in {root}: empty, notes\n"


def test_images_beside_an_images_folder_are_left_out_with_a_warning(tmp_path, capsys):
    # TinyImageNet's train/<wnid>/images/ layout: a class with images/ is read from it alone,
    # so images left next to it are named in a warning, not dropped in silence
    root = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=8, ext=".png")
    (root / "class00" / "images").mkdir()
    for name in ("class00_0.png", "class00_1.png"):
        (root / "class00" / name).rename(root / "class00" / "images" / name)
    shutil.copy(root / "class01" / "class01_0.png", root / "class00" / "stray.png")
    listing = image_data.list_class_folder(root)
    assert sorted(Path(p).name for p in listing.paths) == ["class00_0.png", "class00_1.png", "class01_0.png",
                                                          "class01_1.png"]
    err = capsys.readouterr().err
    assert err == ("warning: left out the image files beside the images/ folder of 1 class(es) (a class with an "
                   "images/ folder is read from it alone, as in TinyImageNet): class00 (1)\n")


def test_images_in_sub_folders_of_a_class_are_left_out_with_a_warning(tmp_path, capsys):
    # A class is one folder (or its images/), not a tree: deeper images are named, not dropped in silence
    root = write_class_folder(tmp_path / "data", n_classes=3, per_class=2, size=8, ext=".png")
    (root / "class00" / "extra" / "deeper").mkdir(parents=True)
    shutil.copy(root / "class01" / "class01_0.png", root / "class00" / "extra" / "a.png")
    shutil.copy(root / "class01" / "class01_0.png", root / "class00" / "extra" / "deeper" / "b.png")
    (root / "class00" / "extra" / "notes.txt").write_text("not an image")
    (root / "class02" / "images" / "more").mkdir(parents=True)  # TinyImageNet layout, one level too deep
    for name in ("class02_0.png", "class02_1.png"):
        (root / "class02" / name).rename(root / "class02" / "images" / name)
    shutil.copy(root / "class01" / "class01_0.png", root / "class02" / "images" / "more" / "c.png")
    listing = image_data.list_class_folder(root)
    assert len(listing.paths) == 6
    err = capsys.readouterr().err
    assert err == ("warning: left out the image files in sub-folders of 2 class(es) (a class is read from its own "
                   "folder, or its images/ folder, not from folders below; move them up to include them): "
                   "class00 (2), class02 (1)\n")


def test_empty_class_folder_through_triplet_sampler(tmp_path):
    root = write_class_folder(tmp_path / "data", n_classes=2, per_class=2, size=8, ext=".png")
    (root / "empty").mkdir()
    code, _, err = sampler(root, tmp_path / "t.csv")
    assert code == 0, err
    assert f"warning: skipped 1 class folder(s) with no image files in {root}: empty" in err
    assert (tmp_path / "t.csv").exists()
    # Leaving a single class: the sampler's own error, after the warning that explains it.
    (root / "class01" / "class01_0.png").unlink()
    (root / "class01" / "class01_1.png").unlink()
    code, _, err = sampler(root, tmp_path / "t2.csv")
    line = assert_one_error(code, err)
    assert line.startswith("error: need at least 2 classes")
    assert f"with no image files in {root}: class01, empty" in err

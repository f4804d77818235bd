"""Shared test fixtures: small generated datasets in the layouts users have.

Images are class-dependent (a base colour per class plus a stripe pattern and
noise), so a tiny model can learn to tell classes apart in a few steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the decoded-image cache of every test out of the user's home."""
    monkeypatch.setenv("DEEP_RANK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "image-cache"))


def class_image(label: int, index: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [size, size, 3] image whose colour and stripes depend on ``label``."""
    rng = np.random.default_rng((seed, label, index))
    base = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 151 + 30) % 256], dtype=np.float32)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = base
    period = 2 + label % 5
    stripes = (np.arange(size) // period) % 2 == 0
    img[stripes if label % 2 else slice(None), stripes if not label % 2 else slice(None)] *= 0.5
    img += rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_class_folder(
    root: Path,
    n_classes: int = 3,
    per_class: int = 6,
    size: int = 32,
    with_images_subdir: bool = False,
    ext: str = ".jpg",
    seed: int = 0,
    prefix: str = "class",
) -> Path:
    """Write ``root/<class>/[images/]<class>_<i><ext>`` and return ``root``."""
    root = Path(root)
    for label in range(n_classes):
        name = f"{prefix}{label:02d}"
        folder = root / name / "images" if with_images_subdir else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(label, i, size, seed)).save(folder / f"{name}_{i}{ext}")
    return root


def write_tiny_imagenet(root: Path, n_classes: int = 3, train_per_class: int = 8, val_per_class: int = 3,
                        size: int = 32, restructured: bool = True) -> Path:
    """A miniature TinyImageNet: wnids.txt, words.txt, train/<wnid>/images/*.JPEG and val.

    ``restructured=False`` writes val in the original layout
    (val/images/val_<i>.JPEG + val/val_annotations.txt).
    """
    root = Path(root)
    wnids = [f"n{label:08d}" for label in range(n_classes)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    for label, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            Image.fromarray(class_image(label, i, size)).save(folder / f"{wnid}_{i}.JPEG")
    annotations = []
    val_index = 0
    for label, wnid in enumerate(wnids):
        for i in range(val_per_class):
            img = Image.fromarray(class_image(label, 1000 + i, size))
            name = f"val_{val_index}.JPEG"
            if restructured:
                folder = root / "val" / wnid / "images"
            else:
                folder = root / "val" / "images"
                annotations.append(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}\n")
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / name)
            val_index += 1
    if not restructured:
        (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    return root


@pytest.fixture
def class_folder(tmp_path) -> Path:
    """3 classes x 6 images of 32 px in ``<root>/<class>/*.jpg``."""
    return write_class_folder(tmp_path / "photos")


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    """Read-only miniature TinyImageNet with val already restructured. Do not modify."""
    return write_tiny_imagenet(tmp_path_factory.mktemp("tin") / "tiny-imagenet-200")


@pytest.fixture
def tiny_imagenet_raw(tmp_path) -> Path:
    """A fresh miniature TinyImageNet with val in the original layout (modifiable)."""
    return write_tiny_imagenet(tmp_path / "tiny-imagenet-200", restructured=False)

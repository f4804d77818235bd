"""The preprocessing contract: every step between an image file and the tensor the net sees.

    file ─ load_rgb ─ decode_resized(cache_size) ─> uint8 [cache_size, cache_size, 3]   (CPU, PIL, once per image,
                                                                                        kept in the image cache)
         ─ preprocess(image_size) ─> float32 [B, 3, image_size, image_size]           (on the device, every batch)

A :class:`Preprocessing` records the settings that decide those pixels (cache side,
net input side, resize filters, normalisation). Training writes it into the
checkpoint; validation, ``gen_embeddings.py``, ``query.py`` and ``get_distance.py``
rebuild their input from the checkpoint's copy, so an image gives the same vector in
every stage. Change a default here only with a new ``PIXELS_VERSION``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from deepranking.cli import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bump when the pixels for the same settings would change (it is part of the image-cache key too).
PIXELS_VERSION = 1


class UnreadableImageError(UserError):
    """An image file that PIL cannot decode; the message names the path."""


@dataclass(frozen=True)
class Preprocessing:
    """What decides the pixels: the cache's square side, the net's input side and the normalisation.

    cache_size: side of the decoded squares in the image cache (PIL bilinear, box-reduced when shrinking)
    image_size: side the net sees (device bilinear resize from cache_size, antialiased when shrinking)
    """

    image_size: int
    cache_size: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    version: int = PIXELS_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """Inverse of to_dict (UserError for anything malformed or from newer code)."""
        try:
            spec = cls(image_size=int(d["image_size"]), cache_size=int(d["cache_size"]),
                       mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                       version=int(d.get("version", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"checkpoint preprocessing record is invalid: {exc!r}")
        if spec.version > PIXELS_VERSION:
            raise UserError(f"checkpoint preprocessing version {spec.version} is newer than this code "
                            f"({PIXELS_VERSION}); update the code")
        if spec.image_size < 1 or spec.cache_size < 1 or len(spec.mean) != 3 or len(spec.std) != 3:
            raise UserError(f"checkpoint preprocessing record is invalid: {d}")
        return spec


# ----------------------------------------------------------------------------
# Decoding (CPU, once per image)
# ----------------------------------------------------------------------------


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB (grey, palette, RGBA and CMYK included).

    Raises UnreadableImageError naming the path if the file cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "RGB":
                return im.copy()
            if im.mode in ("P", "LA", "PA") or (im.mode == "RGBA"):
                # Composite transparency on white rather than on black garbage.
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImageError(f"image not found: {path}")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImageError(f"cannot read image {path}: {exc}")


def decode_resized(path: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: ``path`` decoded as RGB, resized (bilinear) when needed."""
    im = load_rgb(path)
    if im.size != (size, size):
        # reducing_gap: fast JPEG-style box reduction first, then bilinear (only helps downsizing).
        shrink = im.width > size or im.height > size
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0 if shrink else None)
    return np.asarray(im, dtype=np.uint8)


# ----------------------------------------------------------------------------
# Net input (device, every batch)
# ----------------------------------------------------------------------------


def preprocess(
    images: torch.Tensor,
    spec: Preprocessing | int,
    train: bool = False,
    generator: torch.Generator | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 [B,H,W,3] (any device) -> normalised float32 [B,3,S,S] on the same device.

    Bilinear resize to ``spec.image_size`` (antialiased when shrinking), normalisation
    and, when ``train``, a random horizontal flip per image drawn from ``generator``
    (which may live on another device than ``images``). ``memory_format`` comes from
    :func:`deepranking.runtime.memory_format` (one policy for training and embedding).
    An int ``spec`` means an image size with the default normalisation.
    """
    if isinstance(spec, int):
        spec = Preprocessing(image_size=spec, cache_size=spec)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B,H,W,3] images, got {images.dtype} {tuple(images.shape)}")
    size = spec.image_size
    x = images.permute(0, 3, 1, 2).float()  # [B,3,H,W], values 0..255
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        shrink = h > size or w > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1) * 255.0
    x = (x - mean) / std
    if train and x.shape[0]:
        gen_device = generator.device if generator is not None else x.device
        flip = torch.rand(x.shape[0], generator=generator, device=gen_device) < 0.5  # [B]
        x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    return x.contiguous(memory_format=memory_format)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode one image as uint8 [H,W,3] (UnreadableImageError naming the path if unreadable)."""
    return torch.from_numpy(np.array(load_rgb(path), dtype=np.uint8))

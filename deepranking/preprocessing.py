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

import math
import os
import re
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from deepranking.cli import UserError
from deepranking.file_io import open_regular
from deepranking.image_data import display_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bump when the pixels for the same settings would change (it is part of the image-cache key too).
PIXELS_VERSION = 3  # 3: EXIF orientation applied; 2: high-bit-depth images scaled to 8 bits (1 clipped them)
# Decompression-bomb guard: an image with more pixels than this is unreadable (reported by
# path, like a corrupt file) instead of being decoded. 89,478,485 is Pillow's own default
# warning threshold (a 9459 x 9459 image, 268 MB as RGB, per decoding thread). To raise it,
# set the environment variable DEEP_RANK_MAX_IMAGE_PIXELS (a pixel count, e.g. 400000000)
# or change this constant; it decides only what is refused, never the pixels.
MAX_IMAGE_PIXELS = 89_478_485
MAX_IMAGE_PIXELS_ENV = "DEEP_RANK_MAX_IMAGE_PIXELS"


class UnreadableImageError(UserError):
    """An image file that PIL cannot decode; the message names the path."""

    def __init__(self, *args, message: str | None = None):
        # A DataLoader worker's exception is raised again in the main process as exc_type(text) (or
        # exc_type(message=text)), text = "Caught <Name> in DataLoader worker ...\nOriginal Traceback
        # ...\n<module>.<Name>: <message>": keep the worker's own message, never the traceback.
        text = message if message is not None else (args[0] if len(args) == 1 else None)
        name = type(self).__name__
        if isinstance(text, str) and text.startswith(f"Caught {name} ") and f"{name}: " in text:
            args = (text.rstrip().rsplit(f"{name}: ", 1)[-1],)
        elif message is not None:
            args = (message,)
        super().__init__(*args)


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
        if (spec.image_size < 1 or spec.cache_size < 1 or len(spec.mean) != 3 or len(spec.std) != 3
                or not all(math.isfinite(v) for v in spec.mean) or not all(0 < v < math.inf for v in spec.std)):
            raise UserError(f"checkpoint preprocessing record is invalid: {d}")
        return spec


# ----------------------------------------------------------------------------
# Decoding (CPU, once per image)
# ----------------------------------------------------------------------------


def max_image_pixels() -> int:
    """The decompression-bomb limit: ``$DEEP_RANK_MAX_IMAGE_PIXELS`` if set, else ``MAX_IMAGE_PIXELS``."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(text.replace("_", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise UserError(f"{MAX_IMAGE_PIXELS_ENV} must be a positive number of pixels, got {text!r}")
    return limit


def _mpixels(n: int) -> str:
    return f"{n / 1e6:.3g} Mpixels"


def _bomb_error(shown: str, size: tuple[int, int] | None, pixels: int | None, limit: int) -> UnreadableImageError:
    what = f"{size[0]}x{size[1]} = {_mpixels(size[0] * size[1])}" if size else (
        _mpixels(pixels) if pixels else "too many pixels")
    return UnreadableImageError(
        f"cannot read image {shown}: decompression bomb ({what} > limit {_mpixels(limit)}; "
        f"to allow it, set {MAX_IMAGE_PIXELS_ENV}=<pixels>)")


def _bomb_size(exc: BaseException) -> tuple[tuple[int, int] | None, int | None]:
    """(width, height) and pixel count of the image Pillow refused as a decompression bomb."""
    tb, size = exc.__traceback__, None
    while tb is not None:  # Pillow's check keeps the size as a local; its message only the product
        if tb.tb_frame.f_code.co_name == "_decompression_bomb_check":
            size = tb.tb_frame.f_locals.get("size")
        tb = tb.tb_next
    if isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return (size[0], size[1]), size[0] * size[1]
    m = re.search(r"\((\d+) pixels\)", str(exc))
    return None, int(m.group(1)) if m else None


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """8-bit grey ("L") from a 16/32-bit integer or float grey image, by a fixed scaling.

    Integer modes (I;16, I;16B, I;16L, I) hold 16-bit samples (Pillow opens 16-bit PNG,
    TIFF and PGM grey this way, PGMs with fewer bits scaled up to 16): value >> 8, so
    0, 32768, 65535 -> 0, 128, 255 (the high byte, as Pillow itself does for 16-bit RGB).
    Float ("F") samples are taken as 0.0-1.0 -> 0-255. Values outside the range are clipped.
    """
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        out = np.rint(np.clip(a, 0.0, 1.0) * 255.0)
    else:
        out = np.clip(a.astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of a loaded image (transparency composited on white)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("P", "LA", "PA", "La", "RGBA", "RGBa"):
        # Composite transparency on white rather than on black garbage.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;"):
        # Pillow's own convert clips these at 255 (every 16-bit value above 255 turns white).
        return _high_depth_to_l(im).convert("RGB")
    return im.convert("RGB")


def _upright(im: Image.Image) -> Image.Image:
    """The image the way a viewer shows it: cameras and phones store the sensor's pixels and an
    EXIF orientation tag (6 = turn 90 degrees clockwise) instead of rotating the pixels."""
    try:
        ImageOps.exif_transpose(im, in_place=True)  # no tag (or not 2-8): untouched, no copy
    except Exception:  # a broken EXIF block tells no orientation; the pixels themselves decoded
        pass
    return im


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB (grey, palette, RGBA, CMYK and 16-bit included), upright by
    its EXIF orientation tag.

    Raises UnreadableImageError naming the path if the file cannot be decoded, is no regular
    file (a FIFO, a device: never opened) or
    has more than ``max_image_pixels()`` pixels (a decompression bomb). Paths that
    are not valid UTF-8 are read as they are and shown escaped in messages.
    """
    return _open_rgb(path, decode=True)


def check_image(path: str | os.PathLike) -> None:
    """Raise what load_rgb would for a missing file, a non-image or a bomb, reading only the header
    (a truncated body shows only when decoded)."""
    _open_rgb(path, decode=False)


def _open_rgb(path: str | os.PathLike, decode: bool) -> Image.Image | None:
    limit = max_image_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit  # a raised limit: Pillow's own guard must not refuse first
    shown = display_path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it; the check below decides instead. (In
            # the cache's decoding threads catch_warnings may leave these filters installed
            # afterwards: harmless, since this check replaces the one and _upright the other.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # A broken EXIF block only hides the orientation (_upright); the pixels are fine.
            warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
            # open_regular: a FIFO or device named like an image is refused, never opened (a FIFO blocks)
            with open_regular(path) as f, Image.open(f) as im:
                if im.width * im.height > limit:
                    raise _bomb_error(shown, im.size, None, limit)
                if not decode:
                    return None
                im.load()
                return _to_rgb(_upright(im))
    except FileNotFoundError:
        link = " (a symbolic link to a missing file)" if os.path.islink(path) else ""
        raise UnreadableImageError(f"image not found: {shown}{link}")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning if made an error
        raise _bomb_error(shown, *_bomb_size(exc), limit)
    except UnidentifiedImageError:
        raise UnreadableImageError(f"cannot read image {shown}: not an image, or a format this Pillow "
                                   f"cannot read")
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImageError(f"cannot read image {shown}: {display_path(str(exc))}")


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
    shift: float = 0.0,
    erase: float = 0.0,
) -> torch.Tensor:
    """uint8 [B,H,W,3] (any device) -> normalised float32 [B,3,S,S] on the same device.

    Bilinear resize to ``spec.image_size`` (antialiased when shrinking), normalisation
    and, when ``train``, a random horizontal flip per image drawn from ``generator``
    (which may live on another device than ``images``), then, when ``shift`` > 0, a random
    translation of each image by up to round(shift * S) whole pixels in x and in y, the
    border pixels repeated into the gap (drawn after the flips, so flips alone draw the
    same numbers with or without it); then, when ``erase`` > 0, each image with probability
    ``erase`` has one random rectangle set to 0, the mean colour (:func:`erase_boxes`,
    drawn last). ``memory_format`` comes from
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
    mean, std = _normalisation(spec.mean, spec.std, x.device)  # [1, 3, 1, 1] each, 0..255 scale
    x = (x - mean) / std
    if train and x.shape[0]:
        gen_device = generator.device if generator is not None else x.device
        flip = _to(torch.rand(x.shape[0], generator=generator, device=gen_device) < 0.5, x.device)  # [B]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        pad = int(round(shift * size))
        if pad > 0:
            offsets = torch.randint(0, 2 * pad + 1, (2, x.shape[0]), generator=generator, device=gen_device)
            x = _translate(x, _to(offsets, x.device), pad)
        if erase > 0:
            boxes = _to(erase_boxes(x.shape[0], size, erase, generator, gen_device), x.device)  # [5, B], not [B,1,S,S]
            x = x.masked_fill(box_masks(boxes, size), 0.0)
    return x.contiguous(memory_format=memory_format)


ERASE_AREA = (0.02, 0.33)  # fraction of the image a rectangle covers (torchvision RandomErasing's defaults)
ERASE_LOG_RATIO = (math.log(0.3), math.log(3.3))  # log of height / width


def erase_boxes(n: int, size: int, p: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """float [5, n]: (top, height, left, width, erased 0/1) of one rectangle per image, erased with probability ``p``.

    Random erasing (Zhong et al. 2017): area a uniform fraction ERASE_AREA of the image, aspect
    log-uniform in ERASE_LOG_RATIO, sides rounded and clamped to [1, size], position uniform over
    where it fits. All five draws come from ``generator`` for every image, erased or not.
    """
    draws = torch.rand(5, n, generator=generator, device=device)  # [5, n]
    area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * draws[0]) * size * size
    ratio = torch.exp(ERASE_LOG_RATIO[0] + (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]) * draws[1])
    h = torch.sqrt(area * ratio).round().clamp(1, size)  # [n]
    w = torch.sqrt(area / ratio).round().clamp(1, size)
    top = torch.floor(draws[2] * (size - h + 1)).clamp(max=size - h)  # [n], in [0, size - h]
    left = torch.floor(draws[3] * (size - w + 1)).clamp(max=size - w)
    return torch.stack([top, h, left, w, (draws[4] < p).float()])


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """bool [n, 1, size, size], True inside each erased box of ``boxes`` [5, n] (:func:`erase_boxes`), on its device."""
    top, h, left, w, on = boxes
    span = torch.arange(size, device=boxes.device, dtype=boxes.dtype)  # [S]
    rows = (span >= top[:, None]) & (span < (top + h)[:, None])  # [n, S]
    cols = (span >= left[:, None]) & (span < (left + w)[:, None])  # [n, S]
    return ((on[:, None, None] > 0) & rows[:, :, None] & cols[:, None, :])[:, None]  # [n, 1, S, S]


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU generator's draws feeding a GPU batch: an asynchronous (pinned) copy, no wait."""
    if t.device == device:
        return t
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def _translate(x: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """x [B,C,S,S] shifted per image: the S x S window at (offsets[0], offsets[1]) [2, B] of x padded
    by ``pad`` border-repeating pixels on each side (offset ``pad`` = no shift)."""
    b, c, s, _ = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # [B, C, S+2p, S+2p]
    span = torch.arange(s, device=x.device)
    rows = (offsets[0].view(b, 1) + span).view(b, 1, s, 1)  # [B, 1, S, 1]
    cols = (offsets[1].view(b, 1) + span).view(b, 1, 1, s)  # [B, 1, 1, S]
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]  # [B, C, S, S]


_NORMALISATION: dict = {}


def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std tensors on ``device``, made once: a fresh host->GPU copy every batch would wait."""
    key = (tuple(mean), tuple(std), str(device))
    if key not in _NORMALISATION:
        with torch.inference_mode(False):  # first made while embedding, later used in training too
            _NORMALISATION[key] = (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0,
                                   torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0)
    return _NORMALISATION[key]


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode one image as uint8 [H,W,3] (UnreadableImageError naming the path if unreadable)."""
    return torch.from_numpy(np.array(load_rgb(path), dtype=np.uint8))

"""The Deep Ranking model, its image transform and checkpoint I/O.

Model (Wang et al. 2014, as the classic TinyImageNet implementations build it)::

    image [B,3,S,S] ─ ResNet (to global avg pool) [B,F] ─ Linear(F, D) ─ L2 ─┐
                    ├ Conv2d(3,96,8,s16,p1) ─ AdaptiveMaxPool(4) [B,96,4,4] ─ flat ─ L2 ─┤ concat
                    └ Conv2d(3,96,8,s32,p4) ─ AdaptiveMaxPool(4) [B,96,4,4] ─ flat ─ L2 ─┘ [B,D+3072]
                                                              ─ Linear(D+3072, D) ─ L2 ─> [B,D]

F is 512 (resnet18/34) or 2048 (resnet50/101/152). Adaptive max pooling replaces the
classic fixed pools, which only produce 4x4 for 198-255 px inputs, so any image size works.

Checkpoints are plain dicts of tensors and Python values (see DESIGN.md), loadable with
``torch.load(weights_only=True)`` — never a pickled module.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepranking.cli import UserError, atomic_path, check_input_file

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Stages in forward order; train_from=X trains X and everything after it.
TRAIN_FROM_STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4", "head")
# Backbone modules that belong to each stage ("head" has none: heads are always trained).
_STAGE_MODULES = {
    "conv1": ("conv1", "bn1"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
    "head": (),
}
# Blocks per layer and block type of each architecture (to name the arch of a state dict).
_ARCH_LAYOUT = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
SHALLOW_CHANNELS = 96
SHALLOW_GRID = 4
SHALLOW_DIM = SHALLOW_CHANNELS * SHALLOW_GRID * SHALLOW_GRID  # 1536 per shallow path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHECKPOINT_FORMAT = "deep-ranking-checkpoint"
CHECKPOINT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


class DeepRankNet(nn.Module):
    """Multi-scale embedding network; forward returns unit-norm [B, embedding_dim]."""

    def __init__(
        self,
        arch: str = "resnet101",
        embedding_dim: int = 4096,
        multiscale: bool = True,
        weights: str = "none",
        train_from: str = "layer4",
    ):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise UserError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
        if train_from not in TRAIN_FROM_STAGES:
            raise UserError(f"unknown train_from stage {train_from!r} (choose from {', '.join(TRAIN_FROM_STAGES)})")
        if int(embedding_dim) < 1:
            raise UserError(f"embedding_dim must be >= 1, got {embedding_dim}")
        import torchvision

        self.config = {
            "arch": arch,
            "embedding_dim": int(embedding_dim),
            "multiscale": bool(multiscale),
            "train_from": train_from,
        }
        backbone = getattr(torchvision.models, arch)(weights=None)
        feature_dim = backbone.fc.in_features  # 512 or 2048
        backbone.fc = nn.Identity()  # backbone(x) -> pooled features [B, F]
        self.backbone = backbone
        self.embed = nn.Linear(feature_dim, embedding_dim)
        if multiscale:
            self.shallow1 = nn.Conv2d(3, SHALLOW_CHANNELS, kernel_size=8, stride=16, padding=1)
            self.shallow2 = nn.Conv2d(3, SHALLOW_CHANNELS, kernel_size=8, stride=32, padding=4)
            self.pool = nn.AdaptiveMaxPool2d(SHALLOW_GRID)
            self.fuse = nn.Linear(embedding_dim + 2 * SHALLOW_DIM, embedding_dim)
        if weights != "none":
            load_backbone_weights(self.backbone, arch, weights)
        self._frozen = frozen_module_names(train_from)
        for name in self._frozen:
            for p in getattr(self.backbone, name).parameters():
                p.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True):
        """Like nn.Module.train, but frozen stages stay in eval mode so their BN stats never move."""
        super().train(mode)
        for name in self._frozen:
            getattr(self.backbone, name).eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, H, W] normalised
        deep = F.normalize(self.embed(self.backbone(x)), dim=1)  # [B, D]
        if not self.config["multiscale"]:
            return deep
        # The stride-16 conv needs H, W >= 6; zero padding is the mean colour after normalisation.
        h, w = x.shape[-2:]
        if min(h, w) < 6:
            x = F.pad(x, (0, max(0, 6 - w), 0, max(0, 6 - h)))
        s1 = F.normalize(self.pool(self.shallow1(x)).flatten(1), dim=1)  # [B, 1536]
        s2 = F.normalize(self.pool(self.shallow2(x)).flatten(1), dim=1)  # [B, 1536]
        fused = self.fuse(torch.cat([deep, s1, s2], dim=1))  # [B, D + 3072] -> [B, D]
        return F.normalize(fused, dim=1)


def build_model(
    arch: str = "resnet101",
    embedding_dim: int = 4096,
    multiscale: bool = True,
    weights: str = "none",
    train_from: str = "layer4",
) -> DeepRankNet:
    """Same as DeepRankNet(...); the name scripts use."""
    return DeepRankNet(arch, embedding_dim, multiscale, weights, train_from)


def frozen_module_names(train_from: str) -> list[str]:
    """Backbone child modules frozen when training from ``train_from``."""
    stop = TRAIN_FROM_STAGES.index(train_from)
    return [m for stage in TRAIN_FROM_STAGES[:stop] for m in _STAGE_MODULES[stage]]


# ----------------------------------------------------------------------------
# Pretrained backbone weights
# ----------------------------------------------------------------------------


def imagenet_weights(arch: str):
    """torchvision's best ImageNet weights enum for ``arch`` (e.g. ResNet101_Weights.IMAGENET1K_V2)."""
    import torchvision

    return torchvision.models.get_model_weights(arch).DEFAULT


def expected_weights_file(arch: str) -> Path:
    """Where torch.hub caches (and looks for) the ImageNet weights of ``arch``."""
    url = imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _download_imagenet_state_dict(arch: str) -> dict:
    url = imagenet_weights(arch).url
    target = expected_weights_file(arch)
    offline_hint = "(--weights none trains from scratch; --weights PATH loads a local torchvision state dict)"
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, map_location="cpu")
    except OSError as exc:  # URLError, HTTPError, socket errors, disk errors
        raise UserError(
            f"cannot download ImageNet weights for {arch} ({exc}); without internet, put {url} at {target} "
            f"{offline_hint}"
        )
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise UserError(f"cached ImageNet weights {target} are corrupt ({_first_line(exc)}); delete the file and retry {offline_hint}")


def _read_state_dict_file(path: str | os.PathLike, what: str) -> Any:
    p = check_input_file(path, what)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(p):  # torch.save writes zip archives; anything else is damaged
            raise UserError(f"{what} {p} is truncated or corrupt (not a torch.save file)")
        raise UserError(
            f"{what} {p} holds pickled Python objects (e.g. a whole model saved with torch.save(model)), "
            f"not plain tensors; save model.state_dict() instead ({_first_line(exc)})"
        )
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise UserError(f"{what} {p} is truncated or corrupt: {_first_line(exc)}")


def load_backbone_weights(backbone: nn.Module, arch: str, weights: str) -> None:
    """Load ``weights`` ("imagenet" or a state-dict path) into a torchvision ResNet whose fc is Identity."""
    if weights == "imagenet":
        state, source = _download_imagenet_state_dict(arch), f"ImageNet weights for {arch}"
    else:
        obj = _read_state_dict_file(weights, "weights file")
        source = f"weights file {weights}"
        if isinstance(obj, dict) and CHECKPOINT_FORMAT == obj.get("format"):
            obj = obj["model"]  # a deep-ranking checkpoint: reuse its backbone
        elif isinstance(obj, dict):
            for key in ("state_dict", "model"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(f"{source} is not a state dict of tensors")
        state = strip_wrapper_prefixes(obj)
        if any(k.startswith("backbone.") for k in state):
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    _check_state_dict(backbone.state_dict(), state, arch, source, ignore_prefix="fc.")
    backbone.load_state_dict(state, strict=False)  # only the Identity fc (no params) is left out


def _check_state_dict(expected: dict, got: dict, arch: str, source: str, ignore_prefix: str = "\0") -> None:
    """Raise UserError unless ``got`` has exactly the keys and shapes of ``expected``."""
    missing = [k for k in expected if k not in got and not k.startswith(ignore_prefix)]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    found = guess_arch(got)
    if found is not None and found != arch:
        raise UserError(f"{source} holds {found} weights, but the model is {arch}")
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
    if wrong:
        k = wrong[0]
        parts.append(f"shape mismatch for {k}: file {tuple(got[k].shape)}, model {tuple(expected[k].shape)}")
    raise UserError(f"{source} does not fit a {arch} model: " + "; ".join(parts))


def guess_arch(state: dict, prefix: str = "") -> str | None:
    """Name the ResNet a state dict came from, from its blocks per layer; None if unknown."""
    keys = [k[len(prefix):] for k in state if k.startswith(prefix)]
    if any(k.startswith("backbone.") for k in keys):
        keys = [k[len("backbone."):] for k in keys if k.startswith("backbone.")]
    blocks = []
    for layer in range(1, 5):
        idx = {k.split(".")[1] for k in keys if k.startswith(f"layer{layer}.")}
        blocks.append(len(idx))
    bottleneck = any(".conv3." in k for k in keys)
    return _ARCH_LAYOUT.get((tuple(blocks), bottleneck))


def strip_wrapper_prefixes(state: dict) -> dict:
    """Drop DDP ``module.`` and torch.compile ``_orig_mod.`` key prefixes."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for pre in _WRAPPER_PREFIXES:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        out[k] = v
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------


def preprocess(
    images: torch.Tensor,
    image_size: int,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 [B,H,W,3] (any device) -> normalised float32 [B,3,S,S], channels_last, same device.

    Bilinear resize (antialiased when shrinking), ImageNet normalisation and, when
    ``train``, a random horizontal flip per image drawn from ``generator`` (which may
    live on another device than ``images``).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B,H,W,3] images, got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()  # [B,3,H,W], values 0..255
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        shrink = h > image_size or w > image_size
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255.0
    x = (x - mean) / std
    if train and x.shape[0]:
        gen_device = generator.device if generator is not None else x.device
        flip = torch.rand(x.shape[0], generator=generator, device=gen_device) < 0.5  # [B]
        x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode one image as uint8 [H,W,3] (UserError naming the path if unreadable)."""
    from deepranking.image_data import load_rgb

    return torch.from_numpy(np.array(load_rgb(path), dtype=np.uint8))


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """Values torch.load(weights_only=True) accepts: Paths -> str, numpy -> tensors/Python scalars."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, (str, int, float, bool, type(None), torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)  # Path, torch.device, dtype, ...


def capture_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states in a weights_only-safe form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state (after a weights_only load)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    step: int = 0,
    image_size: int = 224,
    args: Any = None,
    rng: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write a resumable checkpoint atomically (an existing file survives a crash)."""
    plain = unwrap_model(model)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": strip_wrapper_prefixes(plain.state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "model_config": {**plain.config, "image_size": int(image_size)},
        "args": to_plain(args) if args is not None else {},
        "rng": to_plain(rng) if rng is not None else None,
        **to_plain(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by save_checkpoint (weights_only); UserError for anything else."""
    p = check_input_file(path, "checkpoint")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{p} is not a deep-ranking checkpoint: it holds pickled Python objects "
            f"(like the classic whole-model .model files), which are not loaded for safety"
        )
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise UserError(f"checkpoint {p} is truncated or corrupt: {_first_line(exc)}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise UserError(
                f"{p} is a plain state dict, not a deep-ranking checkpoint "
                f"(a torchvision ResNet state dict can be used with --weights PATH)"
            )
        raise UserError(f"{p} is not a deep-ranking checkpoint (no format marker {CHECKPOINT_FORMAT!r})")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {p} has version {version!r}; this code reads version <= {CHECKPOINT_VERSION}")
    for key in ("model", "model_config"):
        if not isinstance(ckpt.get(key), dict):
            raise UserError(f"checkpoint {p} is incomplete: no {key!r} entry")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: Any = "cpu") -> tuple[DeepRankNet, int]:
    """Rebuild the model of a loaded checkpoint; returns (model in eval mode, image_size)."""
    cfg = ckpt["model_config"]
    try:
        arch, dim, multiscale = cfg["arch"], int(cfg["embedding_dim"]), bool(cfg["multiscale"])
        image_size = int(cfg["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"checkpoint model_config is incomplete or invalid: {exc!r}")
    model = DeepRankNet(arch, dim, multiscale, weights="none", train_from=cfg.get("train_from", "layer4"))
    state = strip_wrapper_prefixes(ckpt["model"])
    _check_state_dict(model.state_dict(), state, arch, "checkpoint weights")
    model.load_state_dict(state)
    return model.to(device).eval(), image_size


# ----------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------


def resolve_amp_dtype(device: torch.device | str, amp: bool | None = None) -> torch.dtype | None:
    """bf16 autocast dtype to use on ``device``, or None for full fp32.

    amp=None means auto: on for CUDA (when the GPU supports bf16), off for CPU.
    """
    device = torch.device(device)
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _batches(images, batch_size: int, pin: bool) -> Iterable[torch.Tensor]:
    """uint8 CPU tensors [b,H,W,3]; the next batch is read (from a memmap) while this one computes."""
    starts = range(0, len(images), batch_size)

    def read(i: int) -> torch.Tensor:
        t = torch.from_numpy(np.array(images[i:i + batch_size]))  # a writable copy of the (read-only) cache rows
        return t.pin_memory() if pin else t

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for i in starts:
            nxt = pool.submit(read, i)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def embed_images(
    model: nn.Module,
    images,
    image_size: int,
    batch_size: int = 256,
    device: Any = None,
    amp: bool | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Embed uint8 images [N,H,W,3] (array or memmap); returns float32 [N, D], unit rows."""
    from tqdm import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp_dtype = resolve_amp_dtype(device, amp)
    model.eval()
    n = len(images)
    chunks = []
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for batch in _batches(images, batch_size, pin=device.type == "cuda"):
            x = preprocess(batch.to(device, non_blocking=True), image_size)  # [b,3,S,S]
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                emb = model(x)
            chunks.append(F.normalize(emb.float(), dim=1).cpu())
            bar.update(len(batch))
    if not chunks:
        dim = unwrap_model(model).config["embedding_dim"]
        return np.zeros((0, dim), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

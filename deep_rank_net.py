"""The Deep Ranking model: the multi-scale embedding network, and its rebuilding from a checkpoint.

Model (Wang et al. 2014, "Learning Fine-grained Image Similarity with Deep Ranking")::

    image [B,3,S,S] ─ backbone (to pooled features) [B,F] ─ Linear(F, D) ─ L2 ──────────────────┐
                    ├ shallow path 1 ─ [B,96,4,4] ─ flatten [B,1536] ─ L2 ──────────────────────┤ concat
                    └ shallow path 2 ─ [B,96,4,4] ─ flatten [B,1536] ─ L2 ──────────────────────┘ [B,D+3072]
                                                              ─ Linear(D+3072, D) ─ L2 ─> [B,D]

The deep path is a headless backbone from ``deepranking.backbones`` (which architectures exist,
their stages, their ``--weights``): F is 512 (resnet18/34), 2048 (resnet50/101/152), 256
(``small-cnn``: a VGG-style net for small images trained from scratch, the CPU recipe's deep
path), or the pooled feature size of any other torchvision classification model or
``timm:<name>`` (768 for convnext_tiny and vit_b_16, 1280 for efficientnet_b0, ...; a ViT is
built for ``image_size``). ``train_from`` freezes the backbone stages before it. The shallow
paths come in three geometries, ``shallow=``:

``"paper"`` (the default) — as in the paper, each path sees the WHOLE image sub-sampled,
4x (path 1) and 8x (path 2); sub-sampling is average pooling (``AvgPool2d(f,
ceil_mode=True)``: every pixel contributes, a partial last row/column is averaged over the
pixels it has), then ``Conv2d(3,96,7,stride=1,padding=3)`` at the sub-sampled scale (the
paper's 8x8 stride-4 kernel, made 7x7 stride 1 so the map keeps the sub-sampled size: at
32 px the 8x path's 4x4 image still fills the 4x4 grid), then max pooling to
the fixed 4x4 grid (exact ``max_pool2d`` windows when the map side is a multiple of 4,
which is deterministic on CUDA; adaptive windows otherwise)::

    S=32:  path 1  avg/4 [B,3,8,8]   ─ conv7 [B,96,8,8]   ─ max 2x2   ─ [B,96,4,4]
           path 2  avg/8 [B,3,4,4]   ─ conv7 [B,96,4,4]   ─ max 1x1   ─ [B,96,4,4]
    S=64:  path 1  avg/4 [B,3,16,16] ─ conv7 [B,96,16,16] ─ max 4x4   ─ [B,96,4,4]
           path 2  avg/8 [B,3,8,8]   ─ conv7 [B,96,8,8]   ─ max 2x2   ─ [B,96,4,4]
    S=224: path 1  avg/4 [B,3,56,56] ─ conv7 [B,96,56,56] ─ max 14x14 ─ [B,96,4,4]
           path 2  avg/8 [B,3,28,28] ─ conv7 [B,96,28,28] ─ max 7x7   ─ [B,96,4,4]

  Every input pixel reaches each path's output: while a max window is at most 4 conv
  positions wide (path 1 up to 64 px, path 2 up to 128 px) every position of some window
  sees the pixel (7 >= 2*4 - 1), so it does for every image; beyond that (224 px path 1:
  14x14 windows) max pooling keeps one winner per window and channel, and a pixel whose
  7x7 neighbourhood wins in none of the 96 channels gets no gradient from that image
  (0.03-0.3% of the pixels of a random image at 224 px; none over a few images).
  2 x 14,208 parameters (the classic paths: 2 x 18,528).

``"classic"`` — the classic TinyImageNet ports' geometry, kept so their checkpoints load
unchanged: ``Conv2d(3,96,8,s16,p1)`` and ``Conv2d(3,96,8,s32,p4)`` on the full image,
then ``AdaptiveMaxPool2d(4)``. The strides skip pixels: only 24.6% and 6.2% of them ever
reach these paths, and at 32 px both maps are 2x2, so each 1536-d vector holds 384
distinct values. The classic code pools with FIXED windows (a 4x4 grid only for 198-255 px
inputs); adaptive pooling works at any size but, even at 224 px, uses other windows
than the classic fixed pools, so weights trained with the fixed pools embed differently here.

``"none"`` — the deep path alone: forward returns ``L2(Linear(F, D))`` (``multiscale=False``).

What a checkpoint stores of a model (``checkpoint.model_record``: weights, ``model_config``,
the preprocessing record) lives in ``deepranking.checkpoint``; :func:`model_from_checkpoint`
rebuilds the net from it (files written before ``shallow`` existed rebuild as ``"classic"``, or
``"none"`` without multiscale).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepranking.backbones import (check_state_dict, check_train_from, freeze, frozen_names, headless_backbone,
                                   load_backbone_weights)
from deepranking import checkpoint
from deepranking.checkpoint import strip_wrapper_prefixes
from deepranking.cli import UserError
from deepranking.preprocessing import Preprocessing

SHALLOW_CHANNELS = 96
SHALLOW_GRID = 4
SHALLOW_DIM = SHALLOW_CHANNELS * SHALLOW_GRID * SHALLOW_GRID  # 1536 per shallow path
SHALLOW_MODES = ("paper", "classic", "none")  # geometry of the shallow paths (module docstring)
DEFAULT_SHALLOW = "paper"
PAPER_SUBSAMPLE = (4, 8)  # "paper": sub-sampling factor of path 1 and path 2
PAPER_KERNEL = 7  # "paper": conv kernel side at the sub-sampled scale (stride 1, "same" padding)


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


def resolve_shallow(shallow: str | None, multiscale: bool | None = None) -> str:
    """The shallow-path geometry of ``shallow`` / ``multiscale`` (the older switch).

    ``shallow`` None: ``multiscale`` False -> "none", else the default "paper".
    Both given must agree (multiscale=False goes only with "none").
    """
    if shallow is None:
        return "none" if multiscale is not None and not multiscale else DEFAULT_SHALLOW
    if shallow not in SHALLOW_MODES:
        raise UserError(f"unknown shallow paths {shallow!r} (choose from {', '.join(SHALLOW_MODES)})")
    if multiscale is not None and bool(multiscale) != (shallow != "none"):
        raise UserError(f"multiscale={bool(multiscale)} contradicts shallow={shallow!r} "
                        "(multiscale=False is shallow='none'; give shallow alone)")
    return shallow


def config_shallow(cfg: dict) -> str:
    """The shallow paths of a checkpoint's model_config; files without ``shallow`` predate "paper":
    multiscale True was the classic geometry, False none."""
    if "shallow" in cfg:
        if cfg["shallow"] not in SHALLOW_MODES:
            raise UserError(f"checkpoint model_config has unknown shallow paths {cfg['shallow']!r}")
        return cfg["shallow"]
    try:
        return "classic" if bool(cfg["multiscale"]) else "none"
    except (KeyError, TypeError) as exc:
        raise UserError(f"checkpoint model_config is incomplete or invalid: {exc!r}")


def _max_pool_grid(z: torch.Tensor, grid: int) -> torch.Tensor:
    """Max pool [B, C, h, w] to [B, C, grid, grid]: exact windows when grid divides h and w
    (max_pool2d, deterministic on CUDA; the same result as adaptive pooling), else adaptive windows."""
    h, w = z.shape[-2:]
    if h % grid == 0 and w % grid == 0:
        return F.max_pool2d(z, (h // grid, w // grid))
    return F.adaptive_max_pool2d(z, grid)


class DeepRankNet(nn.Module):
    """Multi-scale embedding network; forward returns unit-norm [B, embedding_dim].

    ``shallow`` picks the geometry of the two shallow paths (module docstring):
    "paper" (default), "classic" (the classic ports' strided convs, for their
    checkpoints) or "none" (deep path only). ``multiscale`` is the older switch:
    False = "none"; left None (or True) with ``shallow`` None, the paths are "paper".
    ``image_size``: the input side, for backbones built for one (ViTs) and refused at sides they
    cannot run at; None builds a ViT at its default side.
    """

    def __init__(
        self,
        arch: str = "resnet101",
        embedding_dim: int = 4096,
        multiscale: bool | None = None,
        weights: str | None = "none",
        train_from: str = "layer4",
        shallow: str | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        weights = "none" if weights is None else weights  # torchvision's spelling of "no weights"
        shallow = resolve_shallow(shallow, multiscale)
        check_train_from(train_from)
        if int(embedding_dim) < 1:
            raise UserError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.config = {
            "arch": arch,
            "embedding_dim": int(embedding_dim),
            "multiscale": shallow != "none",
            "shallow": shallow,
            "train_from": train_from,
        }
        backbone = headless_backbone(arch, image_size)  # refuses an unknown arch or a size it cannot run at
        frozen = frozen_names(backbone, train_from)  # refuses a blockN it has not, before loading weights
        self.backbone = backbone.module
        self.embed = nn.Linear(backbone.feature_dim, embedding_dim)
        # Created in the same order as before "paper" existed: same seed -> same classic weights.
        if shallow == "classic":
            self.shallow1 = nn.Conv2d(3, SHALLOW_CHANNELS, kernel_size=8, stride=16, padding=1)
            self.shallow2 = nn.Conv2d(3, SHALLOW_CHANNELS, kernel_size=8, stride=32, padding=4)
            self.pool = nn.AdaptiveMaxPool2d(SHALLOW_GRID)
        elif shallow == "paper":
            f1, f2 = PAPER_SUBSAMPLE
            self.subsample1 = nn.AvgPool2d(f1, ceil_mode=True)  # no parameters: state-dict keys as classic
            self.subsample2 = nn.AvgPool2d(f2, ceil_mode=True)
            self.shallow1 = nn.Conv2d(3, SHALLOW_CHANNELS, PAPER_KERNEL, stride=1, padding=PAPER_KERNEL // 2)
            self.shallow2 = nn.Conv2d(3, SHALLOW_CHANNELS, PAPER_KERNEL, stride=1, padding=PAPER_KERNEL // 2)
        if shallow != "none":
            self.fuse = nn.Linear(embedding_dim + 2 * SHALLOW_DIM, embedding_dim)
        if weights != "none":
            load_backbone_weights(self.backbone, arch, weights)
        self._frozen = freeze(self.backbone, frozen)  # the modules kept in eval mode
        self.train()

    def train(self, mode: bool = True):
        """Like nn.Module.train, but frozen stages stay in eval mode so their BN stats never move."""
        super().train(mode)
        for name in self._frozen:
            self.backbone.get_submodule(name).eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def shallow(self) -> str:
        return self.config["shallow"]

    def shallow_paths(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shallow paths' outputs: unit-norm [B, 1536] each (two, or none for "none"); x [B, 3, H, W]."""
        if self.shallow == "none":
            return []
        if self.shallow == "classic":
            # The stride-16 conv needs H, W >= 6; zero padding is the mean colour after normalisation.
            h, w = x.shape[-2:]
            if min(h, w) < 6:
                x = F.pad(x, (0, max(0, 6 - w), 0, max(0, 6 - h)))
            s1 = F.normalize(self.pool(self.shallow1(x)).flatten(1), dim=1)  # [B, 1536]
            s2 = F.normalize(self.pool(self.shallow2(x)).flatten(1), dim=1)  # [B, 1536]
            return [s1, s2]
        out = []
        for subsample, conv in ((self.subsample1, self.shallow1), (self.subsample2, self.shallow2)):
            z = conv(subsample(x))  # [B, 96, ceil(H/f), ceil(W/f)]
            out.append(F.normalize(_max_pool_grid(z, SHALLOW_GRID).flatten(1), dim=1))  # [B, 1536]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, H, W] normalised
        deep = F.normalize(self.embed(self.backbone(x)), dim=1)  # [B, D]
        if self.shallow == "none":
            return deep
        fused = self.fuse(torch.cat([deep, *self.shallow_paths(x)], dim=1))  # [B, D + 3072] -> [B, D]
        return F.normalize(fused, dim=1)


def build_model(*args, **kwargs) -> DeepRankNet:
    """``DeepRankNet(*args, **kwargs)``: the name the programs and benches build the model by
    (arguments in DeepRankNet's order: arch, embedding_dim, multiscale, weights, train_from, shallow, image_size)."""
    return DeepRankNet(*args, **kwargs)


# ----------------------------------------------------------------------------
# Checkpoint <-> model
# ----------------------------------------------------------------------------


def model_from_checkpoint(ckpt: dict, device: Any = "cpu") -> tuple[DeepRankNet, Preprocessing]:
    """Rebuild the model of a loaded checkpoint; returns (model in eval mode, its preprocessing)."""
    cfg = ckpt["model_config"]
    try:
        arch, dim = cfg["arch"], int(cfg["embedding_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"checkpoint model_config is incomplete or invalid: {exc!r}")
    shallow = config_shallow(cfg)  # old files: multiscale True -> "classic", False -> "none"
    spec = checkpoint.checkpoint_preprocessing(ckpt)
    model = DeepRankNet(arch, dim, weights="none", train_from=cfg.get("train_from", "layer4"), shallow=shallow,
                        image_size=spec.image_size)
    state = strip_wrapper_prefixes(ckpt["model"])
    check_state_dict(model.state_dict(), state, arch, "checkpoint weights")
    model.load_state_dict(state)
    return model.to(device).eval(), spec


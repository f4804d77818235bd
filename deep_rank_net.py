"""The Deep Ranking model: the network, its backbone weights, and its rebuilding from a checkpoint.

Model (Wang et al. 2014, "Learning Fine-grained Image Similarity with Deep Ranking")::

    image [B,3,S,S] ─ ResNet (to global avg pool) [B,F] ─ Linear(F, D) ─ L2 ───────────────────┐
                    ├ shallow path 1 ─ [B,96,4,4] ─ flatten [B,1536] ─ L2 ──────────────────────┤ concat
                    └ shallow path 2 ─ [B,96,4,4] ─ flatten [B,1536] ─ L2 ──────────────────────┘ [B,D+3072]
                                                              ─ Linear(D+3072, D) ─ L2 ─> [B,D]

F is 512 (resnet18/34), 2048 (resnet50/101/152) or 256 (``small-cnn``, :class:`SmallCNN`: a
VGG-style net for small images trained from scratch, the CPU recipe's deep path). The ResNet is
torchvision's, its convs leaving out the kernel taps that read only zero padding
(:class:`PaddingSkippingConv2d`: the same sums, half the CPU time of a step at 32 px). The
shallow paths come in three geometries, ``shallow=``:

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

The checkpoint file format lives in ``deepranking.checkpoint`` and the pixel contract in
``deepranking.preprocessing``; this module joins them: :func:`model_record` is what a
checkpoint stores of a model, :func:`model_from_checkpoint` rebuilds it (files written
before ``shallow`` existed rebuild as ``"classic"``, or ``"none"`` without multiscale).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepranking.checkpoint import (CHECKPOINT_FORMAT, first_line, read_torch_file, strip_wrapper_prefixes,
                                    unwrap_model)
from deepranking.cli import UserError
from deepranking.preprocessing import Preprocessing

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # torchvision's, ImageNet weights exist
SMALL_CNN = "small-cnn"  # SmallCNN: a from-scratch net for small images (28-64 px), no pretrained weights
ARCHITECTURES = RESNETS + (SMALL_CNN,)
SMALL_CNN_WIDTH = 32  # channels of its first stage; stages have w, 2w, 4w, 8w (features [B, 256])
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


def conv_tap_range(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int, int] | None:
    """Along one side of a zero-padded conv: (first tap, last tap + 1, padding left) of the kernel
    taps that read the input somewhere, when the others can be left out with the same output
    positions; None when every tap reads input (or leaving taps out would move the outputs).

    A tap t reads input at j*stride - padding + t*dilation for the outputs j = 0..out-1; e.g. a
    3x3 conv with padding 1 on a 1x1 map reads the input with its centre tap only: (1, 2, 0).
    """
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        return None

    def reads_input(t: int) -> bool:
        first = max(0, -(-(padding - t * dilation) // stride))  # first j with position >= 0
        last = min(out - 1, (size - 1 + padding - t * dilation) // stride)  # last j with position < size
        return first <= last

    used = [t for t in range(kernel) if reads_input(t)]
    if not used or len(used) == kernel or used != list(range(used[0], used[-1] + 1)):
        return None
    first, stop = used[0], used[-1] + 1
    new_padding = padding - first * dilation
    new_out = (size + 2 * new_padding - dilation * (stop - 1 - first) - 1) // stride + 1
    if new_padding < 0 or new_out != out:
        return None
    return first, stop, new_padding


class PaddingSkippingConv2d(nn.Conv2d):
    """nn.Conv2d that leaves out the kernel taps which, at this input size, read only zero padding.

    Why: those taps add exact zeros, yet they are not free. At 32 px input ResNet's layer4 maps
    are 1x1, and oneDNN's weight gradient of a 3x3 conv there is pathologically slow on AVX2
    CPUs: 178 ms vs 12 ms for its centre tap alone ([96,512,1,1], 2 cores), most of a training
    step. The output is the same sum without its zero terms (bit-identical here) and the
    left-out taps' gradient is exactly 0 either way; the other taps' gradients are summed in
    another order (differences ~1e-7), so runs before and after this class differ in the last
    bits. Weights and state-dict keys are the nn.Conv2d's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        crops = [conv_tap_range(n, k, s, p, d) for n, k, s, p, d in
                 zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)]
        if crops == [None, None]:
            return super().forward(x)
        (h0, h1, ph), (w0, w1, pw) = [c or (0, k, p) for c, k, p in zip(crops, self.kernel_size, self.padding)]
        weight = self.weight[:, :, h0:h1, w0:w1]  # [O, C/groups, kh', kw']
        return F.conv2d(x, weight, self.bias, self.stride, (ph, pw), self.dilation, self.groups)


def headless_resnet(arch: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier: (module mapping [B,3,H,W] to pooled [B,F], F).

    Its convs skip the taps that read only padding (PaddingSkippingConv2d): the class is swapped
    in place, so the parameters, their seeded initial values and the state-dict keys are
    torchvision's own.
    """
    import torchvision

    backbone = getattr(torchvision.models, arch)(weights=None)
    feature_dim = backbone.fc.in_features  # 512 or 2048
    backbone.fc = nn.Identity()  # backbone(x) -> pooled features [B, F]
    for module in backbone.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = PaddingSkippingConv2d
    return backbone, feature_dim


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """A VGG-style net for small images, trained from scratch: [B, 3, S, S] -> pooled [B, 8w].

    Why: a ResNet's ImageNet stem (7x7 stride-2 conv, then max pool) brings a 32 px image down
    to 8x8 before the first block, and its layer4 runs on 1x1 maps. This net keeps the full
    resolution in its first stage, at about the FLOPs of resnet18 at 32 px (~43 M an image at
    32 px, w = 32; 0.58 M parameters against 11 M), and on Fashion-MNIST from scratch it
    generalises better from 5,000 images (RESULTS.md section 5). Its children carry a ResNet's
    stage names, so ``train_from`` freezes the same way::

        conv1 + bn1 + relu   3x3 conv 3 -> w        [B, w, S, S]   (no stride, no max pool)
        layer1               3x3 conv w -> w        [B, w, S, S]
        layer2   max pool 2, 3x3 convs -> 2w, 2w    [B, 2w, S/2, S/2]
        layer3   max pool 2, 3x3 convs -> 4w, 4w    [B, 4w, S/4, S/4]
        layer4   max pool 2, 3x3 conv  -> 8w        [B, 8w, S/8, S/8]
        global average pool                         [B, 8w]

    Every conv is followed by BatchNorm and ReLU. At 224 px it works too (~2.1 GFLOPs). The width
    is fixed (``SMALL_CNN_WIDTH``), not a flag: checkpoints record only the name "small-cnn".
    """

    def __init__(self, width: int = SMALL_CNN_WIDTH):
        super().__init__()
        w = int(width)
        self.conv1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(*_conv_bn_relu(w, w))
        self.layer2 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(w, 2 * w), *_conv_bn_relu(2 * w, 2 * w))
        self.layer3 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(2 * w, 4 * w), *_conv_bn_relu(4 * w, 4 * w))
        self.layer4 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(4 * w, 8 * w))
        self.feature_dim = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # [B, w, S, S]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 8w, S/8, S/8]
        return x.mean(dim=(2, 3))  # [B, 8w]


def headless_backbone(arch: str) -> tuple[nn.Module, int]:
    """The deep path's network for ``arch``: (module mapping [B,3,H,W] to pooled [B,F], F)."""
    if arch == SMALL_CNN:
        net = SmallCNN()
        return net, net.feature_dim
    return headless_resnet(arch)


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
    """

    def __init__(
        self,
        arch: str = "resnet101",
        embedding_dim: int = 4096,
        multiscale: bool | None = None,
        weights: str | None = "none",
        train_from: str = "layer4",
        shallow: str | None = None,
    ):
        super().__init__()
        weights = "none" if weights is None else weights  # torchvision's spelling of "no weights"
        shallow = resolve_shallow(shallow, multiscale)
        if arch not in ARCHITECTURES:
            raise UserError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
        if train_from not in TRAIN_FROM_STAGES:
            raise UserError(f"unknown train_from stage {train_from!r} (choose from {', '.join(TRAIN_FROM_STAGES)})")
        if int(embedding_dim) < 1:
            raise UserError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.config = {
            "arch": arch,
            "embedding_dim": int(embedding_dim),
            "multiscale": shallow != "none",
            "shallow": shallow,
            "train_from": train_from,
        }
        self.backbone, feature_dim = headless_backbone(arch)
        self.embed = nn.Linear(feature_dim, embedding_dim)
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


def build_model(
    arch: str = "resnet101",
    embedding_dim: int = 4096,
    multiscale: bool | None = None,
    weights: str | None = "none",
    train_from: str = "layer4",
    shallow: str | None = None,
) -> DeepRankNet:
    """Same as DeepRankNet(...); the name scripts use (multiscale True/None + shallow None = "paper")."""
    return DeepRankNet(arch, embedding_dim, multiscale, weights, train_from, shallow=shallow)


def frozen_module_names(train_from: str) -> list[str]:
    """Backbone child modules frozen when training from ``train_from``."""
    stop = TRAIN_FROM_STAGES.index(train_from)
    return [m for stage in TRAIN_FROM_STAGES[:stop] for m in _STAGE_MODULES[stage]]


# ----------------------------------------------------------------------------
# Pretrained backbone weights
# ----------------------------------------------------------------------------


def check_weights(arch: str, weights: str | None) -> None:
    """Refuse ``weights`` "imagenet" for an architecture that has none (small-cnn). Programs call it
    with their other flag checks, before any long work; building the model checks again."""
    if weights == "imagenet" and arch not in RESNETS:
        raise UserError(f"there are no ImageNet weights for {arch}: use --weights none (from scratch) or "
                        f"--weights PATH (a state dict of a {arch} backbone, or a checkpoint that has one)")


def imagenet_weights(arch: str):
    """torchvision's best ImageNet weights enum for ``arch`` (e.g. ResNet101_Weights.IMAGENET1K_V2)."""
    import torchvision

    check_weights(arch, "imagenet")
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
        raise UserError(f"cached ImageNet weights {target} are corrupt ({first_line(exc)}); delete the file and retry {offline_hint}")


def load_backbone_weights(backbone: nn.Module, arch: str, weights: str) -> None:
    """Load ``weights`` ("imagenet" or a state-dict path) into a headless backbone (a ResNet's fc is Identity)."""
    check_weights(arch, weights)
    if weights == "imagenet":
        state, source = _download_imagenet_state_dict(arch), f"ImageNet weights for {arch}"
    else:
        obj = read_torch_file(weights, "weights file")
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
    """Name the backbone a state dict came from: a ResNet from its blocks per layer, or small-cnn
    (whose layers hold bare convs, ``layer1.0.weight``, where a ResNet's hold blocks); None if unknown."""
    keys = [k[len(prefix):] for k in state if k.startswith(prefix)]
    if any(k.startswith("backbone.") for k in keys):
        keys = [k[len("backbone."):] for k in keys if k.startswith("backbone.")]
    if "layer1.0.weight" in keys:
        return SMALL_CNN
    blocks = []
    for layer in range(1, 5):
        idx = {k.split(".")[1] for k in keys if k.startswith(f"layer{layer}.")}
        blocks.append(len(idx))
    bottleneck = any(".conv3." in k for k in keys)
    return _ARCH_LAYOUT.get((tuple(blocks), bottleneck))


# ----------------------------------------------------------------------------
# Checkpoint <-> model
# ----------------------------------------------------------------------------


def model_record(model: nn.Module, spec: Preprocessing) -> dict:
    """What a checkpoint stores of a model: weights, architecture and the pixels it was trained on."""
    plain = unwrap_model(model)
    return {"model": strip_wrapper_prefixes(plain.state_dict()),
            "model_config": {**plain.config, "image_size": int(spec.image_size)},
            "preprocessing": spec.to_dict()}


def checkpoint_preprocessing(ckpt: dict) -> Preprocessing:
    """The checkpoint's pixel contract. Version-1 files have none: cache_size 0 = choose from the images."""
    if isinstance(ckpt.get("preprocessing"), dict):
        return Preprocessing.from_dict(ckpt["preprocessing"])
    try:
        image_size = int(ckpt["model_config"]["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"checkpoint model_config is incomplete or invalid: {exc!r}")
    return Preprocessing(image_size=image_size, cache_size=0)


def model_from_checkpoint(ckpt: dict, device: Any = "cpu") -> tuple[DeepRankNet, Preprocessing]:
    """Rebuild the model of a loaded checkpoint; returns (model in eval mode, its preprocessing)."""
    cfg = ckpt["model_config"]
    try:
        arch, dim = cfg["arch"], int(cfg["embedding_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"checkpoint model_config is incomplete or invalid: {exc!r}")
    shallow = config_shallow(cfg)  # old files: multiscale True -> "classic", False -> "none"
    spec = checkpoint_preprocessing(ckpt)
    model = DeepRankNet(arch, dim, weights="none", train_from=cfg.get("train_from", "layer4"), shallow=shallow)
    state = strip_wrapper_prefixes(ckpt["model"])
    _check_state_dict(model.state_dict(), state, arch, "checkpoint weights")
    model.load_state_dict(state)
    return model.to(device).eval(), spec


# ----------------------------------------------------------------------------
# Reference features (no training): the rows a trained model is compared with
# ----------------------------------------------------------------------------

FEATURE_KINDS = ("model", "pixels", "backbone")  # gen_embeddings.py --features
# Raw pixels: the image at 32 x 32 (3,072 values, fewer than the paper's 4,096-d embedding), the
# smallest size train_net.py accepts — so the pixel row sees the same pixels as a model trained at
# 32 px, and the kNN over it stays cheap; a small image also blurs away pixel-level noise.
PIXEL_SIZE = 32
BACKBONE_IMAGE_SIZE = 224  # the input size torchvision's ImageNet weights were trained at
# Pixel values as they are (0..255): preprocess subtracts mean*255 and divides by std*255.
RAW_MEAN = (0.0, 0.0, 0.0)
RAW_STD = (1 / 255, 1 / 255, 1 / 255)


class PixelFeatures(nn.Module):
    """The net input flattened: [B, 3, S, S] -> [B, 3*S*S] (embed_images then L2-normalises).

    With ``pixel_preprocessing`` (mean 0, std 1/255) the input is the raw 0..255 RGB values.
    """

    def __init__(self, image_size: int):
        super().__init__()
        self.config = {"features": "pixels", "embedding_dim": 3 * int(image_size) ** 2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float()


class BackboneFeatures(nn.Module):
    """A backbone's global-average-pooled features [B, F] (a ResNet: F = 512 or 2048), no head."""

    def __init__(self, arch: str = "resnet18", weights: str = "imagenet"):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise UserError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
        backbone, feature_dim = headless_backbone(arch)
        if weights != "none":
            load_backbone_weights(backbone, arch, weights)
        self.backbone = backbone
        self.config = {"features": "backbone", "arch": arch, "weights": str(weights), "embedding_dim": feature_dim}
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def pixel_preprocessing(image_size: int = PIXEL_SIZE, cache_size: int | None = None) -> Preprocessing:
    """The pixels of the raw-pixel row: cached at ``cache_size`` (default = image size), raw values."""
    return Preprocessing(image_size=int(image_size), cache_size=int(cache_size or image_size),
                         mean=RAW_MEAN, std=RAW_STD)


def reference_features(kind: str, arch: str = "resnet18", weights: str = "imagenet",
                       image_size: int | None = None, cache_size: int | None = None,
                       device: Any = "cpu") -> tuple[nn.Module, Preprocessing]:
    """(feature extractor in eval mode, its preprocessing) for ``kind`` "pixels" or "backbone".

    pixels: ``image_size`` default PIXEL_SIZE, raw values; backbone: default BACKBONE_IMAGE_SIZE,
    ImageNet normalisation (what the ImageNet weights expect). The cache side defaults to the
    image size. The Preprocessing is explicit, like a checkpoint's.
    """
    if kind == "pixels":
        size = int(image_size or PIXEL_SIZE)
        return PixelFeatures(size).to(device).eval(), pixel_preprocessing(size, cache_size)
    if kind == "backbone":
        size = int(image_size or BACKBONE_IMAGE_SIZE)
        return (BackboneFeatures(arch, weights).to(device).eval(),
                Preprocessing(image_size=size, cache_size=int(cache_size or size)))
    raise UserError(f"unknown reference features {kind!r} (choose pixels or backbone)")


def feature_record(model: nn.Module, spec: Preprocessing) -> dict:
    """What identifies reference features, in a checkpoint's shape: weights, config and pixels."""
    return {"model": model.state_dict(), "model_config": dict(model.config), "preprocessing": spec.to_dict(),
            "step": None, "epoch": None}

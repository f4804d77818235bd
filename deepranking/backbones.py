"""The deep path's backbones: which exist, how to build one headless, its stages, its weights.

A backbone maps a normalised image [B, 3, H, W] to pooled features [B, F], with no classifier:

* torchvision's ResNets (``RESNETS``; F = 512 for resnet18/34, 2048 for resnet50/101/152), their
  convs leaving out the kernel taps that read only zero padding (:class:`PaddingSkippingConv2d`:
  the same sums, half the CPU time of a training step at 32 px);
* ``"small-cnn"`` (:class:`SmallCNN`; F = 256): a VGG-style net for small images, trained from scratch.

Every backbone has the stages ``conv1``, ``layer1`` .. ``layer4`` as child modules;
``train_from`` names the first stage that trains (``TRAIN_FROM_STAGES``, ``frozen_module_names``).
Weights (``--weights``): ``"imagenet"`` (torchvision's best, through torch.hub's cache, with a
one-line message saying where to put the file when offline), ``"none"``, or a file: a state dict
of the backbone, possibly wrapped, or a deep-ranking checkpoint whose backbone is reused
(``load_backbone_weights``). A file of another backbone is named in the error (``guess_arch``).

The model (``deep_rank_net.DeepRankNet``) and the no-training reference features
(``deepranking.reference_features``) build their backbones here.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepranking.checkpoint import CHECKPOINT_FORMAT, first_line, read_torch_file, strip_wrapper_prefixes
from deepranking.cli import UserError

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


# ----------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------


def check_arch(arch: str) -> None:
    """Refuse an architecture that is not one of ``ARCHITECTURES``."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")


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


# ----------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------


def frozen_module_names(train_from: str) -> list[str]:
    """Backbone child modules frozen when training from ``train_from``."""
    stop = TRAIN_FROM_STAGES.index(train_from)
    return [m for stage in TRAIN_FROM_STAGES[:stop] for m in _STAGE_MODULES[stage]]


# ----------------------------------------------------------------------------
# Weights
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
    check_state_dict(backbone.state_dict(), state, arch, source, ignore_prefix="fc.")
    backbone.load_state_dict(state, strict=False)  # only the Identity fc (no params) is left out


def check_state_dict(expected: dict, got: dict, arch: str, source: str, ignore_prefix: str = "\0") -> None:
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

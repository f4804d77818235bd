"""The deep path's backbones: which exist, how to build one headless, its stages, its weights.

A backbone maps a normalised image [B, 3, H, W] to one vector per image [B, F], with no
classifier (``headless_backbone`` -> :class:`Backbone`). ``--arch`` names one of:

* ``"small-cnn"`` (:class:`SmallCNN`; F = 256): a VGG-style net for small images, trained from scratch;
* any torchvision classification model (``torchvision_architectures()``: resnet18..152, resnext*,
  wide_resnet*, convnext_*, efficientnet_*, mobilenet_*, regnet_*, densenet*, vgg*, swin_*, vit_*, ...)
  with its classifier taken off (``_remove_classifier``): its globally pooled features (ViTs: the
  class token; ConvNeXt and MaxViT: pooled and layer-normalised, as their classifiers read them).
  The ResNets' convs leave out the kernel taps that read only zero padding
  (:class:`PaddingSkippingConv2d`: the same sums, half the CPU time of a training step at 32 px);
* ``"timm:<name>"``: a timm model built with ``num_classes=0`` (its pooled pre-logits features),
  when the optional ``timm`` package is installed (``pip install timm``).

Pixels (``backbone_preprocessing``): every backbone sees the project's pixels (the image squashed
to a square, bilinear: ``deepranking.preprocessing``), normalised with the mean and std of its own
pretrained weights (torchvision: ``weights.transforms()``; timm: its pretrained config) whatever
``--weights`` is, so a scratch run and a pretrained one see the same input. The weights' eval
crop (e.g. resize 256, centre crop 224) and bicubic filter are not copied: a retrieval image
keeps its borders, as open-metric-learning's retrieval transforms keep them, and one rule serves
every backbone, the shallow paths and the image cache alike. The weights' input side is the
default side of the no-training reference features (``native_image_size``). A ViT takes any
side that is a multiple of its patch: it is built at ``--image-size`` and pretrained position
embeddings are interpolated (bicubic) to that grid, with a warning. A side some backbone cannot
run at (MaxViT's window grid, Inception's 75 px minimum) is refused in one line when it is built.

Stages (``--train-from``): ``train_from`` names the first stage that trains; the stages before it
are frozen, their BatchNorm statistics too (``frozen_names``, ``freeze``). ResNet's stages are its
modules; every other convnet's are its blocks grouped by the stride of their output, as ResNet's
stages are (conv1: the stem and anything at stride <= 2; layer1 .. layer4: strides 4, 8, 16, 32;
a normalisation after the last block goes with layer4). For example (``_STRIDE_UNITS``)::

    backbone             conv1            layer1          layer2          layer3          layer4
    resnet*, resnext*    conv1, bn1       layer1          layer2          layer3          layer4
    small-cnn            conv1, bn1       layer1          layer2          layer3          layer4
    efficientnet_b0      features.0-1     features.2      features.3      features.4-5    features.6-8
    mobilenet_v3_small   features.0       features.1      features.2-3    features.4-8    features.9-12
    regnet_y_400mf       stem             trunk_output.block1 .. block4, one stage each
    convnext_tiny        features.0       features.1      features.2-3    features.4-5    features.6-7, classifier
    densenet121          conv0, norm0     denseblock1     transition1-    transition2-    transition3-
                                                          denseblock2     denseblock3     denseblock4, norm5
    swin_t (by hand)     features.0       features.1      features.2-3    features.4-5    features.6-7, norm
    vit_b_16 (12 blocks) conv_proj, class_token, encoder.pos_embedding | blocks 0-2 | 3-5 | 6-8 | 9-11, encoder.ln

(ConvNeXt's ``classifier`` is its LayerNorm, what is left of it headless; DenseNet's are
``features.*``.) Strides are counted back from the deepest block, so a net whose last blocks work
at stride 16 (VGG, SqueezeNet, AlexNet) has them as layer4 all the same.

A ViT-style backbone (torchvision's ViTs, timm's models whose blocks all work at one stride) has
no strides to group by: its transformer blocks are split into four equal runs, and it also takes
``blockN``: the patch embedding and blocks 0 .. N-1 frozen. A timm convnet's stages are timm's own
coarse parameter groups (``group_matcher``, the stem first) placed by the reduction of its
``feature_info``. A stage may be empty (ShuffleNet has nothing at stride 4).

Weights (``--weights``): ``"imagenet"`` (torchvision's best, ``weights.DEFAULT``, through torch.hub's
cache, with a one-line message naming the file to place when offline; timm: its default pretrained
tag through the Hugging Face hub), ``"none"``, or a file: a state dict of the backbone, possibly
wrapped, or a deep-ranking checkpoint whose backbone is reused (``load_backbone_weights``); the
classifier's weights in it are left out. A file of another torchvision backbone is named in the
error (``guess_arch``).

The model (``deep_rank_net.DeepRankNet``) and the no-training reference features
(``deepranking.reference_features``) build their backbones here.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import itertools
import math
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepranking import cli
from deepranking.checkpoint import CHECKPOINT_FORMAT, first_line, read_torch_file, strip_wrapper_prefixes
from deepranking.cli import UserError
from deepranking.preprocessing import Preprocessing

SMALL_CNN = "small-cnn"  # SmallCNN: a from-scratch net for small images (28-64 px), no pretrained weights
TIMM_PREFIX = "timm:"  # --arch timm:<name>: a timm model (the timm package is optional)
SMALL_CNN_WIDTH = 32  # channels of its first stage; stages have w, 2w, 4w, 8w (features [B, 256])
# Stages in forward order; train_from=X trains X and everything after it ("head": the heads alone).
TRAIN_FROM_STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4", "head")
STAGES = TRAIN_FROM_STAGES[:-1]  # the stages that hold backbone weights
BLOCK_PATTERN = re.compile(r"block(\d+)")  # --train-from blockN (ViT-style backbones)
MEASURE_SIZE = 224  # side a backbone whose weights name none (a timm model with no pretrained config) is checked at
HOW_TO_LIST = ("small-cnn, a torchvision classification model such as resnet18, convnext_tiny, efficientnet_b0 or "
               "vit_b_16 (list them: python -c \"import torchvision; print(torchvision.models.list_models("
               "module=torchvision.models))\"), or timm:<name> with timm installed (timm.list_models())")
_RESNET_STAGES = {  # backbone modules of each stage of a ResNet (and of small-cnn, which names its children alike)
    "conv1": ("conv1", "bn1"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
}
# Stages given by hand, where the outputs' layout hides the stride (Swin's maps are [B, H, W, C]).
_FIXED_STAGES = {
    "swin_transformer": {"conv1": ("features.0",), "layer1": ("features.1",), "layer2": ("features.2", "features.3"),
                         "layer3": ("features.4", "features.5"), "layer4": ("features.6", "features.7", "norm")},
}
# Each torchvision family's blocks in forward order, grouped into stages by their output stride
# ("x.*": the children of x; "*": the top-level children).
_STRIDE_UNITS = {
    "alexnet": ("features.*",), "vgg": ("features.*",), "squeezenet": ("features.*",), "densenet": ("features.*",),
    "efficientnet": ("features.*",), "mobilenetv2": ("features.*",), "mobilenetv3": ("features.*",),
    "mnasnet": ("layers.*",), "convnext": ("features.*", "classifier"), "regnet": ("stem", "trunk_output.*"),
    "maxvit": ("stem", "blocks.*", "classifier"), "shufflenetv2": ("*",), "googlenet": ("*",), "inception": ("*",),
}
# Top-level names of classifiers: a weights file's keys under them that the headless model lacks are left out.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "heads.", "aux1.", "aux2.", "AuxLogits.")
_RESIZED_KEYS = ("encoder.pos_embedding",)  # a ViT's: interpolated to the model's patch grid when loaded
# torchvision's DenseNet files name some layers "norm.1" where the modules are now "norm1".
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


@dataclass
class Backbone:
    """A headless backbone and what the model needs to know of it."""

    arch: str
    module: nn.Module  # [B, 3, H, W] normalised -> [B, feature_dim]
    feature_dim: int
    stages: dict  # stage name (STAGES) -> tuple of names of modules or parameters in ``module``
    blocks: tuple = field(default_factory=tuple)  # ViT-style: each block's names, in order (train_from blockN)


# ----------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------


def torchvision_architectures() -> list[str]:
    """torchvision's classification models (resnet18, convnext_tiny, vit_b_16, ...), sorted."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("--arch timm:... needs the timm package: pip install timm")
    return timm


def check_arch(arch: str) -> None:
    """Refuse an architecture that is not small-cnn, a torchvision classification model or timm:<model>."""
    if arch == SMALL_CNN:
        return
    if is_timm(arch):
        name = arch[len(TIMM_PREFIX):]
        if not _timm().is_model(name):
            raise UserError(f"unknown timm model {name!r} (list them: python -c \"import timm; "
                            f"print(timm.list_models())\")")
        return
    names = torchvision_architectures()
    if arch not in names:
        close = difflib.get_close_matches(arch, names + [SMALL_CNN], n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserError(f"unknown architecture {arch!r}{hint}: use {HOW_TO_LIST}")


def check_train_from(train_from: str) -> None:
    """Refuse a ``train_from`` that is neither a stage (TRAIN_FROM_STAGES) nor blockN."""
    if train_from not in TRAIN_FROM_STAGES and not BLOCK_PATTERN.fullmatch(train_from):
        raise UserError(f"unknown train_from stage {train_from!r} (choose from {', '.join(TRAIN_FROM_STAGES)}, "
                        f"or blockN for a ViT-style backbone)")


def _family(arch: str) -> str:
    """The torchvision module that builds ``arch`` ("resnet", "vision_transformer", ...); "" for
    small-cnn and timm models."""
    import torchvision

    if arch == SMALL_CNN or is_timm(arch):
        return ""
    return torchvision.models.get_model_builder(arch).__module__.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------


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


def _remove_classifier(family: str, model: nn.Module) -> None:
    """Take the classifier off a torchvision model in place: its forward then returns the pooled features."""
    if family in ("resnet", "regnet", "shufflenetv2", "googlenet", "inception"):
        model.fc = nn.Identity()
    elif family in ("efficientnet", "mobilenetv2", "mobilenetv3", "mnasnet", "densenet"):
        model.classifier = nn.Identity()  # MobileNetV3: the pooled 576/960 features, before its 1024/1280 MLP
    elif family == "convnext":
        model.classifier[2] = nn.Identity()  # keep LayerNorm2d + Flatten
    elif family == "maxvit":
        model.classifier = nn.Sequential(*list(model.classifier)[:3])  # keep pool, flatten, LayerNorm
    elif family == "swin_transformer":
        model.head = nn.Identity()
    elif family == "vision_transformer":
        model.heads = nn.Identity()  # the class token after the final LayerNorm
    elif family in ("vgg", "alexnet"):
        model.avgpool, model.classifier = nn.AdaptiveAvgPool2d(1), nn.Identity()  # global pool, not fc6/fc7
    elif family == "squeezenet":
        model.classifier = nn.AdaptiveAvgPool2d(1)  # the final 1x1 conv is its classifier
    else:
        raise UserError(f"no headless form known for torchvision's {family} models")


def _vit_patch(arch: str, image_size: int | None) -> dict:
    """A torchvision ViT's constructor arguments for ``image_size`` (a multiple of its patch side)."""
    patch = int(arch.rsplit("_", 1)[-1])  # vit_b_16 -> 16
    if image_size is None:
        return {}
    if image_size % patch:
        raise UserError(f"{arch} needs an image size that is a multiple of its {patch} px patches, got {image_size} "
                        f"(e.g. {max(patch, image_size // patch * patch)})")
    return {"image_size": int(image_size)}


def _headless_torchvision(arch: str, image_size: int | None = None) -> nn.Module:
    """torchvision's ``arch`` with random weights and no classifier (a ResNet: :func:`headless_resnet`)."""
    import torchvision

    family = _family(arch)
    if family == "resnet":
        return headless_resnet(arch)[0]
    kwargs = {}
    if family in ("googlenet", "inception"):
        # No auxiliary classifiers; transform_input as torchvision sets it for the ImageNet weights
        # (they were trained on other normalisation; the conversion is fixed, harmless from scratch).
        kwargs = {"aux_logits": False, "init_weights": True, "transform_input": True}
    elif family == "vision_transformer":
        kwargs = _vit_patch(arch, image_size)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    _remove_classifier(family, model)
    return model


def _headless_timm(arch: str, image_size: int | None = None) -> nn.Module:
    """timm's model with random weights and ``num_classes=0`` (pooled pre-logits), at ``image_size``
    where the model takes one (ViTs, Swin), else as timm builds it."""
    timm = _timm()
    name = arch[len(TIMM_PREFIX):]
    if image_size is not None:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, img_size=int(image_size))
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, pretrained=False, num_classes=0)


def _meta_forward(module: nn.Module, size: int, watch: tuple = ()) -> tuple[tuple, dict]:
    """Shapes of a forward of a [1, 3, size, size] image in eval mode on the meta device (no compute, no
    weights copied, no state changed): (output shape, {name: output shape of each module in ``watch``})."""
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors}
    modes = [(m, m.training) for m in module.modules()]
    shapes = {}
    hooks = [module.get_submodule(name).register_forward_hook(
        lambda m, i, out, name=name: shapes.__setitem__(name, tuple(out.shape) if torch.is_tensor(out) else None))
        for name in watch]
    module.eval()
    try:
        with torch.no_grad():
            out = torch.func.functional_call(module, meta, (torch.empty(1, 3, size, size, device="meta"),))
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.training = training
    return tuple(out.shape), shapes


def _check_runs(module: nn.Module, arch: str, image_size: int) -> tuple:
    """The output shape of ``module`` on ``image_size`` px images; UserError if it cannot run at that size."""
    try:
        return _meta_forward(module, image_size)[0]
    except Exception as exc:  # whatever the model's own check or a too-small map raises
        native = native_image_size(arch)
        hint = f"; its pretrained weights are for {native} px" if native else ""
        raise UserError(f"{arch} cannot run on {image_size} px images ({first_line(exc)}){hint}")


def headless_backbone(arch: str, image_size: int | None = None) -> Backbone:
    """The deep path's network for ``arch`` with random (seeded) weights, its feature size and stages.

    ``image_size``: the side it will see: a ViT is built for it, and any backbone that cannot
    run at it is refused (None: a ViT at its default side, no check).
    """
    check_arch(arch)
    if arch == SMALL_CNN:
        net = SmallCNN()
        return Backbone(arch, net, net.feature_dim, dict(_RESNET_STAGES))
    if _family(arch) == "resnet":
        net, dim = headless_resnet(arch)
        return Backbone(arch, net, dim, dict(_RESNET_STAGES))
    net = _headless_timm(arch, image_size) if is_timm(arch) else _headless_torchvision(arch, image_size)
    stages, blocks = _timm_stages(net) if is_timm(arch) else _torchvision_stages(net, arch)
    shape = _check_runs(net, arch, image_size or native_image_size(arch) or MEASURE_SIZE)
    return Backbone(arch, net, int(shape[-1]), stages, blocks)


# ----------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------


def _stride_stage(stride: float) -> str:
    """The stage of a block whose output is ``stride`` times smaller than the image: conv1 up to 2,
    then layer1 .. layer4 for 4, 8, 16 and 32 or more."""
    level = round(math.log2(max(stride, 1.0)))
    return STAGES[min(max(level - 1, 0), len(STAGES) - 1)]


def _quarters(groups: list) -> list[list]:
    """``groups`` in four consecutive runs of (nearly) equal length, for layer1 .. layer4."""
    return [[g for i, g in enumerate(groups) if i * 4 // len(groups) == q] for q in range(4)]


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in itertools.chain(module.parameters(), module.buffers()))


def _units(module: nn.Module, patterns: tuple) -> list[str]:
    """The names of the blocks ``patterns`` select (``_STRIDE_UNITS``) that hold weights, in forward order."""
    names = []
    for pattern in patterns:
        if pattern.endswith("*"):
            parent = pattern[:-2]
            children = (module.get_submodule(parent) if parent else module).named_children()
            names += [f"{parent}.{child}" if parent else child for child, m in children if _has_weights(m)]
        elif _has_weights(module.get_submodule(pattern)):
            names.append(pattern)
    return names


def _torchvision_stages(module: nn.Module, arch: str) -> tuple[dict, tuple]:
    """(stages, blocks) of a headless torchvision model: by hand, by its ViT blocks, or by output stride."""
    family = _family(arch)
    if family in _FIXED_STAGES:
        return {s: tuple(names) for s, names in _FIXED_STAGES[family].items()}, ()
    if family == "vision_transformer":
        blocks = [(f"encoder.layers.{name}",) for name, _ in module.encoder.layers.named_children()]
        runs = _quarters(blocks)
        runs[-1] = runs[-1] + [("encoder.ln",)]
        stages = {"conv1": ("conv_proj", "class_token", "encoder.pos_embedding")}
        stages.update({s: tuple(n for group in run for n in group) for s, run in zip(STAGES[1:], runs)})
        return stages, tuple(blocks)
    units = _units(module, _STRIDE_UNITS[family])
    size = native_image_size(arch)
    _, shapes = _meta_forward(module, size, tuple(units))
    strides = {n: size / shapes[n][-1] for n in units if shapes.get(n) is not None and len(shapes[n]) == 4}
    # A net whose deepest blocks work at stride 16 (VGG, SqueezeNet, AlexNet) has them as layer4 all the same.
    shift = max(1.0, 32 / 2 ** round(math.log2(max(strides.values()))))
    stages = {s: [] for s in STAGES}
    for i, name in enumerate(units):
        stage = "conv1" if i == 0 else _stride_stage(strides[name] * shift) if name in strides else STAGES[-1]
        stages[stage].append(name)
    return {s: tuple(names) for s, names in stages.items()}, ()


def _timm_stages(module: nn.Module) -> tuple[dict, tuple]:
    """(stages, blocks) of a timm model from its coarse parameter groups (``group_matcher``): the stem
    is conv1, the others go by the reduction of the ``feature_info`` module they end at (a group
    between two such modules ends at the next one's); if that tells no strides apart (a ViT) the
    groups are its blocks, in four equal runs."""
    from timm.models import group_parameters

    groups = [tuple(names) for _, names in sorted(group_parameters(module, module.group_matcher(coarse=True)).items())]
    stem, rest = groups[0], groups[1:]
    marks = [(f["module"], f["reduction"]) for f in getattr(module, "feature_info", None) or []]
    reduction = max((r for _, r in marks), default=None)  # groups after the last mark: the tail
    levels = []
    for group in reversed(rest):
        found = [r for mod, r in marks if any(n.startswith(mod + ".") for n in group)]
        reduction = max(found) if found else reduction
        levels.append(reduction)
    levels.reverse()
    stages = {s: [] for s in STAGES}
    stages["conv1"] += stem
    if None in levels or len(set(levels)) < 2:
        for stage, run in zip(STAGES[1:], _quarters(rest)):
            stages[stage] += [n for group in run for n in group]
        blocks = tuple(rest)
    else:
        for group, level in zip(rest, levels):
            stages[_stride_stage(level)] += group
        blocks = ()
    return {s: tuple(names) for s, names in stages.items()}, blocks


def frozen_names(backbone: Backbone, train_from: str) -> list[str]:
    """Names of the backbone's modules and parameters frozen when training from ``train_from``
    (a stage, or blockN for a ViT-style backbone: its patch embedding and blocks 0..N-1)."""
    check_train_from(train_from)
    block = BLOCK_PATTERN.fullmatch(train_from)
    if block is None:
        stop = TRAIN_FROM_STAGES.index(train_from)
        return [m for stage in STAGES[:stop] for m in backbone.stages[stage]]
    n = int(block.group(1))
    if not backbone.blocks:
        raise UserError(f"--train-from {train_from}: {backbone.arch} is not ViT-style; its stages are "
                        f"{', '.join(TRAIN_FROM_STAGES)}")
    if n >= len(backbone.blocks):
        raise UserError(f"--train-from {train_from}: {backbone.arch} has blocks 0 to {len(backbone.blocks) - 1}")
    return [*backbone.stages["conv1"], *(name for group in backbone.blocks[:n] for name in group)]


def freeze(module: nn.Module, names: list[str]) -> list[str]:
    """Stop the gradients of the named modules and parameters of ``module``; returns the modules to
    keep in eval mode: the outermost ones whose every parameter is frozen (BatchNorm statistics,
    dropout and stochastic depth of a frozen stage must not move either)."""
    for name in names:
        try:
            params = list(module.get_submodule(name).parameters())
        except AttributeError:  # a parameter of its parent (a ViT's class token, position embedding)
            params = [module.get_parameter(name)]
        for p in params:
            p.requires_grad_(False)
    outermost = []
    for name, m in module.named_modules():
        params = list(m.parameters())
        if name and params and not any(p.requires_grad for p in params) and \
                not any(name.startswith(o + ".") for o in outermost):
            outermost.append(name)
    return outermost


# ----------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------


def _pretrained_config(arch: str):
    """timm's pretrained config of ``arch`` (its default tag), or None."""
    return _timm().models.get_pretrained_cfg(arch[len(TIMM_PREFIX):])


def native_image_size(arch: str) -> int | None:
    """The side the backbone's pretrained weights see at evaluation (torchvision's crop size, timm's
    input size); None for small-cnn."""
    if arch == SMALL_CNN:
        return None
    if is_timm(arch):
        cfg = _pretrained_config(arch)
        return int(cfg.input_size[-1]) if cfg is not None else None
    return int(imagenet_weights(arch).transforms().crop_size[0])


def backbone_preprocessing(arch: str, image_size: int, cache_size: int) -> Preprocessing:
    """The pixel contract of a model with this backbone: ``image_size`` px from a ``cache_size`` cache,
    normalised with its pretrained weights' mean and std (small-cnn: ImageNet's)."""
    spec = Preprocessing(image_size=int(image_size), cache_size=int(cache_size))
    if arch == SMALL_CNN:
        return spec
    if is_timm(arch):
        cfg = _pretrained_config(arch)
        mean, std = (cfg.mean, cfg.std) if cfg is not None else (spec.mean, spec.std)
    else:
        transforms = imagenet_weights(arch).transforms()
        mean, std = transforms.mean, transforms.std
    return Preprocessing(image_size=spec.image_size, cache_size=spec.cache_size,
                         mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------


def check_weights(arch: str, weights: str | None) -> None:
    """Refuse an unknown ``arch``, and ``weights`` "imagenet" for one that has none (small-cnn, a timm
    model without pretrained weights). Programs call it with their other flag checks, before any
    long work; building the model checks again."""
    check_arch(arch)
    if weights != "imagenet":
        return
    if arch == SMALL_CNN or (is_timm(arch) and _pretrained_config(arch) is None):
        raise UserError(f"there are no ImageNet weights for {arch}: use --weights none (from scratch) or "
                        f"--weights PATH (a state dict of a {arch} backbone, or a checkpoint that has one)")


def imagenet_weights(arch: str):
    """torchvision's best ImageNet weights enum for ``arch`` (e.g. ResNet101_Weights.IMAGENET1K_V2)."""
    import torchvision

    check_weights(arch, "imagenet")
    if is_timm(arch):
        raise UserError(f"{arch} takes its pretrained weights from timm, not torchvision")
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


def _load_timm_pretrained(module: nn.Module, arch: str) -> None:
    """timm's default pretrained weights for ``module`` (through the Hugging Face hub's cache)."""
    from timm.models import load_pretrained

    name = arch[len(TIMM_PREFIX):]
    filter_fn = getattr(sys.modules[type(module).__module__], "checkpoint_filter_fn", None)
    try:
        load_pretrained(module, pretrained_cfg=module.pretrained_cfg, num_classes=0, filter_fn=filter_fn)
    except (OSError, RuntimeError, ValueError) as exc:  # no network, no such file, a corrupt download
        hub = module.pretrained_cfg.get("hf_hub_id") or module.pretrained_cfg.get("url")
        raise UserError(f"cannot load the pretrained weights of {arch} from {hub} ({first_line(exc)}); without "
                        f"internet, save torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), PATH) "
                        f"where it can download and use --weights PATH (--weights none trains from scratch)")


def _read_weights_file(path: str) -> dict:
    """The backbone state dict in a weights file: plain, wrapped ({"state_dict"|"model": ...}, DDP or
    compile prefixes) or a deep-ranking checkpoint's backbone."""
    obj = read_torch_file(path, "weights file")
    if isinstance(obj, dict) and CHECKPOINT_FORMAT == obj.get("format"):
        obj = obj["model"]  # a deep-ranking checkpoint: reuse its backbone
    elif isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights file {path} is not a state dict of tensors")
    state = strip_wrapper_prefixes(obj)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _fit_state(module: nn.Module, arch: str, state: dict, source: str) -> dict:
    """``state`` as ``module`` takes it: classifier weights left out, DenseNet's old key names renamed,
    a ViT's position embeddings interpolated to the model's patch grid (timm: its checkpoint filter)."""
    if is_timm(arch):
        filter_fn = getattr(sys.modules[type(module).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, module)
    elif _family(arch) == "densenet":  # torchvision's files predate its module names
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(_CLASSIFIER_PREFIXES)}
    key = _RESIZED_KEYS[0]
    if not is_timm(arch) and key in state and key in expected and state[key].shape != expected[key].shape:
        from torchvision.models.vision_transformer import interpolate_embeddings

        before = int(math.isqrt(state[key].shape[1] - 1))
        state = dict(interpolate_embeddings(module.image_size, module.patch_size, state))
        after = module.image_size // module.patch_size
        cli.warn(f"{source}: {arch}'s position embeddings interpolated from {before}x{before} to {after}x{after} "
                 f"patches ({module.image_size} px images)")
    return state


def load_backbone_weights(module: nn.Module, arch: str, weights: str) -> None:
    """Load ``weights`` ("imagenet" or a state-dict path) into a headless backbone module."""
    check_weights(arch, weights)
    if weights == "imagenet" and is_timm(arch):
        _load_timm_pretrained(module, arch)
        return
    if weights == "imagenet":
        state, source = _download_imagenet_state_dict(arch), f"ImageNet weights for {arch}"
    else:
        state, source = _read_weights_file(weights), f"weights file {weights}"
    state = _fit_state(module, arch, state, source)
    check_state_dict(module.state_dict(), state, arch, source)
    module.load_state_dict(state)


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


# ----------------------------------------------------------------------------
# Naming the backbone of a state dict
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _regnet_widths_on_cpu():
    """RegNet computes its block widths with tensors it reads back as numbers, which the meta device
    cannot give: compute them on the CPU while the rest of the model is built on the meta device."""
    from torchvision.models import regnet

    original = regnet.BlockParams.__dict__["from_init_params"]  # the classmethod object

    def on_cpu(*args, **kwargs):
        with torch.device("cpu"):
            return original.__get__(None, regnet.BlockParams)(*args, **kwargs)

    regnet.BlockParams.from_init_params = on_cpu
    try:
        yield
    finally:
        regnet.BlockParams.from_init_params = original


@functools.lru_cache(maxsize=None)
def _signature(arch: str) -> dict | None:
    """{key: shape} of the headless torchvision ``arch``'s state dict, built on the meta device (no weights)."""
    try:
        with torch.device("meta"), _regnet_widths_on_cpu():
            module = _headless_torchvision(arch)
    except Exception:  # a model that cannot be built without weights is not a candidate
        return None
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _fits(signature: dict, keys: dict) -> bool:
    """Whether a file's {key: shape} is the headless model's, plus perhaps its classifier."""
    if any(k not in keys or (keys[k] != shape and k not in _RESIZED_KEYS) for k, shape in signature.items()):
        return False
    return all(k in signature or k.startswith(_CLASSIFIER_PREFIXES) for k in keys)


def guess_arch(state: dict, prefix: str = "") -> str | None:
    """Name the backbone a state dict came from: small-cnn (whose layers hold bare convs,
    ``layer1.0.weight``, where a ResNet's hold blocks) or the torchvision model whose keys and shapes
    it has (tried family by family, built on the meta device); None if unknown."""
    keys = {k[len(prefix):]: tuple(getattr(v, "shape", ())) for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith("backbone.") for k in keys):
        keys = {k[len("backbone."):]: s for k, s in keys.items() if k.startswith("backbone.")}
    if "layer1.0.weight" in keys:
        return SMALL_CNN
    tops = {k.split(".")[0] for k in keys}
    for _, names in itertools.groupby(sorted(torchvision_architectures(), key=_family), key=_family):
        names = list(names)
        first = _signature(names[0])
        if first is None or not {k.split(".")[0] for k in first} <= tops:
            continue  # another family's layout
        for name in names:
            signature = _signature(name)
            if signature is not None and _fits(signature, keys):
                return name
    return None

"""Reference features that need no training: the rows a trained model is compared with.

``gen_embeddings.py --features pixels|backbone`` embeds images with one of these instead of
a checkpoint's model (``FEATURE_KINDS``):

* ``pixels`` (:class:`PixelFeatures`): the raw 0..255 RGB values at ``PIXEL_SIZE`` px, flattened;
* ``backbone`` (:class:`BackboneFeatures`): a backbone's pooled features, its classifier's input
  (``deepranking.backbones``: any of its architectures; by default resnet18 with ImageNet weights),
  at the side its pretrained weights were evaluated at (224 px for most) and normalised with their
  mean and std.

Each comes with its explicit ``Preprocessing``, like a checkpoint's, and ``feature_record``
gives it a checkpoint's shape, so its fingerprint identifies it the same way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from deepranking.backbones import backbone_preprocessing, headless_backbone, load_backbone_weights, native_image_size
from deepranking.cli import UserError
from deepranking.preprocessing import Preprocessing

FEATURE_KINDS = ("model", "pixels", "backbone")  # gen_embeddings.py --features
# Raw pixels: the image at 32 x 32 (3,072 values, fewer than the paper's 4,096-d embedding), the
# smallest size train_net.py accepts — so the pixel row sees the same pixels as a model trained at
# 32 px, and the kNN over it stays cheap; a small image also blurs away pixel-level noise.
PIXEL_SIZE = 32
BACKBONE_IMAGE_SIZE = 224  # the input side of a backbone whose weights name none (small-cnn)
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
    """A backbone's pooled features [B, F] (a ResNet: F = 512 or 2048; a ViT: its class token), no head."""

    def __init__(self, arch: str = "resnet18", weights: str = "imagenet", image_size: int | None = None):
        super().__init__()
        built = headless_backbone(arch, image_size)
        if weights != "none":
            load_backbone_weights(built.module, arch, weights)
        self.backbone = built.module
        self.config = {"features": "backbone", "arch": arch, "weights": str(weights),
                       "embedding_dim": built.feature_dim}
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

    pixels: ``image_size`` default PIXEL_SIZE, raw values; backbone: default the side its
    pretrained weights were evaluated at (``native_image_size``, else BACKBONE_IMAGE_SIZE), their
    mean and std (``backbone_preprocessing``). The cache side defaults to the image size. The
    Preprocessing is explicit, like a checkpoint's.
    """
    if kind == "pixels":
        size = int(image_size or PIXEL_SIZE)
        return PixelFeatures(size).to(device).eval(), pixel_preprocessing(size, cache_size)
    if kind == "backbone":
        size = int(image_size or native_image_size(arch) or BACKBONE_IMAGE_SIZE)
        return (BackboneFeatures(arch, weights, size).to(device).eval(),
                backbone_preprocessing(arch, size, int(cache_size or size)))
    raise UserError(f"unknown reference features {kind!r} (choose pixels or backbone)")


def feature_record(model: nn.Module, spec: Preprocessing) -> dict:
    """What identifies reference features, in a checkpoint's shape: weights, config and pixels."""
    return {"model": model.state_dict(), "model_config": dict(model.config), "preprocessing": spec.to_dict(),
            "step": None, "epoch": None}

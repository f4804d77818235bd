"""Reference features with no training: raw pixels and a backbone's pooled features, with their preprocessing.

gen_embeddings.py --features pixels|backbone end to end is tested in test_unseen_protocol.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepranking.cli import UserError
from deepranking.preprocessing import IMAGENET_MEAN, Preprocessing, preprocess
from deepranking.reference_features import (PIXEL_SIZE, feature_record, pixel_preprocessing,
                                            reference_features)


def test_pixel_features_are_the_raw_values_flattened():
    model, spec = reference_features("pixels", image_size=4)
    assert spec == pixel_preprocessing(4) and spec.cache_size == 4 and spec.mean == (0.0, 0.0, 0.0)
    assert model.config == {"features": "pixels", "embedding_dim": 48} and not model.training
    images = np.random.default_rng(0).integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    out = model(preprocess(torch.from_numpy(images), spec))
    want = torch.from_numpy(images).permute(0, 3, 1, 2).flatten(1).float()  # [2, 3*4*4], 0..255
    torch.testing.assert_close(out, want, rtol=0, atol=1e-3)
    _, default = reference_features("pixels", cache_size=64)
    assert (default.image_size, default.cache_size) == (PIXEL_SIZE, 64)


def test_backbone_features_and_their_record():
    torch.manual_seed(0)
    model, spec = reference_features("backbone", "small-cnn", "none", image_size=32)
    assert spec == Preprocessing(image_size=32, cache_size=32) and spec.mean == IMAGENET_MEAN
    assert model.config == {"features": "backbone", "arch": "small-cnn", "weights": "none", "embedding_dim": 256}
    assert not model.training
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    record = feature_record(model, spec)
    assert record["model_config"] == model.config and record["preprocessing"] == spec.to_dict()
    assert list(record["model"]) == list(model.state_dict()) and record["step"] is None


def test_unknown_kind_and_arch_are_user_errors():
    with pytest.raises(UserError, match="unknown reference features 'model'"):
        reference_features("model")
    with pytest.raises(UserError, match="unknown architecture 'vgg17'"):
        reference_features("backbone", "vgg17", "none")

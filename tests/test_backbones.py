"""Backbones: construction (padding-skipping convs, headless ResNets, small-cnn), stages, weights."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from deepranking import backbones
from deepranking.cli import UserError


def with_weights(arch: str, weights: str) -> torch.nn.Module:
    """A headless backbone with ``weights`` loaded, as the model and the reference features build theirs."""
    backbone = backbones.headless_backbone(arch).module
    backbones.load_backbone_weights(backbone, arch, weights)
    return backbone


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("side, expected", [
    ((1, 3, 1, 1, 1), (1, 2, 0)),  # 3x3 on a 1x1 map (layer4 at 32 px): the centre tap alone
    ((2, 3, 2, 1, 1), (1, 3, 0)),  # stride 2 from 2 to 1 (layer4.0.conv1 at 32 px): taps 1-2, no padding
    ((1, 5, 1, 2, 1), (2, 3, 0)),  # 5 taps on 1 pixel
    ((2, 5, 1, 2, 1), (1, 4, 1)),  # 5 taps on 2 pixels: the outer two read only padding, 1 pixel of it left
    ((3, 5, 1, 2, 1), None),  # 5 taps on 3 pixels: the outer taps read the edge pixels
    ((2, 3, 1, 1, 1), None),  # stride 1, 2 pixels: each tap reads input for some output
    ((32, 7, 2, 3, 1), None),  # the stem at 32 px
    ((1, 3, 2, 2, 1), None),  # taps 0 and 2 read input, tap 1 never: not a range, nothing left out
    ((1, 3, 1, 2, 2), (1, 2, 0)),  # dilation 2: the centre tap alone
])
def test_conv_tap_range_by_hand(side, expected):
    assert backbones.conv_tap_range(*side) == expected


@pytest.mark.parametrize("shape, conv", [
    ((4, 8, 1, 1), dict(kernel_size=3, padding=1)),
    ((4, 8, 2, 2), dict(kernel_size=3, padding=1, stride=2)),
    ((4, 8, 1, 3), dict(kernel_size=3, padding=1)),  # only the height loses taps
    ((4, 8, 1, 2), dict(kernel_size=5, padding=2)),  # (2, 3, 0) down, (1, 4, 1) across
    ((4, 8, 1, 1), dict(kernel_size=3, padding=2, dilation=2, groups=4, bias=False)),
    ((4, 8, 5, 5), dict(kernel_size=3, padding=1)),  # nothing to leave out: the torch path
])
def test_padding_skipping_conv_equals_torch_conv_with_gradients(shape, conv):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(8, 16, **conv)
    mine = torch.nn.Conv2d(8, 16, **conv)
    mine.load_state_dict(ref.state_dict())
    mine.__class__ = backbones.PaddingSkippingConv2d
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out_ref, out = ref(x), mine(x2)
    assert out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    if conv.get("bias", True):
        torch.testing.assert_close(mine.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_headless_resnet_keeps_torchvisions_seeded_weights_and_keys():
    torch.manual_seed(3)
    ours, dim = backbones.headless_resnet("resnet18")
    torch.manual_seed(3)
    theirs = torchvision.models.resnet18(weights=None)
    theirs.fc = torch.nn.Identity()
    assert dim == 512
    mine, want = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(want)
    assert all(torch.equal(mine[k], want[k]) for k in want)
    convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and all(type(m) is backbones.PaddingSkippingConv2d for m in convs)
    x = torch.randn(2, 3, 32, 32)  # layer4 maps are 1x1 here: the skipping path runs
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)


def test_small_cnn_keeps_full_resolution_in_its_first_stage_and_pools_to_256():
    net = backbones.SmallCNN()
    seen = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: tuple(o.shape)}))
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 256) and net.feature_dim == 256
    assert seen == {"layer1": (2, 32, 32, 32), "layer2": (2, 64, 16, 16), "layer3": (2, 128, 8, 8),
                    "layer4": (2, 256, 4, 4)}
    assert sum(p.numel() for p in net.parameters()) < 10 ** 6  # resnet18: 11 M


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="unknown architecture 'vgg17'.*small-cnn.*resnet18.*list_models"):
        backbones.check_arch("vgg17")
    backbones.check_arch("small-cnn")
    backbones.check_arch("vgg16")


# ---------------------------------------------------------------- stages


def test_frozen_names_are_the_stages_before_train_from():
    resnet = backbones.headless_backbone("resnet18")
    assert backbones.frozen_names(resnet, "conv1") == []
    assert backbones.frozen_names(resnet, "layer2") == ["conv1", "bn1", "layer1"]
    assert backbones.frozen_names(resnet, "head") == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]


# ---------------------------------------------------------------- weights


def test_local_state_dict_weights(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    plain = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), plain)
    wrapped = tmp_path / "r18_wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        model = with_weights("resnet18", str(path))
        assert torch.equal(model.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
        assert torch.equal(model.bn1.running_var, ref.bn1.running_var)


def test_bad_weights_files(tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        with_weights("resnet18", str(tmp_path / "nope.pth"))
    r50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), r50)
    with pytest.raises(UserError, match="resnet50 weights, but the model is resnet18"):
        with_weights("resnet18", str(r50))
    partial = tmp_path / "partial.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer2.0.conv1.weight"]
    torch.save(state, partial)
    with pytest.raises(UserError, match="missing key.*layer2.0.conv1.weight"):
        with_weights("resnet18", str(partial))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="truncated or corrupt"):
        with_weights("resnet18", str(garbage))


@pytest.mark.parametrize("arch, file", [("resnet18", "resnet18-f37072fd.pth"),
                                        ("mobilenet_v3_small", "mobilenet_v3_small-047dcff4.pth"),
                                        ("vit_b_16", "vit_b_16-c867db91.pth")])
def test_imagenet_weights_offline_message(tmp_path, monkeypatch, arch, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / file
    assert backbones.expected_weights_file(arch) == expected
    with pytest.raises(UserError) as err:
        with_weights(arch, "imagenet")
    message = str(err.value)
    assert str(expected) in message and "--weights none" in message and "--weights PATH" in message
    assert "\n" not in message
    # A corrupt cached file fails the hash check: the message says to delete it.
    expected.parent.mkdir(parents=True, exist_ok=True)
    expected.write_bytes(b"partial download")
    with pytest.raises(UserError, match="corrupt.*delete"):
        with_weights(arch, "imagenet")


def test_imagenet_weights_are_the_best_torchvision_offers():
    assert backbones.imagenet_weights("resnet101") == torchvision.models.ResNet101_Weights.IMAGENET1K_V2
    assert backbones.imagenet_weights("resnet18") == torchvision.models.ResNet18_Weights.IMAGENET1K_V1


def test_small_cnn_has_no_imagenet_weights_but_loads_a_state_dict(tmp_path):
    with pytest.raises(UserError, match="no ImageNet weights for small-cnn.*--weights none"):
        with_weights(backbones.SMALL_CNN, "imagenet")
    torch.manual_seed(3)
    ref = backbones.SmallCNN()
    path = tmp_path / "small.pth"
    torch.save(ref.state_dict(), path)
    model = with_weights(backbones.SMALL_CNN, str(path))
    assert torch.equal(model.layer3[4].weight, ref.layer3[4].weight)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="holds resnet18 weights, but the model is small-cnn"):
        with_weights(backbones.SMALL_CNN, str(tmp_path / "r18.pth"))
    # the other way round: a small-cnn file (or a checkpoint of one) named as such for a ResNet model
    assert backbones.guess_arch(ref.state_dict()) == "small-cnn"
    with pytest.raises(UserError, match="holds small-cnn weights, but the model is resnet18"):
        with_weights("resnet18", str(path))
    with pytest.raises(UserError, match="no ImageNet weights for small-cnn"):
        backbones.imagenet_weights(backbones.SMALL_CNN)  # not torchvision's "Unknown model" ValueError

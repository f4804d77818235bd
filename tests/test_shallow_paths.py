"""The shallow paths of DeepRankNet: "paper" (default), "classic" (the old geometry, unchanged) and "none".

Each path's output is the unit-norm [B, 1536] vector that goes into ``fuse``
(``DeepRankNet.shallow_paths``). Gradient checks run on the paths alone (no
backbone), so they stay cheap at 224 px.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deep_rank_net as drn
from deepranking.checkpoint import load_checkpoint, model_record, write_checkpoint
from deepranking.cli import UserError
from deepranking.preprocessing import Preprocessing

DIM = 32


def model(shallow=None, seed=0, **kw) -> drn.DeepRankNet:
    torch.manual_seed(seed)
    return drn.DeepRankNet("resnet18", DIM, weights="none", shallow=shallow, **kw)


def path_grads(net: drn.DeepRankNet, size: int, n: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """|d sum(path output) / d input| per pixel, [n, size, size] for each shallow path (channels summed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(2):
        x = torch.randn(n, 3, size, size, generator=g).requires_grad_(True)
        net.shallow_paths(x)[i].sum().backward()
        out.append(x.grad.abs().sum(1))
    return out


def old_forward(m: drn.DeepRankNet, x: torch.Tensor) -> torch.Tensor:
    """DeepRankNet.forward as it was before ``shallow`` existed (multiscale=True / False), verbatim."""
    deep = F.normalize(m.embed(m.backbone(x)), dim=1)
    if not m.config["multiscale"]:
        return deep
    h, w = x.shape[-2:]
    if min(h, w) < 6:
        x = F.pad(x, (0, max(0, 6 - w), 0, max(0, 6 - h)))
    s1 = F.normalize(m.pool(m.shallow1(x)).flatten(1), dim=1)
    s2 = F.normalize(m.pool(m.shallow2(x)).flatten(1), dim=1)
    fused = m.fuse(torch.cat([deep, s1, s2], dim=1))
    return F.normalize(fused, dim=1)


# ---------------------------------------------------------------- options


def test_paper_is_the_default_and_multiscale_still_works():
    assert drn.DEFAULT_SHALLOW == "paper"
    assert model().config == {"arch": "resnet18", "embedding_dim": DIM, "multiscale": True, "shallow": "paper",
                              "train_from": "layer4"}
    # positional callers (bench scripts, train_net): build_model(arch, dim, multiscale, weights, train_from)
    assert drn.build_model("resnet18", DIM, True, "none", "layer4").shallow == "paper"
    single = drn.build_model("resnet18", DIM, False, "none", "layer4")
    assert single.config["shallow"] == "none" and single.config["multiscale"] is False
    assert not hasattr(single, "fuse") and single.shallow_paths(torch.randn(1, 3, 32, 32)) == []
    assert drn.build_model("resnet18", DIM, None, "none", "layer4", shallow="classic").shallow == "classic"
    assert drn.build_model("resnet18", DIM, True, "none", "layer4", "classic").config["multiscale"] is True


def test_unknown_or_contradictory_shallow_is_a_user_error():
    with pytest.raises(UserError, match="unknown shallow"):
        model("bogus")
    with pytest.raises(UserError, match="contradicts"):
        model("paper", multiscale=False)
    with pytest.raises(UserError, match="contradicts"):
        model("none", multiscale=True)
    with pytest.raises(UserError, match="unknown shallow"):
        drn.config_shallow({"multiscale": True, "shallow": "fancy"})


def test_parameter_counts():
    def shallow_params(m):
        return sum(p.numel() for n, p in m.named_parameters() if n.startswith(("shallow1.", "shallow2.")))

    assert shallow_params(model("paper")) == 2 * (3 * 7 * 7 * 96 + 96) == 28416
    assert shallow_params(model("classic")) == 2 * (3 * 8 * 8 * 96 + 96) == 37056
    assert shallow_params(model("none")) == 0
    assert model("paper").fuse.in_features == model("classic").fuse.in_features == DIM + 2 * 1536


# ---------------------------------------------------------------- "paper" geometry


@pytest.mark.parametrize("size, maps", [(32, (8, 4)), (64, (16, 8)), (224, (56, 28)), (36, (9, 5))])
def test_paper_shapes(size, maps):
    """The docstring's diagram: avg/4 and avg/8 sub-sampling, a same-size 7x7 conv, max pool to 4x4."""
    net = model("paper").eval()
    seen = []
    hooks = [c.register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape))) for c in (net.shallow1, net.shallow2)]
    with torch.no_grad():
        s1, s2 = net.shallow_paths(torch.randn(2, 3, size, size))
        out = net(torch.randn(2, 3, size, size))
    for h in hooks:
        h.remove()
    assert seen[:2] == [(2, 96, maps[0], maps[0]), (2, 96, maps[1], maps[1])]
    for s in (s1, s2):
        assert s.shape == (2, 1536)
        torch.testing.assert_close(s.norm(dim=1), torch.ones(2))
    assert out.shape == (2, DIM)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("size", [5, 17, 40, 100])
def test_paper_works_at_odd_and_tiny_sizes(size):
    with torch.no_grad():
        out = model("paper").eval()(torch.randn(1, 3, size, size))
    assert out.shape == (1, DIM) and abs(out.norm().item() - 1) < 1e-5


def test_subsampling_averages_every_pixel_partial_windows_included():
    net = model("paper")
    x = torch.randn(1, 3, 36, 36)
    y = net.subsample2(x)  # 36 = 4 * 8 + 4: the last row/column of windows holds 4 pixels
    assert y.shape == (1, 3, 5, 5)
    torch.testing.assert_close(y[0, :, 4, 4], x[0, :, 32:, 32:].mean((1, 2)))
    torch.testing.assert_close(y[0, :, 1, 2], x[0, :, 8:16, 16:24].mean((1, 2)))


def test_grid_pooling_equals_adaptive_pooling():
    """Exact max_pool2d windows (deterministic on CUDA) where 4 divides the map, adaptive windows elsewhere."""
    for n in (4, 8, 16, 28, 56, 9, 5, 3):
        z = torch.randn(2, 96, n, n)
        assert torch.equal(drn._max_pool_grid(z, 4), F.adaptive_max_pool2d(z, 4))


@pytest.mark.parametrize("size", [32, 36, 64])
def test_every_pixel_reaches_each_paper_path_for_every_image(size):
    """Up to 64 px a max window is <= 4 conv positions wide, so every position of some window sees
    each sub-sampled pixel (7 >= 2 * 4 - 1): the gradient is non-zero at every pixel of EVERY image."""
    for grad in path_grads(model("paper"), size, n=4):
        assert (grad > 0).all()


def test_every_pixel_reaches_each_paper_path_at_224():
    """At 224 px path 1 pools 14x14 windows: per image, a pixel whose 7x7 neighbourhood wins in none of
    the 96 channels gets no gradient (max pooling keeps one winner per window), so the strict claim is:
    every pixel reaches the output for some of a few random images, and almost every pixel per image."""
    for grad in path_grads(model("paper"), 224, n=4):
        assert (grad > 0).any(0).all()  # every pixel, over 4 random images
        assert (grad > 0).flatten(1).float().mean(1).min() > 0.99  # per image


def test_classic_paths_see_only_a_fraction_of_the_pixels():
    """Why "paper" is the default: the classic strides skip pixels (111/224 and 56/224 per axis at 224 px)."""
    g1, g2 = path_grads(model("classic"), 224, n=2)
    assert (g1 > 0).any(0).float().mean() <= (111 / 224) ** 2 + 1e-9
    assert (g2 > 0).any(0).float().mean() <= (56 / 224) ** 2 + 1e-9


def test_no_path_degenerates_at_32_px():
    """At 32 px "paper" keeps 1536 distinct values per vector; classic's 2x2 maps give only 384."""
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        paper = model("paper").shallow_paths(x)
        classic = model("classic").shallow_paths(x)
    for s in paper:
        assert min(len(torch.unique(v)) for v in s) > 1000
        assert len(torch.unique(s)) > 1000 * len(s)
    for s in classic:
        assert max(len(torch.unique(v)) for v in s) <= 384


def test_paper_paths_get_gradients_in_training():
    net = model("paper")
    net(torch.randn(3, 3, 32, 32)).pow(2).sum().backward()
    for name in ("shallow1", "shallow2"):
        assert getattr(net, name).weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- "classic" and "none" = the old model


OLD_HEAD_KEYS = ["embed.weight", "embed.bias", "shallow1.weight", "shallow1.bias", "shallow2.weight", "shallow2.bias",
                 "fuse.weight", "fuse.bias"]


@pytest.mark.parametrize("kw", [{"shallow": "classic"}, {"shallow": "classic", "multiscale": True},
                                {"shallow": "none"}, {"multiscale": False}])
def test_classic_and_none_reproduce_the_old_model(kw):
    net = model(**kw).eval()
    multiscale = net.config["multiscale"]
    keys = [k for k in net.state_dict() if not k.startswith("backbone.")]
    assert keys == (OLD_HEAD_KEYS if multiscale else OLD_HEAD_KEYS[:2])
    if multiscale:
        assert net.shallow1.weight.shape == net.shallow2.weight.shape == (96, 3, 8, 8)
        assert (net.shallow1.stride, net.shallow1.padding, net.shallow2.stride, net.shallow2.padding) == \
            ((16, 16), (1, 1), (32, 32), (4, 4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for size in (5, 32, 40, 64, 224):
            x = torch.randn(2, 3, size, size, generator=g)
            assert torch.equal(net(x), old_forward(net, x))


def _round_trip(tmp_path, net, drop_shallow: bool):
    ckpt = {**model_record(net, Preprocessing(image_size=64, cache_size=64)), "epoch": 0, "step": 0, "args": {}}
    if drop_shallow:  # a checkpoint written before ``shallow`` existed
        ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items() if k != "shallow"}
    path = tmp_path / "net.model"
    write_checkpoint(path, ckpt)
    return load_checkpoint(path)


@pytest.mark.parametrize("shallow", ["classic", "none"])
def test_old_checkpoints_rebuild_exactly(tmp_path, shallow):
    net = model(shallow).eval()
    ckpt = _round_trip(tmp_path, net, drop_shallow=True)
    assert "shallow" not in ckpt["model_config"]
    assert ckpt["model_config"]["multiscale"] is (shallow == "classic")
    rebuilt, _ = drn.model_from_checkpoint(ckpt)
    assert rebuilt.config["shallow"] == shallow
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


@pytest.mark.parametrize("shallow", ["paper", "classic", "none"])
def test_new_checkpoints_record_shallow_and_rebuild(tmp_path, shallow):
    net = model(shallow).eval()
    ckpt = _round_trip(tmp_path, net, drop_shallow=False)
    assert ckpt["model_config"]["shallow"] == shallow
    rebuilt, _ = drn.model_from_checkpoint(ckpt)
    assert rebuilt.config == net.config
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


def test_classic_weights_never_load_as_paper(tmp_path):
    ckpt = _round_trip(tmp_path, model("classic"), drop_shallow=False)
    ckpt["model_config"]["shallow"] = "paper"
    with pytest.raises(UserError, match="shape mismatch"):
        drn.model_from_checkpoint(ckpt)


# ---------------------------------------------------------------- the default model


def test_resnet101_paper_at_224():
    torch.manual_seed(0)
    net = drn.DeepRankNet("resnet101", 4096, weights="none").eval()
    assert net.shallow == "paper" and net.embed.in_features == 2048
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 4096)
    assert abs(out.norm().item() - 1) < 1e-4

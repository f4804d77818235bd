"""DeepRankNet: shapes at any size, frozen stages, weights, model <-> checkpoint, preprocess, embedding, precision.

The checkpoint file format itself (versions, writing, Checkpointer) is tested in test_checkpoint.py, the
backbones (construction, stages, weights files) in test_backbones.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import deep_rank_net as drn
from deepranking import backbones, embedding, runtime
from deepranking.checkpoint import (CHECKPOINT_VERSION, capture_rng_state, load_checkpoint, model_record,
                                    restore_rng_state, write_checkpoint)
from deepranking.cli import UserError
from deepranking.preprocessing import (IMAGENET_MEAN, IMAGENET_STD, Preprocessing, UnreadableImageError, load_image,
                                       preprocess)

DIM = 32


def small_model(multiscale=True, train_from="layer4", **kw) -> drn.DeepRankNet:
    torch.manual_seed(0)
    return drn.DeepRankNet("resnet18", DIM, multiscale=multiscale, train_from=train_from, **kw)


def uint8_images(n=5, size=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("multiscale", [True, False])
def test_output_unit_norm_at_any_size(multiscale):
    model = small_model(multiscale).eval()
    assert model.config == {"arch": "resnet18", "embedding_dim": DIM, "multiscale": multiscale,
                            "shallow": "paper" if multiscale else "none", "train_from": "layer4"}
    with torch.no_grad():
        for size in (32, 64, 224):
            out = model(torch.randn(2, 3, size, size))
            assert out.shape == (2, DIM)
            torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert hasattr(model, "fuse") == multiscale


def test_multiscale_paths_change_output():
    """The shallow paths feed the output: zeroing a shallow conv changes the embedding."""
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.shallow2.weight.zero_()
        model.shallow2.bias.fill_(1.0)
        after = model(x)
    assert not torch.allclose(before, after)
    assert model.fuse.in_features == DIM + 2 * 1536


def test_resnet101_default_constructs_and_runs():
    model = drn.DeepRankNet("resnet101", 4096, weights=None).eval()  # torchvision's spelling
    assert model.embed.in_features == 2048
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 4096)
    assert abs(out.norm().item() - 1) < 1e-4


def test_weights_none_is_the_string_none():
    torch.manual_seed(3)
    a = drn.build_model("resnet18", 8, weights=None, train_from="conv1")
    torch.manual_seed(3)
    b = drn.build_model("resnet18", 8, weights="none", train_from="conv1")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_bad_arch_and_stage_are_user_errors():
    with pytest.raises(UserError, match="unknown architecture"):
        drn.DeepRankNet("vgg17", DIM)
    with pytest.raises(UserError, match="train_from"):
        drn.DeepRankNet("resnet18", DIM, train_from="layer9")


def test_frozen_stages_get_no_grad_and_keep_bn_stats():
    model = small_model(train_from="layer4")
    model.train()
    assert not model.backbone.bn1.training and not model.backbone.layer3[0].bn1.training
    assert model.backbone.layer4[0].bn1.training
    frozen_bn = model.backbone.layer2[0].bn1.running_mean.clone()
    frozen_w = model.backbone.layer1[0].conv1.weight.clone()
    layer4_w = model.backbone.layer4[0].conv1.weight.clone()
    layer4_bn = model.backbone.layer4[0].bn1.running_mean.clone()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    loss = model(torch.randn(4, 3, 32, 32) * 3 + 1).sum() * 10
    loss.backward()
    opt.step()
    assert model.backbone.layer1[0].conv1.weight.grad is None
    assert torch.equal(model.backbone.layer1[0].conv1.weight, frozen_w)
    assert torch.equal(model.backbone.layer2[0].bn1.running_mean, frozen_bn)
    assert not torch.equal(model.backbone.layer4[0].conv1.weight, layer4_w)
    assert not torch.equal(model.backbone.layer4[0].bn1.running_mean, layer4_bn)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert id(model.fuse.weight) in trainable and id(model.shallow1.weight) in trainable
    assert id(model.backbone.conv1.weight) not in trainable


def test_weights_are_loaded_into_the_backbone(tmp_path):
    torch.manual_seed(3)
    ref = backbones.SmallCNN()
    torch.save(ref.state_dict(), tmp_path / "small.pth")
    model = drn.DeepRankNet(backbones.SMALL_CNN, DIM, weights=str(tmp_path / "small.pth"))
    assert torch.equal(model.backbone.layer3[4].weight, ref.layer3[4].weight)
    with pytest.raises(UserError, match="no ImageNet weights for small-cnn"):
        drn.DeepRankNet(backbones.SMALL_CNN, DIM, weights="imagenet")


def test_train_from_conv1_and_head():
    everything = small_model(train_from="conv1")
    assert all(p.requires_grad for p in everything.parameters())
    head = small_model(train_from="head").train()
    assert not any(p.requires_grad for p in head.backbone.parameters())
    assert not head.backbone.layer4[1].bn2.training
    assert head.embed.weight.requires_grad


# ---------------------------------------------------------------- checkpoints


def save_model(path: Path, model, spec: Preprocessing | None = None, **extra) -> Path:
    """A checkpoint of ``model`` as training writes one (model_record + plain values)."""
    spec = spec or Preprocessing(image_size=64, cache_size=64)
    write_checkpoint(path, {**model_record(model, spec), "epoch": 0, "step": 0, "args": {}, **extra})
    return path


def test_checkpoint_round_trip(tmp_path):
    model = small_model()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    path = tmp_path / "run" / "net.model"
    args = {"output": Path("/tmp/x"), "lr": 0.01, "device": torch.device("cpu")}
    spec = Preprocessing(image_size=48, cache_size=64)
    save_model(path, model, spec, optimizer=opt.state_dict(), epoch=3, step=17, args=args,
               rng=capture_rng_state(), best_loss=np.float32(0.5))
    raw = torch.load(path, weights_only=True)  # the documented format, no pickled objects
    assert raw["format"] == "deep-ranking-checkpoint" and raw["version"] == CHECKPOINT_VERSION == 2
    assert raw["model_config"] == {**model.config, "image_size": 48}
    assert raw["preprocessing"] == spec.to_dict()
    assert raw["args"] == {"output": "/tmp/x", "lr": 0.01, "device": "cpu"}
    assert raw["epoch"] == 3 and raw["step"] == 17 and raw["best_loss"] == 0.5
    ckpt = load_checkpoint(path)
    rebuilt, got_spec = drn.model_from_checkpoint(ckpt)
    assert got_spec == spec and got_spec.image_size == 48 and got_spec.cache_size == 64
    assert not rebuilt.training
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
    opt2 = torch.optim.SGD(rebuilt.trainable_parameters(), lr=0.01, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    # RNG state restores: the same draws follow.
    restore_rng_state(ckpt["rng"])
    a = (np.random.rand(), torch.rand(1).item())
    restore_rng_state(ckpt["rng"])
    assert (np.random.rand(), torch.rand(1).item()) == a


def test_checkpoint_unwraps_compile_and_dataparallel_prefixes(tmp_path):
    model = small_model(multiscale=False)
    wrapped = torch.nn.DataParallel(model)
    path = save_model(tmp_path / "dp.model", wrapped)
    ckpt = load_checkpoint(path)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["model_config"]["arch"] == "resnet18"  # the config of the wrapped module
    ckpt["model"] = {"_orig_mod." + k: v for k, v in ckpt["model"].items()}
    rebuilt, _ = drn.model_from_checkpoint(ckpt)
    assert torch.equal(rebuilt.embed.weight, model.embed.weight)


def test_arch_mismatch_names_both_architectures(tmp_path):
    path = save_model(tmp_path / "net.model", small_model(multiscale=False))
    ckpt = load_checkpoint(path)
    ckpt["model_config"]["arch"] = "resnet34"
    with pytest.raises(UserError, match="resnet18.*resnet34"):
        drn.model_from_checkpoint(ckpt)
    ckpt["model_config"].update(arch="resnet18", embedding_dim=DIM * 2)
    with pytest.raises(UserError, match="shape mismatch"):
        drn.model_from_checkpoint(ckpt)


# ---------------------------------------------------------------- small-cnn


@pytest.mark.parametrize("shallow", ["paper", "classic", "none"])
def test_small_cnn_deep_rank_net_at_several_sizes(shallow):
    torch.manual_seed(0)
    model = drn.DeepRankNet(backbones.SMALL_CNN, DIM, weights=None, train_from="conv1", shallow=shallow).eval()
    for side in (32, 45, 64):
        emb = model(torch.randn(3, 3, side, side))
        assert emb.shape == (3, DIM)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_small_cnn_stages_freeze_like_a_resnets():
    torch.manual_seed(0)
    model = drn.DeepRankNet(backbones.SMALL_CNN, DIM, train_from="layer3").train()
    assert not model.backbone.bn1.training and not model.backbone.layer2[2].training
    assert model.backbone.layer3[2].training
    trainable = {id(p) for p in model.trainable_parameters()}
    assert id(model.backbone.conv1.weight) not in trainable and id(model.backbone.layer2[1].weight) not in trainable
    assert id(model.backbone.layer3[1].weight) in trainable and id(model.backbone.layer4[1].weight) in trainable


def test_small_cnn_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = drn.DeepRankNet(backbones.SMALL_CNN, DIM, train_from="conv1")
    model(torch.randn(4, 3, 32, 32))  # moves the BatchNorm statistics off their initial values
    rebuilt, _ = drn.model_from_checkpoint(load_checkpoint(save_model(tmp_path / "small.model", model)))
    assert rebuilt.config["arch"] == "small-cnn"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)


# ---------------------------------------------------------------- images


def test_preprocess_shape_and_normalisation():
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    images[1] = 255
    x = preprocess(torch.from_numpy(images), 24)
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32
    assert x.is_contiguous()  # NCHW unless asked: the layout is runtime.memory_format's choice
    assert preprocess(torch.from_numpy(images), 24, memory_format=torch.channels_last).is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(preprocess(torch.from_numpy(images), Preprocessing(24, 16)), x, rtol=0, atol=0)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 5, 7], -mean / std)
    torch.testing.assert_close(x[1, :, 5, 7], (1 - mean) / std)
    # Downsizing averages (antialias): a 1-px checkerboard becomes flat grey, not aliased.
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    small = preprocess(torch.from_numpy(np.repeat(checker[None, :, :, None], 3, axis=3)), 16)
    torch.testing.assert_close(small[0, 0], torch.full((16, 16), (0.5 - mean[0].item()) / std[0].item()), atol=0.02, rtol=0)
    with pytest.raises(ValueError):
        preprocess(torch.zeros(2, 16, 16, 3), 24)  # float, not uint8


def test_preprocess_flip_is_seeded_and_per_image():
    images = torch.from_numpy(uint8_images(n=16, size=8))
    plain = preprocess(images, 8)
    a = preprocess(images, 8, train=True, generator=torch.Generator().manual_seed(5))
    b = preprocess(images, 8, train=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    flipped = [not torch.equal(a[i], plain[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16
    for i in range(16):
        assert torch.equal(a[i], plain[i].flip(2) if flipped[i] else plain[i])
    assert torch.equal(preprocess(images, 8, train=False), plain)


def test_preprocess_shift_translates_each_image_by_whole_pixels():
    """--shift: after the (unchanged) flips, each image moves by (dy, dx) in [-p, p], border pixels repeated."""
    images = torch.from_numpy(uint8_images(n=16, size=8))
    flips_only = preprocess(images, 8, train=True, generator=torch.Generator().manual_seed(5))
    shifted = preprocess(images, 8, train=True, generator=torch.Generator().manual_seed(5), shift=0.25)  # p = 2
    again = preprocess(images, 8, train=True, generator=torch.Generator().manual_seed(5), shift=0.25)
    assert torch.equal(shifted, again)
    assert torch.equal(preprocess(images, 8, train=True, generator=torch.Generator().manual_seed(5), shift=0.01),
                       flips_only)  # round(0.01 * 8) = 0 pixels: flips only
    seen = set()
    for i in range(16):
        padded = torch.nn.functional.pad(flips_only[i:i + 1], (2, 2, 2, 2), mode="replicate")[0]  # [3, 12, 12]
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[:, dy:dy + 8, dx:dx + 8], shifted[i])]
        assert windows, f"image {i} is not a shifted window of itself"
        seen.add(windows[0])
    assert len(seen) > 4  # offsets differ from image to image
    # A hand-made case: a single bright pixel moves with its image, the border repeats.
    dot = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    dot[0, 1, 1] = 255
    x = preprocess(dot, 4)
    from deepranking.preprocessing import _translate
    moved = _translate(x, torch.tensor([[0], [2]]), 1)  # window at row 0, col 2 of the 1-pixel-padded image
    assert torch.equal(moved[0, :, 2, 0], x[0, :, 1, 1])  # the dot: row 1 -> 2, col 1 -> 0
    assert torch.equal(moved[0, :, 0, :], torch.cat([x[0, :, 0, 1:], x[0, :, 0, 3:]], dim=1))  # top row repeated


def test_preprocess_erase_blanks_one_rectangle_per_chosen_image():
    """--erase p: after the (unchanged) flips, about p of the images get one rectangle of mean colour (0)."""
    from deepranking.preprocessing import ERASE_AREA, box_masks, erase_boxes

    images = torch.from_numpy(uint8_images(n=400, size=16))  # random pixels: a 0.0 pixel is (almost) never kept
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    flips_only = preprocess(images, 16, train=True, generator=gen())
    erased = preprocess(images, 16, train=True, generator=gen(), erase=0.5)
    assert torch.equal(erased, preprocess(images, 16, train=True, generator=gen(), erase=0.5))  # seeded
    changed = (erased != flips_only).any(dim=1)  # [N, S, S]
    assert torch.equal(erased[:, :, ~changed.any(0)], flips_only[:, :, ~changed.any(0)])
    assert (erased.permute(0, 2, 3, 1)[changed] == 0).all()  # what changed became the mean colour
    hit = changed.flatten(1).any(1)
    assert 0.4 < hit.float().mean() < 0.6
    for i in hit.nonzero().flatten()[:50]:
        rows, cols = changed[i].any(1), changed[i].any(0)
        r, c = rows.nonzero().flatten(), cols.nonzero().flatten()
        assert r.max() - r.min() + 1 == rows.sum() and c.max() - c.min() + 1 == cols.sum()  # one band each way
        assert torch.equal(changed[i], rows[:, None] & cols[None, :])  # one rectangle
    masks = box_masks(erase_boxes(2000, 32, 1.0, torch.Generator().manual_seed(0)), 32)  # [2000, 1, 32, 32]
    area = masks.flatten(1).float().mean(1)
    assert area.min() > 0.5 * ERASE_AREA[0] and area.max() < 1.3 * ERASE_AREA[1]  # rounding of the sides aside
    assert not box_masks(erase_boxes(50, 32, 0.0, torch.Generator().manual_seed(0)), 32).any()


def test_load_image(tmp_path):
    from PIL import Image

    arr = uint8_images(n=1, size=12)[0]
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.dtype == torch.uint8 and torch.equal(img, torch.from_numpy(arr))
    with pytest.raises(UnreadableImageError):
        load_image(tmp_path / "missing.png")


def test_embed_images_equals_direct_forward():
    model = small_model()
    images = uint8_images(n=5, size=40)
    emb = embedding.embed_images(model, images, 32, batch_size=2, progress=False)
    assert emb.shape == (5, DIM) and emb.dtype == np.float32
    with torch.no_grad():
        direct = model.eval()(preprocess(torch.from_numpy(images), 32)).numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    spec_emb = embedding.embed_images(model, images, Preprocessing(32, 40), batch_size=3, progress=False)
    np.testing.assert_allclose(spec_emb, emb, atol=1e-5)
    empty = embedding.embed_images(model, images[:0], 32, progress=False)
    assert empty.shape == (0, DIM)


def test_embed_paths_decodes_at_the_cache_size(tmp_path):
    """embed_paths = decode at spec.cache_size, then embed_images; cache_size 0 chooses from the images."""
    from PIL import Image

    model = small_model()
    images = uint8_images(n=3, size=40)
    paths = []
    for i, arr in enumerate(images):
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    spec = Preprocessing(image_size=32, cache_size=40)
    got = embedding.embed_paths(paths, model, spec, batch_size=2, device="cpu", cache_dir=tmp_path / "cache",
                                progress=False)
    want = embedding.embed_images(model, images, spec, batch_size=2, device="cpu", progress=False)
    np.testing.assert_allclose(got, want, atol=1e-5)
    v1 = embedding.embed_paths(paths, model, Preprocessing(image_size=32, cache_size=0), device="cpu",
                               cache_dir=tmp_path / "cache", progress=False)
    assert v1.shape == (3, DIM) and np.isfinite(v1).all()


def test_resolve_precision():
    assert runtime.resolve_precision("cpu").dtype is None
    assert runtime.resolve_precision("cpu", amp="on").dtype == torch.bfloat16
    assert runtime.resolve_precision("cuda", amp="off").dtype is None
    fp32 = runtime.resolve_precision("cpu", amp="off")
    assert fp32.name == "fp32" and not fp32.needs_loss_scaling and not fp32.grad_scaler().is_enabled()
    bf16 = runtime.resolve_precision("cpu", amp="on")
    assert bf16.name == "bf16" and not bf16.needs_loss_scaling
    fp16 = runtime.resolve_precision("cpu", dtype=torch.float16)
    assert fp16.name == "fp16" and fp16.needs_loss_scaling
    with pytest.raises(UserError, match="--amp"):
        runtime.resolve_precision("cpu", amp="maybe")


def test_memory_format_policy_is_one_answer_for_training_and_embedding():
    assert runtime.memory_format("cpu") == runtime.memory_format("cuda") == torch.channels_last
    # embedding uses the policy: the same vectors as a plain NCHW forward (the layout changes no maths)
    torch.manual_seed(0)
    model = drn.build_model("resnet18", 16, None, "none", "conv1").eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        plain = torch.nn.functional.normalize(model(preprocess(torch.from_numpy(images), 32)), dim=1).numpy()
    assert np.allclose(embedding.embed_images(model, images, 32, progress=False), plain, atol=1e-5)

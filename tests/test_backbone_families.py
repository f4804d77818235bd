"""Any torchvision classification model (or timm:<name>) as the deep path: built headless, its stages
and --train-from, its weights (--weights PATH; the offline ImageNet message is in test_backbones.py),
its pixels, and train_net.py / gen_embeddings.py with it. Small models, random weights, tiny images, CPU."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torchvision

import deep_rank_net as drn
import gen_embeddings
from deepranking import backbones, checkpoint, cli, embedding_io, image_data
from deepranking.cli import UserError
from deepranking.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from deepranking.reference_features import reference_features
from test_train_net import TINY, _one_thread, csvs, fails, train  # noqa: F401  (fixtures used by name)

# arch -> (pooled feature size, where torchvision's full model feeds its classifier)
HEADLESS = {
    "mobilenet_v3_small": (576, "classifier"),
    "efficientnet_b0": (1280, "classifier"),
    "regnet_y_400mf": (440, "fc"),
    "convnext_tiny": (768, "classifier.2"),
    "swin_t": (768, "head"),
    "vit_b_16": (768, "heads"),
}


def full_model(arch: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def frozen(model: drn.DeepRankNet) -> set[str]:
    return {name for name, p in model.backbone.named_parameters() if not p.requires_grad}


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("arch", list(HEADLESS))
def test_headless_backbone_returns_what_the_classifier_reads(arch):
    """Same seed -> torchvision's own weights; the output is its classifier's input (ViT: the class token)."""
    dim, classifier = HEADLESS[arch]
    side = 32
    torch.manual_seed(0)
    built = backbones.headless_backbone(arch, side)
    full = full_model(arch, 0, **({"image_size": side} if arch.startswith("vit") else {})).eval()
    seen = []
    full.get_submodule(classifier).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = built.module.eval()(x)
        full(x)
    assert built.feature_dim == dim and out.shape == (2, dim)
    torch.testing.assert_close(out, seen[0].flatten(1))
    # the stages cover every weight, each once
    names = [n for stage in backbones.STAGES for n in built.stages[stage]]
    owner = {p: n for n in names for p, _ in built.module.named_parameters() if p == n or p.startswith(n + ".")}
    assert set(owner) == {p for p, _ in built.module.named_parameters()}
    assert len(names) == len(set(names))


def test_stages_group_blocks_by_their_output_stride_like_resnets_layers():
    effnet = backbones.headless_backbone("efficientnet_b0").stages
    assert effnet == {"conv1": ("features.0", "features.1"), "layer1": ("features.2",), "layer2": ("features.3",),
                      "layer3": ("features.4", "features.5"), "layer4": ("features.6", "features.7", "features.8")}
    regnet = backbones.headless_backbone("regnet_y_400mf").stages
    assert regnet == {"conv1": ("stem",), **{f"layer{i}": (f"trunk_output.block{i}",) for i in range(1, 5)}}
    # SqueezeNet's deepest blocks work at stride 16: they are its layer4 all the same
    squeeze = backbones.headless_backbone("squeezenet1_1").stages
    assert squeeze["layer4"] == ("features.9", "features.10", "features.11", "features.12")
    vit = backbones.headless_backbone("vit_b_16", 32)
    assert vit.stages["conv1"] == ("conv_proj", "class_token", "encoder.pos_embedding")
    assert vit.stages["layer4"] == tuple(f"encoder.layers.encoder_layer_{i}" for i in (9, 10, 11)) + ("encoder.ln",)
    assert len(vit.blocks) == 12


def test_image_sizes_a_backbone_cannot_take_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"vit_b_16 needs an image size that is a multiple of its 16 px patches, "
                                        r"got 40 \(e.g. 32\)"):
        backbones.headless_backbone("vit_b_16", 40)
    with pytest.raises(UserError, match="maxvit_t cannot run on 64 px images .*its pretrained weights are for 224 px"):
        backbones.headless_backbone("maxvit_t", 64)


def test_bad_names_say_how_to_see_the_valid_ones(monkeypatch):
    with pytest.raises(UserError) as err:
        backbones.check_arch("convnext_tiniest")
    message = str(err.value)
    assert "did you mean convnext_tiny" in message and "list_models" in message and "timm:" in message
    assert "\n" not in message
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(UserError, match=r"^--arch timm:\.\.\. needs the timm package: pip install timm$"):
        backbones.check_arch("timm:resnet18")
    with pytest.raises(UserError, match="train_from stage 'layer9'"):
        backbones.check_train_from("layer9")


# ---------------------------------------------------------------- --train-from


@pytest.mark.parametrize("arch, train_from, frozen_prefixes", [
    ("mobilenet_v3_small", "layer3", ("features.0.", "features.1.", "features.2.", "features.3.")),
    ("convnext_tiny", "layer2", ("features.0.", "features.1.")),
    ("vit_b_16", "block8", ("conv_proj.", "class_token", "encoder.pos_embedding",
                            *(f"encoder.layers.encoder_layer_{i}." for i in range(8)))),
    ("vit_b_16", "layer4", ("conv_proj.", "class_token", "encoder.pos_embedding",
                            *(f"encoder.layers.encoder_layer_{i}." for i in range(9)))),
])
def test_train_from_freezes_the_stages_before_it(arch, train_from, frozen_prefixes):
    model = drn.DeepRankNet(arch, 16, train_from=train_from, image_size=32)
    assert frozen(model) == {n for n, _ in model.backbone.named_parameters() if n.startswith(frozen_prefixes)}
    assert frozen(model) and len(frozen(model)) < len(list(model.backbone.parameters()))


def test_a_training_step_moves_neither_the_weights_nor_the_bn_statistics_of_frozen_stages():
    torch.manual_seed(0)
    model = drn.DeepRankNet("mobilenet_v3_small", 16, train_from="layer3", image_size=32).train()
    bn_frozen, bn_trained = model.backbone.features[2].block[0][1], model.backbone.features[4].block[0][1]
    assert not bn_frozen.training and bn_trained.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    after = model.backbone.state_dict()
    moved = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {str(i) for i in range(4, 13)}  # features.4 .. features.12: layer3 and layer4


def test_train_from_block_needs_a_vit_and_a_block_it_has():
    with pytest.raises(UserError, match="block3: mobilenet_v3_small is not ViT-style; its stages are conv1, layer1"):
        drn.DeepRankNet("mobilenet_v3_small", 16, train_from="block3", image_size=32)
    with pytest.raises(UserError, match="block12: vit_b_16 has blocks 0 to 11"):
        drn.DeepRankNet("vit_b_16", 16, train_from="block12", image_size=32)


# ---------------------------------------------------------------- weights


def test_a_torchvision_state_dict_loads_by_path_without_its_classifier(tmp_path):
    full = full_model("efficientnet_b0", 1)
    path = tmp_path / "b0.pth"
    torch.save(full.state_dict(), path)  # classifier included
    model = drn.DeepRankNet("efficientnet_b0", 16, weights=str(path), image_size=32)
    want = full.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.backbone.state_dict().items())
    # a file of another backbone is named, even among a family's variants
    torch.save(full_model("regnet_y_400mf", 1).state_dict(), tmp_path / "regnet.pth")
    with pytest.raises(UserError, match="holds regnet_y_400mf weights, but the model is efficientnet_b0"):
        drn.DeepRankNet("efficientnet_b0", 16, weights=str(tmp_path / "regnet.pth"), image_size=32)
    torch.save(full_model("resnext50_32x4d", 1).state_dict(), tmp_path / "resnext.pth")
    with pytest.raises(UserError, match="holds resnext50_32x4d weights, but the model is resnet50"):
        backbones.load_backbone_weights(backbones.headless_backbone("resnet50").module, "resnet50",
                                        str(tmp_path / "resnext.pth"))


def test_vit_weights_for_another_size_get_their_position_embeddings_interpolated(tmp_path, capsys):
    full = full_model("vit_b_16", 2)  # 224 px: 14 x 14 patches
    path = tmp_path / "vit.pth"
    torch.save(full.state_dict(), path)
    built = backbones.headless_backbone("vit_b_16", 64)
    backbones.load_backbone_weights(built.module, "vit_b_16", str(path))
    assert "position embeddings interpolated from 14x14 to 4x4 patches (64 px images)" in capsys.readouterr().err
    got, want = built.module.state_dict(), full.state_dict()
    assert got["encoder.pos_embedding"].shape == (1, 17, 768)
    torch.testing.assert_close(got["encoder.pos_embedding"][:, 0], want["encoder.pos_embedding"][:, 0])  # class token
    assert all(torch.equal(got[k], want[k]) for k in got if k != "encoder.pos_embedding")


# ---------------------------------------------------------------- pixels, training, reference rows


def test_each_backbone_brings_the_normalisation_of_its_weights():
    assert backbones.backbone_preprocessing("resnet18", 224, 256) == Preprocessing(224, 256)
    v2l = backbones.backbone_preprocessing("efficientnet_v2_l", 64, 64)  # trained on [-1, 1] inputs
    assert (v2l.mean, v2l.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert backbones.native_image_size("efficientnet_b1") == 240 and backbones.native_image_size("small-cnn") is None


@pytest.mark.parametrize("arch, train_from, frozen_prefixes, trained", [
    ("mobilenet_v3_small", "layer3", tuple(f"features.{i}." for i in range(4)), "features.12.0.weight"),
    ("timm:vit_tiny_patch16_224", "block9", tuple(f"blocks.{i}." for i in range(9)), "blocks.11.mlp.fc1.weight"),
])
def test_train_net_trains_a_backbone_from_a_weights_file_and_every_stage_embeds_alike(
        arch, train_from, frozen_prefixes, trained, csvs, tmp_path):
    if backbones.is_timm(arch):
        timm = pytest.importorskip("timm")
        torch.manual_seed(3)
        weights = timm.create_model(arch[len("timm:"):], pretrained=False).state_dict()  # 224 px, with its head
    else:
        weights = full_model(arch, 3).state_dict()
    torch.save(weights, tmp_path / "weights.pth")
    out = tmp_path / "run"
    flags = [*TINY, "--arch", arch, "--weights", tmp_path / "weights.pth", "--train-from", train_from]
    train("--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", 1, "--output-dir", out, "--lr", "0.01", *flags)
    ckpt = checkpoint.load_checkpoint(out / "deepranknet.model")
    spec = backbones.backbone_preprocessing(arch, 32, ckpt["preprocessing"]["cache_size"])
    assert ckpt["preprocessing"] == spec.to_dict() and ckpt["model_config"]["arch"] == arch
    if backbones.is_timm(arch):
        assert spec.mean == (0.5, 0.5, 0.5)  # timm's config for this ViT, not ImageNet's
    else:
        assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    # frozen stages hold the file's weights (BatchNorm statistics too), trained ones moved
    frozen_keys = [k for k in weights if k.startswith(frozen_prefixes)]
    assert frozen_keys and all(torch.equal(ckpt["model"]["backbone." + k], weights[k]) for k in frozen_keys)
    assert not torch.equal(ckpt["model"]["backbone." + trained], weights[trained])
    # gen_embeddings.py rebuilds the net and its pixels from the checkpoint: validation's distances again
    emb = tmp_path / "val.txt"
    cli.run(gen_embeddings.main, gen_embeddings.get_args_parser(),
            ["--model", str(out / "deepranknet.model"), "--data-dir", str(csvs[0].parent / "tin"), "--splits", "val",
             "--test-output", str(emb), "--no-progress", "--device", "cpu"])
    db = embedding_io.read_embeddings(emb, progress=False)
    row = {p: i for i, p in enumerate(db.paths)}
    epoch = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_d_pos" in r][-1]
    q, p, _ = (np.array([row[x] for x in col]) for col in image_data.read_triplet_csv(csvs[1]))
    e = db.emb.astype(np.float64)
    assert np.linalg.norm(e[q] - e[p], axis=1).mean() == pytest.approx(epoch["val_d_pos"], abs=1e-5)


def test_reference_rows_of_any_backbone(tmp_path):
    model, spec = reference_features("backbone", "mobilenet_v3_small", "none", image_size=32)
    assert spec == backbones.backbone_preprocessing("mobilenet_v3_small", 32, 32)
    assert model.config == {"features": "backbone", "arch": "mobilenet_v3_small", "weights": "none",
                            "embedding_dim": 576}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 576)
    _, default = reference_features("backbone", "efficientnet_b1", "none")
    assert default.image_size == 240  # the side its ImageNet weights were evaluated at


def test_train_net_refuses_an_unknown_arch_in_one_line(csvs, tmp_path, capsys):
    err = fails(capsys, "--triplets", csvs[0], "--output-dir", tmp_path / "x", *TINY, "--arch", "resnet19")
    assert "unknown architecture 'resnet19' (did you mean resnet18" in err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- timm (optional)


def test_timm_backbones_build_headless_with_their_own_stages_and_pixels(monkeypatch):
    pytest.importorskip("timm")
    vit = backbones.headless_backbone("timm:vit_tiny_patch16_224", 32)
    assert vit.feature_dim == 192 and len(vit.blocks) == 12
    with torch.no_grad():
        assert vit.module.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    spec = backbones.backbone_preprocessing("timm:vit_tiny_patch16_224", 32, 32)
    assert (spec.mean, spec.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    resnet = backbones.headless_backbone("timm:resnet18", 32)
    assert resnet.stages["conv1"] == ("conv1.weight", "bn1.weight", "bn1.bias") and not resnet.blocks
    assert all(n.startswith("layer3.") for n in resnet.stages["layer3"])
    model = drn.DeepRankNet("timm:resnet18", 16, train_from="layer4", image_size=32)
    assert frozen(model) == {n for n, _ in model.backbone.named_parameters() if not n.startswith("layer4.")}
    # pretrained weights offline: one line saying what to do instead
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(builder, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="cannot load the pretrained weights of timm:resnet18 .*--weights PATH"):
        drn.DeepRankNet("timm:resnet18", 16, weights="imagenet", image_size=32)

"""Backbones (train/models): the registry, the forward_features contract of every registered backbone, the
ViT's timm names and its attention against a float64 computation by hand, export/load and
backbone_from_meta. Small sizes throughout (width-8 ResNets, 32 px, ViTs with patch 4)."""

from __future__ import annotations

import math

import pytest
import torch

from train.models import (BackboneArgs, MultiViewEncoder, VisionTransformer, backbone_from_meta, build_backbone,
                          export_backbone, known_backbones, load_backbone, register_backbone)
from train.models import registry
from train.models.vit import Block

IMAGE = (2, 3, 32, 32)
CLIP = (2, 3, 4, 32, 32)
SMALL = {  # arch: (build_backbone keywords, input shape)
    "resnet18": ({"width": 8, "cifar_stem": True}, IMAGE),
    "resnet34": ({"width": 8, "cifar_stem": True}, IMAGE),
    "resnet50": ({"width": 8, "cifar_stem": True}, IMAGE),
    "r3d18": ({"width": 8}, CLIP),
    "r2plus1d18": ({"width": 8}, CLIP),
    "vit_tiny": ({"patch_size": 4, "image_size": 32}, IMAGE),
    "vit_small": ({"patch_size": 4, "image_size": 32}, IMAGE),
}
ARCH_NAMES = list(SMALL)


def small(arch: str, in_channels: int = 3, seed: int = 0):
    """(net in eval mode, an input for it) for `arch` at the small size."""
    kw, shape = SMALL[arch]
    torch.manual_seed(seed)
    net = build_backbone(arch, **kw, in_channels=in_channels).eval()
    return net, torch.randn(shape[0], in_channels, *shape[2:])


def small_cmc():
    torch.manual_seed(0)
    net = build_backbone("resnet18", 8, True, False, [1, 2]).eval()
    return net, [torch.randn(2, 1, 32, 32), torch.randn(2, 2, 32, 32)]


# -- registry ----------------------------------------------------------------------------------
def test_every_registered_backbone_has_a_small_case():
    assert set(known_backbones()) == set(SMALL)
    assert known_backbones()[:5] == ("resnet18", "resnet34", "resnet50", "r3d18", "r2plus1d18")


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown arch 'vgg'; known: resnet18, .*r2plus1d18, vit_tiny, vit_small"):
        build_backbone("vgg")


def test_register_backbone_adds_a_name_and_refuses_a_taken_one(monkeypatch):
    monkeypatch.setattr(registry, "_BACKBONES", dict(registry._BACKBONES))
    seen = []

    @register_backbone("toy")
    def toy(arch: str, a: BackboneArgs) -> torch.nn.Module:
        seen.append((arch, a))
        return torch.nn.Identity()

    assert "toy" in known_backbones() and isinstance(build_backbone("toy", 16, in_channels=5), torch.nn.Identity)
    assert seen == [("toy", BackboneArgs(16, False, False, None, 5, 224, 0))]
    with pytest.raises(ValueError, match="already registered: resnet18"):
        register_backbone("toy2", "resnet18")(toy)
    assert "toy2" not in known_backbones()  # nothing of a refused registration is kept


def test_build_backbone_positional_signature():
    net = build_backbone("resnet18", 8, True, False, None)  # how train/methods/base.py calls it
    assert net.width == 8 and net.cifar_stem and net.in_channels == 3
    cmc = build_backbone("resnet18", 8, True, False, [1, 2])
    assert isinstance(cmc, MultiViewEncoder) and cmc.channels == [1, 2]
    with pytest.raises(TypeError):
        build_backbone("resnet18", 8, True, False, None, 1)  # in_channels is keyword-only


@pytest.mark.parametrize("arch,kw,msg", [
    ("resnet18", {"channels": [1, 2], "in_channels": 1}, "either channels .* or in_channels"),
    ("resnet18", {"patch_size": 4}, "patch_size is for ViTs"),
    ("r3d18", {"channels": [1, 2]}, "not supported for video"),
    ("r3d18", {"patch_size": 8}, "patch_size is for ViTs"),
    ("vit_small", {"channels": [1, 2]}, "ResNets only"),
    ("vit_small", {"cifar_stem": True}, "patch_size 4 or 8"),
    ("vit_small", {"image_size": 30, "patch_size": 4}, "not a multiple of patch_size"),
])
def test_build_backbone_refuses_arguments_that_do_not_apply(arch, kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_backbone(arch, **kw)


# -- forward_features --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_pooled_equals_forward(arch):
    net, x = small(arch)
    with torch.no_grad():
        feats = net.forward_features(x)
        y = net(x)
    assert list(feats) == ["pooled"] and torch.equal(feats["pooled"], y)
    assert y.shape == (2, net.feat_dim) == (2, net.feature_dims["pooled"])


def test_pooled_equals_forward_cmc():
    net, xs = small_cmc()
    with torch.no_grad():
        assert torch.equal(net.forward_features(xs)["pooled"], net(xs))
        assert torch.equal(net(xs), torch.cat([e(v) for e, v in zip(net.encoders, xs)], 1))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "r3d18", "r2plus1d18"])
def test_forward_keeps_the_plain_trunk_numerics(arch):
    """forward is still stem -> layer1..4 -> average pool: the golden losses rest on these numbers."""
    net, x = small(arch)
    stem = net.stem if hasattr(net, "stem") else torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    with torch.no_grad():
        ref = torch.flatten(net.avgpool(net.layer4(net.layer3(net.layer2(net.layer1(stem(x)))))), 1)
        assert torch.equal(net(x), ref)


EXPECTED_SHAPES = {
    "resnet18": {"stage1": (2, 8, 32, 32), "stage2": (2, 16, 16, 16), "stage3": (2, 32, 8, 8),
                 "stage4": (2, 64, 4, 4), "pooled": (2, 64)},
    "resnet34": {"stage1": (2, 8, 32, 32), "stage2": (2, 16, 16, 16), "stage3": (2, 32, 8, 8),
                 "stage4": (2, 64, 4, 4), "pooled": (2, 64)},
    "resnet50": {"stage1": (2, 32, 32, 32), "stage2": (2, 64, 16, 16), "stage3": (2, 128, 8, 8),
                 "stage4": (2, 256, 4, 4), "pooled": (2, 256)},
    # stem: stride (1, 2, 2); layer2..4 halve T, H and W
    "r3d18": {"stage1": (2, 8, 4, 16, 16), "stage2": (2, 16, 2, 8, 8), "stage3": (2, 32, 1, 4, 4),
              "stage4": (2, 64, 1, 2, 2), "frames": (2, 1, 64), "pooled": (2, 64)},
    "r2plus1d18": {"stage1": (2, 8, 4, 16, 16), "stage2": (2, 16, 2, 8, 8), "stage3": (2, 32, 1, 4, 4),
                   "stage4": (2, 64, 1, 2, 2), "frames": (2, 1, 64), "pooled": (2, 64)},
    "vit_tiny": {"tokens": (2, 64, 192), "pooled": (2, 192)},  # 32 / 4 = 8x8 patches
    "vit_small": {"tokens": (2, 64, 384), "pooled": (2, 384)},
}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_feature_shapes_and_dims(arch):
    net, x = small(arch)
    with torch.no_grad():
        feats = net.forward_features(x, net.feature_names)
    assert tuple(feats) == net.feature_names == tuple(net.feature_dims) == tuple(EXPECTED_SHAPES[arch])
    for name, t in feats.items():
        assert tuple(t.shape) == EXPECTED_SHAPES[arch][name], name
        channel_axis = -1 if name in ("frames", "tokens") else 1
        assert t.shape[channel_axis] == net.feature_dims[name], name
    with torch.no_grad():
        assert torch.equal(feats["pooled"], net(x))


@pytest.mark.parametrize("arch", ["resnet18", "r3d18"])
def test_stage_outputs_are_the_layer_outputs_and_later_stages_do_not_run(arch):
    net, x = small(arch)
    seen = {}
    for i in range(1, 5):
        getattr(net, f"layer{i}").register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out))
    with torch.no_grad():
        feats = net.forward_features(x, ["stage2", "stage1"])
    assert list(feats) == ["stage2", "stage1"] and sorted(seen) == [1, 2]
    assert feats["stage1"] is seen[1] and feats["stage2"] is seen[2]


def test_video_frames_are_the_last_stage_pooled_over_space():
    net, _ = small("r3d18")
    x = torch.randn(2, 3, 16, 16, 16)
    with torch.no_grad():
        f = net.forward_features(x, ["stage4", "frames", "pooled"])
    assert f["stage4"].shape == (2, 64, 2, 1, 1) and f["frames"].shape == (2, 2, 64)
    torch.testing.assert_close(f["frames"], f["stage4"].flatten(2).transpose(1, 2))
    torch.testing.assert_close(f["frames"].mean(1), f["pooled"])


def test_cmc_per_view_features():
    net, xs = small_cmc()
    assert net.feature_names[0] == "pooled" and "view1.stage3" in net.feature_names
    with torch.no_grad():
        f = net.forward_features(xs, ["view0.stage3", "view1.pooled", "pooled"])
        assert f["view0.stage3"].shape == (2, 32, 8, 8) and net.feature_dims["view0.stage3"] == 32
        assert torch.equal(f["view1.pooled"], net.encoders[1](xs[1])) and torch.equal(f["pooled"], net(xs))
    with pytest.raises(ValueError, match="2 encoders .* but 1 views"):
        net(xs[:1])


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_unknown_output_lists_the_available_ones(arch):
    net, x = small(arch)
    with pytest.raises(ValueError, match=r"unknown outputs \['stage9'\]; available: " + ", ".join(net.feature_names)):
        net.forward_features(x, ["pooled", "stage9"])
    with pytest.raises(ValueError, match="none requested"):
        net.forward_features(x, [])
    with torch.no_grad():
        assert list(net.forward_features(x, "pooled")) == ["pooled"]  # one name as a plain string


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("in_channels", [1, 13])
def test_in_channels(arch, in_channels):
    net, x = small(arch, in_channels)
    assert x.shape[1] == in_channels and net.meta()["in_channels"] == str(in_channels)
    with torch.no_grad():
        assert net(x).shape == (2, net.feat_dim)
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 3, *x.shape[2:]))
    rebuilt = backbone_from_meta(net.meta())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


# -- ViT: timm's names and shapes, attention by hand, position grid -----------------------------
# timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(): (name, shape) in order
D = 384
TIMM_VIT_S16_GLOBALS = [("cls_token", (1, 1, D)), ("pos_embed", (1, 1 + 14 * 14, D)),
                        ("patch_embed.proj.weight", (D, 3, 16, 16)), ("patch_embed.proj.bias", (D,))]
TIMM_VIT_S16_BLOCK0 = [("blocks.0.norm1.weight", (D,)), ("blocks.0.norm1.bias", (D,)),
                       ("blocks.0.attn.qkv.weight", (3 * D, D)), ("blocks.0.attn.qkv.bias", (3 * D,)),
                       ("blocks.0.attn.proj.weight", (D, D)), ("blocks.0.attn.proj.bias", (D,)),
                       ("blocks.0.norm2.weight", (D,)), ("blocks.0.norm2.bias", (D,)),
                       ("blocks.0.mlp.fc1.weight", (4 * D, D)), ("blocks.0.mlp.fc1.bias", (4 * D,)),
                       ("blocks.0.mlp.fc2.weight", (D, 4 * D)), ("blocks.0.mlp.fc2.bias", (D,))]
TIMM_VIT_S16_FINAL = [("norm.weight", (D,)), ("norm.bias", (D,))]
TIMM_VIT_S16_KEYS = 4 + 12 * 12 + 2  # globals, 12 blocks of 12 tensors, final norm; no head, no buffers
TIMM_VIT_S16_PARAMS = 22_050_664 - (384 * 1000 + 1000)  # timm's count with the 1000-way head, less the head


def test_vit_small_has_timm_names_and_shapes():
    net = build_backbone("vit_small")
    sd = net.state_dict()
    assert len(sd) == TIMM_VIT_S16_KEYS == 150
    assert sum(p.numel() for p in net.parameters()) == TIMM_VIT_S16_PARAMS
    blocks = [(n.replace("blocks.0.", f"blocks.{i}."), s) for i in range(12) for n, s in TIMM_VIT_S16_BLOCK0]
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == TIMM_VIT_S16_GLOBALS + blocks + TIMM_VIT_S16_FINAL
    assert isinstance(net, VisionTransformer) and net.feat_dim == D and net.patch_size == 16 and net.grid == 14
    norms = [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 25 and all(m.eps == 1e-6 for m in norms)
    assert net.blocks[0].mlp.act.approximate == "none"  # exact (erf) GELU, as timm's nn.GELU


def test_vit_tiny_and_small_patch_sizes():
    tiny = build_backbone("vit_tiny", patch_size=4, image_size=32)
    assert sum(p.numel() for p in build_backbone("vit_tiny").parameters()) == 5_717_416 - (192 * 1000 + 1000)
    sd = tiny.state_dict()
    assert sd["pos_embed"].shape == (1, 65, 192) and sd["patch_embed.proj.weight"].shape == (192, 3, 4, 4)
    assert build_backbone("vit_small", 64, image_size=32, patch_size=8).state_dict()["pos_embed"].shape == (1, 17, 384)


def test_vit_init_follows_timm():
    torch.manual_seed(0)
    net = build_backbone("vit_small")
    assert net.cls_token.abs().max() < 1e-5 and 0.015 < net.pos_embed.std() < 0.025
    qkv = net.blocks[3].attn.qkv
    assert 0.015 < qkv.weight.std() < 0.025 and not qkv.bias.any()
    assert torch.equal(net.norm.weight, torch.ones(D)) and not net.norm.bias.any()


def _timm():
    try:
        import timm
    except Exception as e:  # timm's import fails here when torchvision's ops do not register, not only ImportError
        pytest.skip(f"timm does not import: {type(e).__name__}: {e}")
    return timm


@pytest.mark.parametrize("arch,timm_name,kw,size", [
    ("vit_small", "vit_small_patch16_224", {}, 224),
    ("vit_tiny", "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32),
])
def test_vit_export_loads_into_timm_strictly(tmp_path, arch, timm_name, kw, size):
    timm = _timm()
    from safetensors.torch import load_file
    torch.manual_seed(0)
    net = build_backbone(arch, image_size=size, patch_size=kw.get("patch_size", 0)).eval()
    export_backbone(net, str(tmp_path / "b.safetensors"))
    ref = timm.create_model(timm_name, num_classes=0, **kw).eval()
    ref.load_state_dict(load_file(str(tmp_path / "b.safetensors")), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))
        torch.testing.assert_close(net.forward_features(x, "tokens")["tokens"], ref.forward_features(x)[:, 1:])
    dyn = timm.create_model(timm_name, num_classes=0, dynamic_img_size=True, **kw).eval()
    dyn.load_state_dict(net.state_dict(), strict=True)
    other = torch.randn(2, 3, size + 2 * net.patch_size, size - net.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(net(other), dyn(other))  # same bicubic resampling of the position grid


def _layer_norm64(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _attention64(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    """softmax(Q K^T / sqrt(dh)) V per head, by hand: qkv rows are [q | k | v], each split into heads."""
    b, n, d = x.shape
    dh = d // heads
    qkv = x @ qkv_w.T + qkv_b
    out = torch.empty(b, n, d, dtype=torch.float64)
    for h in range(heads):
        q, k, v = (qkv[..., j * d + h * dh: j * d + (h + 1) * dh] for j in range(3))
        s = q @ k.transpose(1, 2) / math.sqrt(dh)
        p = torch.exp(s - s.max(-1, keepdim=True).values)
        out[..., h * dh:(h + 1) * dh] = (p / p.sum(-1, keepdim=True)) @ v
    return out @ proj_w.T + proj_b


def test_vit_block_matches_float64_by_hand():
    torch.manual_seed(0)
    dim, heads = 24, 3
    blk = Block(dim, heads).double()
    with torch.no_grad():  # norms away from ones/zeros so that a misplaced norm shows
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 5, dim, dtype=torch.float64)
    P = dict(blk.named_parameters())
    h = _layer_norm64(x, P["norm1.weight"], P["norm1.bias"])
    attn = _attention64(h, P["attn.qkv.weight"], P["attn.qkv.bias"], P["attn.proj.weight"], P["attn.proj.bias"], heads)
    with torch.no_grad():
        torch.testing.assert_close(blk.attn(h), attn, rtol=0, atol=1e-12)
        x1 = x + attn
        h2 = _layer_norm64(x1, P["norm2.weight"], P["norm2.bias"])
        u = h2 @ P["mlp.fc1.weight"].T + P["mlp.fc1.bias"]
        u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        expected = x1 + u @ P["mlp.fc2.weight"].T + P["mlp.fc2.bias"]
        torch.testing.assert_close(blk(x), expected, rtol=0, atol=1e-12)


def test_vit_pooled_is_the_class_token_after_the_final_norm():
    net, x = small("vit_tiny")
    seen = {}
    net.norm.register_forward_hook(lambda m, inp, out: seen.__setitem__("norm", out))
    with torch.no_grad():
        f = net.forward_features(x, ["tokens", "pooled"])
    assert torch.equal(f["pooled"], seen["norm"][:, 0]) and torch.equal(f["tokens"], seen["norm"][:, 1:])


def test_vit_other_input_sizes_resample_the_position_grid():
    net, x = small("vit_tiny")  # trained grid 8x8 (32 px, patch 4)
    assert net._pos_embed(8, 8) is net.pos_embed
    with torch.no_grad():
        assert net.forward_features(torch.randn(2, 3, 48, 40), "tokens")["tokens"].shape == (2, 12 * 10, 192)
        net.pos_embed[:, 1:] = 0.25  # a constant grid resamples to the same constant
        pos = net._pos_embed(12, 10)
    assert pos.shape == (1, 1 + 120, 192) and torch.equal(pos[:, 0], net.pos_embed[:, 0])
    torch.testing.assert_close(pos[:, 1:], torch.full((1, 120, 192), 0.25))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        net(torch.randn(2, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.randn(2, 3, 4, 32, 32))


def test_vit_gradients_reach_every_parameter():
    net, x = small("vit_tiny")
    net.train()
    net(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# -- export / load / backbone_from_meta -------------------------------------------------------
BUILD_KEYS = {"resnet": {"arch", "width", "cifar_stem", "in_channels"},
              "video": {"arch", "width", "cifar_stem", "in_channels", "input"},
              "vit": {"arch", "in_channels", "patch_size", "vit_image_size"}}


def _family(arch: str) -> str:
    return "vit" if arch.startswith("vit") else "video" if arch.startswith("r3d") or arch.startswith("r2") else "resnet"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_export_load_roundtrip(tmp_path, arch):
    net, x = small(arch, in_channels=1)
    assert set(net.meta()) == BUILD_KEYS[_family(arch)]
    # the trainer adds the evaluation size as image_size: it must not change how a ViT rebuilds
    export_backbone(net, str(tmp_path / "b.safetensors"), extra={"recipe": "simclr", "image_size": "48"})
    back = load_backbone(str(tmp_path / "b.safetensors")).eval()
    assert type(back) is type(net) and back.meta() == net.meta()
    with torch.no_grad():
        assert torch.equal(net(x), back(x))


def test_export_load_roundtrip_cmc(tmp_path):
    net, xs = small_cmc()
    export_backbone(net, str(tmp_path / "c.safetensors"))
    back = load_backbone(str(tmp_path / "c.safetensors")).eval()
    assert isinstance(back, MultiViewEncoder) and back.channels == [1, 2]
    with torch.no_grad():
        assert torch.equal(net(xs), back(xs))


def test_export_refuses_extra_that_overwrites_a_build_key(tmp_path):
    net, _ = small("vit_tiny")
    with pytest.raises(ValueError, match="vit_image_size"):
        export_backbone(net, str(tmp_path / "b.safetensors"), extra={"vit_image_size": "224"})
    assert not (tmp_path / "b.safetensors").exists()
    export_backbone(net, str(tmp_path / "b.safetensors"), extra={"vit_image_size": "32"})  # same value: fine


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_backbone_from_meta_rebuilds(arch):
    net, _ = small(arch, in_channels=13)
    rebuilt = backbone_from_meta(net.meta())
    assert type(rebuilt) is type(net) and rebuilt.meta() == net.meta() and rebuilt.feat_dim == net.feat_dim
    assert rebuilt.feature_dims == net.feature_dims
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_backbone_from_meta_reads_files_written_before_in_channels_mattered():
    net = backbone_from_meta({"arch": "resnet18", "width": "8", "cifar_stem": "1"})
    assert net.in_channels == 3 and net.cifar_stem and net.width == 8
    cmc = backbone_from_meta({"arch": "resnet18", "width": "8", "cifar_stem": "1", "in_channels": "1",
                              "channels": "1,2"})
    assert isinstance(cmc, MultiViewEncoder) and [e.in_channels for e in cmc.encoders] == [1, 2]
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        backbone_from_meta({"arch": "vgg"})

"""Trainer units on random tensors: config, registry, models/export, methods, schedules, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from train import checkpoint as ckpt
from train import config
from train.methods import build_config, get_method, known, parse_config
from train_helpers import call, finish, make_method
from train.models import ResNet, build_backbone, export_backbone, load_backbone
from train.optim import LARS, cosine_schedule

TINY = {"arch": "resnet18", "width": 8, "cifar_stem": True, "proj_hidden": 64, "pred_hidden": 64,
        "proj_dim": 32, "queue_size": 64, "nce_k": 32}


def tiny_cfg(method: str, **kw) -> config.Config:
    """TINY's common keys, and its method keys where the method has them."""
    own = {f.name for f in dataclasses.fields(get_method(method).Config)}
    tiny = {k: v for k, v in TINY.items() if k not in ("queue_size", "nce_k") or k in own}
    return build_config({"method": method, **tiny, **kw})


# -- config ------------------------------------------------------------------------------------
def test_config_unknown_and_invalid_fail(tmp_path):
    with pytest.raises(config.ConfigError, match="unknown config key.*lrr"):
        config.build({"lrr": 1})
    with pytest.raises(config.ConfigError, match="'lr'.*not a number"):
        config.build({"lr": "abc"})
    with pytest.raises(config.ConfigError, match="'optimizer'.*choose from"):
        config.build({"optimizer": "rmsprop"})
    with pytest.raises(config.ConfigError, match="'epochs'"):
        config.build({"epochs": 0})
    with pytest.raises(config.ConfigError, match="'batch_size'.*not an int"):
        config.build({"batch_size": 1.5})
    bad = tmp_path / "run.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  momentumm: 0.9\n")
    with pytest.raises(config.ConfigError, match="momentumm"):
        parse_config(["--config", str(bad)])


def test_config_precedence_file_and_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("batch-size: 64\noptim:\n  lr: 0.5\nmethod: mocov2\n")
    cfg = parse_config(["--config", str(f), "--lr", "0.7", "--cifar-stem"])
    assert cfg.data.batch_size == 64 and cfg.optim.lr == 0.7 and cfg.model.cifar_stem is True
    assert cfg.run.method == "mocov2" and cfg.method.queue_size == 65536  # the method's default
    assert cfg.method.temperature == pytest.approx(0.2)
    from train.methods import config_from_dict
    cfg2 = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert cfg2 == cfg


@pytest.mark.parametrize("method, flags, key", [
    ("simclr", ["--queue-size", "4096"], "queue_size"),      # MoCo's key on SimCLR
    ("byol", ["--temperature", "0.1"], "temperature"),       # BYOL has no temperature
    ("mocov2", ["--nce-k", "64"], "nce_k"),                  # a memory-bank key on MoCo
    ("simclr", ["--cmc-objective", "core"], "cmc_objective"),
])
def test_a_key_the_method_does_not_use_fails_naming_it(method, flags, key):
    with pytest.raises(config.ConfigError, match=f"'{key}' does not apply to method '{method}'"):
        parse_config(["--method", method, *flags])
    parse_config(["--method", method])  # without it: fine


@pytest.mark.parametrize("drop", ["lr", "weight_decay", "warmup_epochs"])
def test_an_unresolved_placeholder_fails_at_parse_time(drop):
    """A method whose defaults lack a common value it needs (and a run that does not give it) fails naming
    the key, instead of training at lr 0 or handing LARS a weight decay of -1. (A method's own keys have
    real defaults in its Config dataclass: nothing to resolve.)"""
    cls = get_method("mocov2")
    lacking = type("Lacking", (), {"name": "mocov2", "Config": cls.Config, "clips": False,
                                   "defaults": {k: v for k, v in cls.defaults.items() if k != drop}})
    with pytest.raises(config.ConfigError, match=f"'{drop}': method 'mocov2' has no default"):
        config.build({"method": "mocov2"}, lacking)
    config.build({"method": "mocov2"}, cls)


@pytest.mark.parametrize("flags, key, allowed", [
    (["--lr", "1000"], "lr", r"\(0, 100\]"), (["--lr", "nan"], "lr", r"\(0, 100\]"),
    (["--weight-decay", "2"], "weight_decay", r"\[0, 1\)"), (["--sgd-momentum", "1.5"], "sgd_momentum", r"\[0, 1\)"),
    (["--temperature", "-0.1"], "temperature", r"\(0, 100\]"), (["--ema", "1"], "ema", r"\(0, 1\)"),
    (["--queue-size", "0"], "queue_size", ">= 1"), (["--probe-lr", "0"], "probe_lr", r"\(0, 10\]"),
    (["--bank-momentum", "1"], "bank_momentum", r"\[0, 1\)"),
])
def test_ranges_are_checked_with_what_is_allowed(flags, key, allowed):
    with pytest.raises(config.ConfigError, match=f"'{key}'.*{allowed}"):
        parse_config(["--method", "instdisc" if key == "bank_momentum" else "mocov2", *flags])


def test_unknown_method_lists_known():
    with pytest.raises(KeyError, match="known: " + ", ".join(known())):
        get_method("swav")
    with pytest.raises(config.ConfigError, match="unknown method 'swav'; known: " + ", ".join(known())):
        parse_config(["--method", "swav"])


# -- models ------------------------------------------------------------------------------------
def test_resnet_torchvision_names_and_shapes():
    r50 = ResNet("resnet50")
    sd = r50.state_dict()
    assert len(sd) == 318  # torchvision resnet50: 320 entries including fc.weight / fc.bias
    assert sd["layer4.2.bn3.running_var"].shape == (2048,)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert "layer1.0.downsample.1.num_batches_tracked" in sd and r50.feat_dim == 2048
    r18 = ResNet("resnet18", width=16, cifar_stem=True)
    assert len(r18.state_dict()) == 120 and r18(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    with pytest.raises(ValueError, match="known: resnet18"):
        ResNet("vgg")


def test_export_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("resnet18", 8, True).eval()
    export_backbone(net, str(tmp_path / "b.safetensors"))
    back = load_backbone(str(tmp_path / "b.safetensors")).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net(x), back(x))
    cmc = build_backbone("resnet18", 8, True, channels=[1, 2]).eval()
    export_backbone(cmc, str(tmp_path / "c.safetensors"))
    back = load_backbone(str(tmp_path / "c.safetensors")).eval()
    xs = [torch.randn(2, 1, 32, 32), torch.randn(2, 2, 32, 32)]
    assert torch.equal(cmc(xs), back(xs))


def test_export_loads_into_torchvision(tmp_path):
    tv = pytest.importorskip("torchvision")
    from safetensors.torch import load_file
    net = build_backbone("resnet50")
    export_backbone(net, str(tmp_path / "b.safetensors"))
    m = tv.models.resnet50()
    res = m.load_state_dict(load_file(str(tmp_path / "b.safetensors")), strict=False)
    assert set(res.missing_keys) == {"fc.weight", "fc.bias"} and not res.unexpected_keys
    m.eval(), net.eval()
    x = torch.randn(2, 3, 64, 64)
    feats = torch.nn.Sequential(*list(m.children())[:-1])(x).flatten(1)
    torch.testing.assert_close(feats, net(x))


# -- methods -----------------------------------------------------------------------------------
CASES = [("simclr", {}), ("mocov2", {}), ("infomin", {}), ("byol", {}), ("instdisc", {}),
         ("instdisc", {"nce_mode": "nce", "temperature": 0.5}), ("cmc", {}), ("cmc", {"cmc_negatives": "batch"})]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(map(str, k.values())) or 'default'}"
                                                for n, k in CASES])
def test_method_loss_falls_on_fixed_batch(name, kw):
    torch.manual_seed(0)
    cfg = tiny_cfg(name, **kw)
    chans = [1, 2] if name == "cmc" else [3, 3]
    m = make_method(cfg, 64, 20, chans)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    base = torch.randn(16, 3, 16, 16)
    views = [base[:, :c] + 0.1 * torch.randn(16, c, 16, 16) for c in chans]
    idx = torch.arange(16) * 3
    losses = []
    # MoCo's step-0 queue is random noise (easy negatives): judge the loss once real keys filled it.
    start = cfg.method.queue_size // 16 if name in ("mocov2", "infomin") else 0
    for s in range(start + 8):
        loss = call(m, views, idx, s)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        finish(m, s)
        losses.append(loss.item())
    assert np.mean(losses[-2:]) < losses[start], losses


def test_cmc_multiview_objectives():
    from train.methods.cmc import pair_indices
    assert pair_indices(4, "core") == [(0, 1), (0, 2), (0, 3)]
    assert len(pair_indices(4, "full")) == 6
    torch.manual_seed(0)
    for obj in ("core", "full"):
        m = make_method(tiny_cfg("cmc", cmc_objective=obj), 32, 5, [1, 2, 3])
        views = [torch.randn(8, c, 16, 16) for c in (1, 2, 3)]
        loss = call(m, views, torch.arange(8), 0)
        loss.backward()
        assert torch.isfinite(loss) and len(m.memories) == 3
        assert all(p.grad is not None for p in m.backbone.encoders[2].parameters())


def test_banks_and_queue_are_persistent_state():
    m = make_method(tiny_cfg("mocov2"), 64, 5, [3, 3])
    sd = m.state_dict()
    assert "queue.keys" in sd and sd["queue.ptr"].dtype == torch.long
    m2 = make_method(tiny_cfg("instdisc"), 64, 5, [3, 3])
    assert m2.state_dict()["memory.bank"].shape == (64, 32) and "memory.Z" in m2.state_dict()
    m3 = make_method(tiny_cfg("cmc"), 64, 5, [1, 2])
    assert {"memories.0.bank", "memories.1.bank"} <= set(m3.state_dict())
    # the queue pointer advances as a tensor and wraps around
    q = m.queue
    for _ in range(5):
        q.push(torch.randn(16, 32))
    assert int(q.ptr) == (5 * 16) % 64


def test_schedules_and_lars():
    s = cosine_schedule(1.0, 0.0, 100, 10)
    assert len(s) == 100 and s[0] == 0 and s[10] == pytest.approx(1.0) and s[-1] < 0.01
    assert np.all(np.diff(s[10:]) <= 0)
    cfg = tiny_cfg("byol")
    m = make_method(cfg, 64, 100, [3, 3])
    assert m.ema(0) == pytest.approx(0.996) and m.ema(99) == pytest.approx(1.0, abs=1e-5)
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars_exclude": False}], lr=1.0, momentum=0.0)
    w.grad = torch.full((4, 4), 100.0)
    opt.step()
    # trust-ratio scaled: step = lr * 0.001 * ||w|| / ||g|| * g = 0.001 per entry
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 1 - 0.001))


# -- checkpoints -------------------------------------------------------------------------------
def _state(v):
    return {"model": {"w": torch.full((3,), float(v))}, "step": v}


def test_checkpoint_roundtrip_rng_and_weights_only(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    rs = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(2))
    ckpt.save_checkpoint(tmp_path, 5, _state(5), {"rng": rs, "loader": {"epoch": 1, "batch": 2}})
    path = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step-00000005"
    torch.load(path / "rank-0.pt", weights_only=True)  # numpy state stored as tensors
    state, rank_state = ckpt.load_checkpoint(path)
    ckpt.set_rng_state(rank_state["rng"])
    assert torch.equal(torch.rand(3), a[0]) and np.array_equal(np.random.rand(2), a[1])
    assert rank_state["loader"] == {"epoch": 1, "batch": 2} and state["step"] == 5


def test_checkpoint_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 10, _state(10), {"rng": ckpt.rng_state()})
    real = ckpt._save
    calls = []

    def dying_save(obj, path):  # the process "dies" half way through the second file
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\x80torn")
            raise KeyboardInterrupt("killed")
        real(obj, path)

    monkeypatch.setattr(ckpt, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 20, _state(20), {"rng": ckpt.rng_state()})
    monkeypatch.setattr(ckpt, "_save", real)
    assert (tmp_path / "checkpoints" / "step-00000020.tmp").exists()
    path = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step-00000010"
    assert ckpt.load_checkpoint(path)[0]["step"] == 10
    # a torn `latest` pointer falls back to the newest complete directory
    (tmp_path / "checkpoints" / "latest").write_text("step-000")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000010"
    # the next save cleans the stale tmp and prunes to `keep`
    for s in (30, 40, 50):
        ckpt.save_checkpoint(tmp_path, s, _state(s), {"rng": ckpt.rng_state()}, keep=2)
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["latest", "step-00000040", "step-00000050"]


def _equal_batch_worker(rank, init_file, out_dir):
    import types

    import torch
    import torch.distributed as dist

    from train.trainer import Trainer
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        n = 5 if rank == 0 else 3  # rank 1's loader skipped two corrupt members
        from pipeline.loaders.batch import Batch
        batch = Batch(views=[torch.full((n, 3, 4, 4), float(rank)), torch.zeros(n, 1, 4, 4)],
                      index=torch.arange(n) + 10 * rank, label=torch.zeros(n, dtype=torch.long),
                      aug=[{"crop": torch.arange(4 * n).view(n, 4)}] * 2, times=[torch.zeros(n, 4, dtype=torch.long)],
                      extra={"weights": torch.ones(n)})
        me = types.SimpleNamespace(world=2, device=torch.device("cpu"))
        out = Trainer._equal_batch(me, batch)
        torch.save({"index": out.index, "label": out.label, "shapes": [tuple(v.shape) for v in out.views],
                    "aug": [tuple(a["crop"].shape) for a in out.aug], "times": [tuple(t.shape) for t in out.times],
                    "extra": tuple(out.extra["weights"].shape)}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_unequal_batches_are_trimmed_to_the_smallest_rank(tmp_path):
    """A rank whose loader skipped corrupt members must not desynchronise the collectives."""
    import torch
    import torch.multiprocessing as tmp_mp
    tmp_mp.spawn(_equal_batch_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "r0.pt"), torch.load(tmp_path / "r1.pt")
    assert r0["index"].tolist() == [0, 1, 2] and r1["index"].tolist() == [10, 11, 12]
    assert r0["shapes"] == r1["shapes"] == [(3, 3, 4, 4), (3, 1, 4, 4)]
    # every per-sample field is trimmed alike: augmentation records, frame times, extras
    assert r0["aug"] == r1["aug"] == [(3, 4)] * 2 and r0["times"] == [(3, 4)] and r0["extra"] == (3,)


@pytest.mark.parametrize("method, shown, hidden", [
    ("byol", ["--ema", "--lr", "--batch-size"], ["--temperature", "--queue-size", "--nce-k"]),
    ("mocov2", ["--queue-size", "--temperature", "--ema"], ["--nce-k", "--cmc-objective"]),
    ("cmc", ["--nce-k", "--cmc-objective", "--bank-momentum"], ["--queue-size", "--ema"]),
])
def test_help_per_method_shows_its_keys_and_defaults(method, shown, hidden, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--method", method, "--help"])
    out = capsys.readouterr().out
    assert f"method ({method})" in out and f"({method}'s)" in out
    for flag in shown:
        assert f"{flag} " in out, flag
    for flag in hidden:
        assert f"{flag} " not in out, flag


def test_a_method_declares_the_backbone_outputs_it_needs(monkeypatch):
    """A method asking for stage maps a backbone lacks fails at build time, naming what it has; one
    that gets them reads them through forward_features."""
    cls = get_method("simclr")
    monkeypatch.setattr(cls, "outputs", ("pooled", "stage3"))
    m = make_method(tiny_cfg("simclr"), 16, 2, [3, 3])
    feats = m.backbone.forward_features(torch.randn(2, 3, 16, 16), m.outputs)
    assert feats["stage3"].shape[1] == m.backbone.feature_dims["stage3"]
    monkeypatch.setattr(cls, "outputs", ("pooled", "tokens"))
    with pytest.raises(ValueError, match=r"needs backbone outputs \['tokens'\]; resnet18 has stage1"):
        make_method(tiny_cfg("simclr"), 16, 2, [3, 3])


def test_probe_has_its_own_optimizer_and_only_the_probe_sees_labels():
    """The online probe's parameters leave the main optimizer for their own; its loss moves only the probe
    (features detached); the self-supervised loss gets the batch without labels."""
    from pipeline.loaders.batch import Batch
    m = make_method(tiny_cfg("simclr"), 64, 10, [3, 3])
    m.attach_probe(5)
    probe = {id(p) for p in m.probe.parameters()}
    assert not probe & {id(p) for p in m.main_parameters()}
    assert not probe & {id(p) for g in m.param_groups(0.1) for p in g["params"]}
    (extra,) = m.extra_optimizers()
    assert extra.name == "probe" and {id(p) for p in extra.params} == probe and len(extra.lr) == 10
    seen = []
    original = m.compute_loss
    m.compute_loss = lambda batch, step: (seen.append(batch.label), original(batch, step))[1]
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    total, out = m(Batch(views=views, index=torch.arange(8), label=torch.arange(8) % 5), 0)
    assert seen == [None]
    (total - out.loss).backward()  # the probe's cross-entropy alone (the SSL terms cancel to exact zeros)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.probe.parameters())
    assert all(p.grad is None or not bool(p.grad.any()) for p in m.backbone.parameters())
    assert int(out.logs["probe_count"]) == 8 and 0 <= int(out.logs["probe_correct"]) <= 8


def test_a_method_that_wants_aug_records_gets_them(monkeypatch, tmp_path):
    """`wants_aug` makes the training loader add each view's augmentation record to the Batch."""
    from pipeline.convert import ConvertConfig, convert
    from pipeline.synthetic.images import make
    from train.data import build_data
    make(tmp_path / "src", classes=2, train_per_class=8, val_per_class=0, seed=0, progress=False)
    convert(ConvertConfig(src=str(tmp_path / "src"), out=str(tmp_path / "out"), split="train", max_side=48,
                          shard_size=64, workers=1, progress=False))
    cls = get_method("simclr")
    monkeypatch.setattr(cls, "wants_aug", True)
    cfg = tiny_cfg("simclr", data=str(tmp_path / "out"), batch_size=4, image_size=16)
    data = build_data(cfg, cls)
    try:
        batch = next(iter(data.loader))
    finally:
        data.close()
    assert batch.aug is not None and len(batch.aug) == 2 and batch.aug[0]["crop"].shape == (4, 4)

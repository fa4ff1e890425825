"""Ring / Ball negatives (Wu et al.) in the methods that score a pool of candidates: MoCo v2 (and
InfoMin, built on it) over the queue, InstDisc over its memory bank, CMC over each view's bank. `all` is the method's own loss; the window options go through
kernels.ring_nce, checked here against a float64 sort over the method's own queries and queue."""
from __future__ import annotations

import pytest
import torch

import kernels
from train_helpers import call, make_method, tiny_config

COMMON = {"arch": "resnet18", "width": 8, "cifar_stem": True, "proj_hidden": 32, "proj_dim": 16}


def _views(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, 32, 32, generator=g) for _ in range(2)], torch.arange(n)


def _method(name, channels=(3, 3), **keys):
    torch.manual_seed(0)
    cfg = tiny_config(name, COMMON, queue_size=200, **keys)
    return make_method(cfg, 64, 10, channels)


@pytest.mark.parametrize("name", ["mocov2", "infomin"])
def test_ball_over_every_candidate_is_the_plain_loss(name):
    views, idx = _views(0)
    plain = call(_method(name), views, idx, 0)
    ball = call(_method(name, negatives="ball", ring_upper=1.0), views, idx, 0)
    assert abs(plain.item() - ball.item()) < 1e-5 * abs(plain.item())


@pytest.mark.parametrize("negatives", ["ball", "ring"])
def test_window_loss_is_the_sort_reference_on_the_methods_own_tensors(negatives, monkeypatch):
    m = _method("mocov2", negatives=negatives, ring_lower=0.05, ring_upper=0.3)
    seen = {}
    real = kernels.ring_nce

    def spy(q, k, c, t, lower, upper, **kw):
        seen.update(q=q.detach().clone(), k=k.detach().clone(), c=c.detach().clone(), t=t, lower=lower, upper=upper)
        return real(q, k, c, t, lower, upper, **kw)

    monkeypatch.setattr(kernels, "ring_nce", spy)
    views, idx = _views(1)
    loss = call(m, views, idx, 0)
    assert seen["lower"] == (0.0 if negatives == "ball" else 0.05) and seen["upper"] == 0.3
    assert seen["c"].shape == (200, 16) and torch.equal(seen["c"], m.queue.keys)
    ref = kernels.ring_nce_ref(seen["q"], seen["k"], seen["c"], seen["t"], seen["lower"], seen["upper"], upcast=True)
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    loss.backward()  # gradients reach the query encoder, not the queue
    assert m.backbone.conv1.weight.grad is not None and m.queue.keys.grad is None


def test_window_keys_are_checked():
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="ring_lower"):
        tiny_config("mocov2", COMMON, negatives="ring", ring_lower=0.2, ring_upper=0.1)
    with pytest.raises(ConfigError, match="ring_upper"):
        tiny_config("mocov2", COMMON, ring_upper=0.0)
    with pytest.raises(ConfigError):
        tiny_config("mocov2", COMMON, negatives="donut")


@pytest.mark.parametrize("name", ["instdisc", "cmc"])
def test_bank_methods_rank_their_whole_bank(name, monkeypatch):
    """InstDisc / CMC with --negatives ring: each query against every row of the (other view's) bank,
    its own row the positive; the loss is the float64 sort reference of those tensors."""
    channels = (1, 2) if name == "cmc" else (3, 3)
    m = _method(name, channels, negatives="ring", ring_lower=0.02, ring_upper=0.25)
    calls = []
    real = kernels.ring_nce

    def spy(q, k, c, t, lower, upper, **kw):
        out = real(q, k, c, t, lower, upper, **kw)
        calls.append((kernels.ring_nce_ref(q.detach(), k, c, t, lower, upper, upcast=True), out.detach(), c))
        return out

    monkeypatch.setattr(kernels, "ring_nce", spy)
    g = torch.Generator().manual_seed(2)
    views = [torch.rand(8, c, 32, 32, generator=g) for c in channels]
    loss = call(m, views, torch.arange(8) * 3, 0)
    assert len(calls) == (2 if name == "cmc" else 1)
    banks = [mem.bank for mem in m.memories] if name == "cmc" else [m.memory.bank]
    for ref, out, c in calls:
        assert any(c is b for b in banks) and c.shape[0] == 64
        assert abs(out.item() - ref.item()) < 1e-5 * abs(ref.item())
    loss.backward()
    assert all(b.grad is None for b in banks)


def test_bank_window_options_that_do_not_apply_fail():
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="nce-mode nce"):
        tiny_config("instdisc", COMMON, negatives="ball", nce_mode="nce")
    with pytest.raises(ConfigError, match="cmc-negatives bank"):
        tiny_config("cmc", COMMON, negatives="ring", cmc_negatives="batch")

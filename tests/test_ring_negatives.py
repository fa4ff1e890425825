"""Ring / Ball negatives (Wu et al.) in the methods that score a pool of candidates: MoCo v2 (and
InfoMin, built on it) over the queue, InstDisc over its memory bank, CMC over each view's bank. `all` is the method's own loss; the window options go through
kernels.ring_nce, checked here against a float64 sort over the method's own queries and queue."""
from __future__ import annotations

import importlib

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


# -- SimCLR: the ring over the in-batch candidates ----------------------------------------------------------
@pytest.mark.parametrize("window", [(0.0, 0.5), (0.1, 0.6)], ids=["ball", "ring"])
def test_simclr_ring_over_in_batch_candidates(window):
    """Each of the 2B rows: its other view the positive, the 2B - 1 other rows ranked (the positive
    among them, as in the reference), the window's rows the negatives; float64 sort written here."""
    neg = "ball" if window[0] == 0 else "ring"
    m = _method("simclr", negatives=neg, ring_lower=window[0] or 0.01, ring_upper=window[1]).double()
    views, idx = _views(4)
    views = [v.double() for v in views]
    loss = call(m, views, idx, 0)
    with torch.no_grad():
        z = torch.nn.functional.normalize(torch.cat([m.projector(m.backbone(v)) for v in views]), dim=1)
    n2 = z.shape[0]
    t = m.temperature(0)
    want = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        others = [j for j in range(n2) if j != i]
        s = torch.stack([z[i] @ z[j] for j in others]) / t
        srt = torch.sort(s, descending=True).values
        lo, hi = int(window[0] * (n2 - 1)), int(window[1] * (n2 - 1))
        sp = z[i] @ z[pos] / t
        want = want + torch.logsumexp(torch.cat([sp[None], srt[lo:hi]]), 0) - sp
    want = want / n2
    assert abs(loss.item() - want.item()) < 1e-9 * abs(want.item())
    loss.backward()
    assert m.backbone.conv1.weight.grad.abs().sum() > 0


def test_simclr_all_is_unchanged_and_ring_options_that_do_not_apply_fail():
    from train.config import ConfigError
    views, idx = _views(5)
    assert _method("simclr").cfg.method.window() is None
    with pytest.raises(ConfigError, match="ring-samples"):
        tiny_config("simclr", COMMON, negatives="ring", ring_samples=16)
    with pytest.raises(ConfigError, match="two views"):
        _method("simclr", channels=(3, 3, 3), negatives="ring")


# -- m negatives drawn from each window ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["instdisc", "mocov2"])
def test_drawn_ring_negatives_are_window_members_scored_by_bank_nce(name, monkeypatch):
    """--ring-samples m: m indices per query drawn from its window (kernels.ring_sample), the loss
    InfoNCE over exactly those rows, the same draws for the same (seed, step), others at another step."""
    m = _method(name, negatives="ring", ring_lower=0.02, ring_upper=0.5, ring_samples=5)
    drawn = []
    real = kernels.ring_sample

    def spy(q, c, t, lower, upper, num, **kw):
        out = real(q, c, t, lower, upper, num, **kw)
        drawn.append((q.detach().clone(), c.detach().clone(), t, lower, upper, out))
        return out

    monkeypatch.setattr(kernels, "ring_sample", spy)  # InstDisc's call
    monkeypatch.setattr(importlib.import_module("kernels.ring_nce"), "ring_sample", spy)  # ring_nce's own
    views, idx = _views(6)
    loss = call(m, views, idx, 0)
    q, c, t, lower, upper, sel = drawn[0]
    assert sel.shape == (8, 5)
    s = q.double() @ c.double().T / t
    ranks = torch.argsort(torch.argsort(s, 1, descending=True), 1)
    lo, hi = int(lower * c.shape[0]), int(upper * c.shape[0])
    r = ranks.gather(1, sel)
    assert ((r >= lo) & (r < hi)).all()
    if name == "instdisc":
        s_pos = s[torch.arange(8), idx]
    else:
        with torch.no_grad():
            k = torch.nn.functional.normalize(m.key_projector(m.key_backbone(views[1])), dim=1)
        s_pos = (q.double() * k.double()).sum(1) / t
    want = (torch.logsumexp(torch.cat([s_pos[:, None], s.gather(1, sel)], 1), 1) - s_pos).mean()
    assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())
    call(m, views, idx, 0)
    assert torch.equal(drawn[1][5], sel)  # same step: same draws
    call(m, views, idx, 1)
    assert not torch.equal(drawn[2][5], sel)


def test_window_anneals_its_outer_fraction():
    cfg = tiny_config("mocov2", COMMON, negatives="ring", ring_lower=0.01, ring_upper=0.1, ring_anneal_epochs=4,
                      ring_upper_start=0.9)
    me = cfg.method
    assert me.window(0) == (0.01, 0.9)
    assert me.window(2) == pytest.approx((0.01, 0.5))
    assert me.window(4) == (0.01, 0.1) and me.window(9) == (0.01, 0.1)
    m = make_method(cfg, 64, 40, (3, 3))  # 10 epochs in 40 steps: epoch 2 at step 8
    assert m.ring_window(8) == pytest.approx((0.01, 0.5))
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="ring_upper_start"):
        tiny_config("mocov2", COMMON, negatives="ring", ring_anneal_epochs=2, ring_upper_start=0.05)

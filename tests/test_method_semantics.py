"""Each method against its paper's definitions, in float64: the loss on a fixed batch equals the formula
written here from the paper (not the method's own helpers or kernels), and the state updates (queue
contents and pointer, EMA targets) equal their definitions after one step. Injecting the bugs these
guard against (MoCo enqueueing q instead of k, BYOL without its EMA update, a queue pointer that does
not wrap) makes a test here fail."""

from __future__ import annotations

import pytest
import torch

from train_helpers import call, finish, make_method
from train.methods import build_config, get_method

B, SIZE = 6, 16
TINY = {"arch": "resnet18", "width": 4, "cifar_stem": True, "proj_hidden": 16, "pred_hidden": 16, "proj_dim": 8}


N_DATA = 100


def _method(name: str, channels=(3, 3), **over):
    torch.manual_seed(0)
    clips = get_method(name).clips
    tiny = {k: v for k, v in TINY.items() if not (clips and k == "cifar_stem")}  # an image-only key
    cfg = build_config({"method": name, **tiny, **over})
    m = make_method(cfg, N_DATA, 50, channels, clips=clips).double()
    m.train()
    return m


def _views(n: int = B, seed: int = 1, channels=(3, 3), frames: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (frames, SIZE, SIZE) if frames else (SIZE, SIZE)
    return [torch.randn(n, c, *shape, generator=g, dtype=torch.float64) for c in channels]


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _infonce(q, k, negatives, t):
    """-log exp(q.k/t) / (exp(q.k/t) + sum_j exp(q.n_j/t)), averaged (Oord et al.; MoCo eq. 1)."""
    pos = (q * k).sum(1) / t
    neg = q @ negatives.T / t
    return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()


def _embed(backbone, head, x):
    return head(backbone(x))


@torch.no_grad()
def _optimizer_step(*modules):
    """Stand-in for the optimizer step between forward and after_step: move every online parameter."""
    g = torch.Generator().manual_seed(7)
    for mod in modules:
        for p in mod.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- SimCLR ------------------------------------------------------------------------------------------
def test_simclr_loss_is_nt_xent():
    """NT-Xent (Chen et al. 2020, eq. 1): for each of the 2N embeddings, the other view of the same image
    against all 2N - 1 others, cosine similarity / t, averaged over all 2N anchors."""
    m = _method("simclr", temperature=0.3)
    v = _views()
    index = torch.arange(B)
    loss = call(m, v, index, 0)
    with torch.no_grad():
        z = _unit(torch.cat([_embed(m.backbone, m.projector, x) for x in v]))
        s = z @ z.T / 0.3
        s.fill_diagonal_(float("-inf"))
        pos = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
        want = (torch.logsumexp(s, 1) - s[torch.arange(2 * B), pos]).mean()
    assert abs(loss.item() - want.item()) <= 1e-10 * abs(want.item())


# -- MoCo v2 / InfoMin -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mocov2", "infomin"])
def test_moco_loss_queue_and_momentum_encoder(name):
    """Loss: InfoNCE of q = f_q(view 0) against k = f_k(view 1) and the queue (InfoMin: symmetrised over
    the two views). After the step: the queue holds the keys (not the queries) at the pointer, the
    pointer advanced by the batch, and theta_k = m theta_k + (1 - m) theta_q."""
    m = _method(name, queue_size=16, temperature=0.2, ema=0.9)
    v = _views()
    with torch.no_grad():
        m.queue.ptr.fill_(4)
        queue0 = m.queue.keys.clone()
        key0 = [p.detach().clone() for p in (*m.key_backbone.parameters(), *m.key_projector.parameters())]
        q = [_unit(_embed(m.backbone, m.projector, x)) for x in v]
        k = [_unit(_embed(m.key_backbone, m.key_projector, x)) for x in v]
    loss = call(m, v, torch.arange(B), 0)
    want = _infonce(q[0], k[1], queue0, 0.2)
    keys_in = [k[1]]
    if name == "infomin":
        want = 0.5 * (want + _infonce(q[1], k[0], queue0, 0.2))
        keys_in.append(k[0])
    assert abs(loss.item() - want.item()) <= 1e-10 * abs(want.item())
    _optimizer_step(m.backbone, m.projector)
    finish(m, 0)
    expect = queue0.clone()
    p = 4
    for kk in keys_in:
        expect[torch.arange(p, p + B) % 16] = kk
        p = (p + B) % 16
    assert torch.allclose(m.queue.keys.double(), expect, atol=1e-6), "queue rows must be the keys, at the pointer"
    assert int(m.queue.ptr) == p
    online = [*m.backbone.parameters(), *m.projector.parameters()]
    key_now = [*m.key_backbone.parameters(), *m.key_projector.parameters()]
    mom = m.ema(0)
    assert mom == pytest.approx(0.9)
    for k0, kn, po in zip(key0, key_now, online):
        torch.testing.assert_close(kn, mom * k0 + (1 - mom) * po.detach(), rtol=0, atol=1e-12)
    assert any(not torch.equal(k0, kn) for k0, kn in zip(key0, key_now)), "the momentum update must move f_k"


def test_queue_wraps_for_any_batch_size():
    """A batch shortened at read time (a corrupt member skipped) still enqueues: rows wrap round the end."""
    from train.methods.base import Queue
    q = Queue(8, 4)
    q.ptr.fill_(6)
    before = q.keys.clone()
    k = torch.arange(12.0).view(3, 4)
    q.push(k)
    assert torch.equal(q.keys[[6, 7, 0]], k) and torch.equal(q.keys[1:6], before[1:6]) and int(q.ptr) == 1
    big = torch.randn(11, 4)  # more keys than the queue holds: the newest 8 stay, in ring order
    q.push(big)
    assert int(q.ptr) == (1 + 11) % 8
    order = torch.arange(1, 12) % 8
    expect = torch.empty(8, 4)
    expect[order] = big  # later writes win
    assert torch.equal(q.keys, expect)


# -- BYOL --------------------------------------------------------------------------------------------
def test_byol_loss_and_ema_target():
    """Loss (Grill et al. 2020, eq. 2, symmetrised): 2 - 2 cos(q_theta(z_theta(v)), z'_xi(v')) averaged
    over the batch and both orders. After the step: xi = tau xi + (1 - tau) theta."""
    m = _method("byol", ema=0.8)
    v = _views()
    with torch.no_grad():
        tgt0 = [p.detach().clone() for p in (*m.target_backbone.parameters(), *m.target_projector.parameters())]
        p = [_unit(m.predictor(_embed(m.backbone, m.projector, x))) for x in v]
        z = [_unit(_embed(m.target_backbone, m.target_projector, x)) for x in v]
    loss = call(m, v, torch.arange(B), 0)
    want = 0.5 * ((2 - 2 * (p[0] * z[1]).sum(1)).mean() + (2 - 2 * (p[1] * z[0]).sum(1)).mean())
    assert abs(loss.item() - want.item()) <= 1e-10 * abs(want.item())
    _optimizer_step(m.backbone, m.projector, m.predictor)
    finish(m, 0)
    tau = m.ema(0)
    online = [*m.backbone.parameters(), *m.projector.parameters()]
    now = [*m.target_backbone.parameters(), *m.target_projector.parameters()]
    changed = 0
    for t0, tn, po in zip(tgt0, now, online):
        torch.testing.assert_close(tn, tau * t0 + (1 - tau) * po.detach(), rtol=0, atol=1e-12)
        changed += int(not torch.equal(tn, t0))
    assert changed > 0, "the EMA update must move the target"


# -- CVRL ----------------------------------------------------------------------------------------------
def test_cvrl_loss_is_infonce_over_the_clips():
    """CVRL (Qian et al. 2021, eq. 1): each clip's positive is the other clip of its video, the other
    2N - 2 clips are negatives; cosine similarity / t. Both clips go through the encoder in one pass."""
    m = _method("cvrl", arch="r3d18", temperature=0.1)
    v = _views(frames=4)
    loss = call(m, v, torch.arange(B), 0)
    with torch.no_grad():
        z = _unit(m.projector(m.backbone(torch.cat(v))))
        s = z @ z.T / 0.1
        s.fill_diagonal_(float("-inf"))
        pos = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
        want = (torch.logsumexp(s, 1) - s[torch.arange(2 * B), pos]).mean()
    assert abs(loss.item() - want.item()) <= 1e-10 * abs(want.item())


# -- memory banks: InstDisc and CMC ------------------------------------------------------------------
def _bank_softmax(v, bank, index, neg, t):
    """Wu et al. 2018 with sampled negatives: -log exp(v.m_i/t) / (exp(v.m_i/t) + sum_j exp(v.m_j/t))."""
    pos = (v * bank[index]).sum(1) / t
    negs = torch.einsum("bd,bkd->bk", v, bank[neg]) / t
    return (torch.logsumexp(torch.cat([pos[:, None], negs], 1), 1) - pos).mean()


def _bank_nce(v, bank, index, neg, t, Z):
    """Wu et al. 2018, eq. 4-6: P(i|v) = exp(v.m_i/t) / Z, h = P / (P + k/n); loss = -log h(pos) -
    sum log(1 - h(neg)), summed over the batch's negatives and averaged over the batch. eps = 1e-7 in
    both denominators, as in the reference code (CMC's NCECriterion)."""
    n, k, eps = bank.shape[0], neg.shape[1], 1e-7
    P_pos = torch.exp((v * bank[index]).sum(1) / t) / Z
    P_neg = torch.exp(torch.einsum("bd,bkd->bk", v, bank[neg]) / t) / Z
    return -(torch.log(P_pos / (P_pos + k / n + eps)).sum() + torch.log((k / n) / (P_neg + k / n + eps)).sum()) / v.shape[0]


def _bank_update(bank, index, v, mom):
    """m_i <- normalise(mom m_i + (1 - mom) v_i) (Wu et al.'s proximal memory update)."""
    out = bank.clone()
    out[index] = _unit(mom * bank[index] + (1 - mom) * v)
    return out


@pytest.mark.parametrize("mode", ["softmax", "nce"])
def test_instdisc_loss_and_bank_update(mode):
    """The sample's own bank row is its positive, `nce_k` uniformly drawn rows its negatives (drawn from
    torch's generator, so the test draws the same ones); NCE's Z is estimated once from the first batch
    (Z = n * mean exp(v.m/t) over the drawn rows). After the step: the rows of the batch are updated."""
    k, t = 20, 0.07
    m = _method("instdisc", nce_k=k, nce_mode=mode, temperature=t, bank_momentum=0.5)
    v = _views()
    index = torch.tensor([3, 17, 42, 56, 80, 99])
    bank0 = m.memory.bank.clone()
    torch.manual_seed(11)
    loss = call(m, v, index, 0)
    torch.manual_seed(11)
    neg = torch.randint(0, N_DATA, (B, k))
    with torch.no_grad():
        f = _unit(m.head(m.backbone(v[0])))
    if mode == "softmax":
        want = _bank_softmax(f, bank0, index, neg, t)
    else:
        rows = torch.cat([index[:, None], neg], 1)
        Z = torch.exp(torch.einsum("bd,bkd->bk", f, bank0[rows]) / t).mean() * N_DATA
        want = _bank_nce(f, bank0, index, neg, t, Z)
        assert float(m.memory.Z) == pytest.approx(Z.item(), rel=1e-6)  # kept as the float32 mean over ranks
    assert abs(loss.item() - want.item()) <= 1e-9 * abs(want.item())
    finish(m, 0)
    torch.testing.assert_close(m.memory.bank, _bank_update(bank0, index, f, 0.5), rtol=0, atol=1e-12)


def test_cmc_each_view_against_the_other_views_bank():
    """CMC (Tian et al. 2019, eq. 2-3, two views L and ab): L's embedding against ab's memory (positive:
    the sample's own row there) plus ab's against L's; then each view's bank takes its own view's
    embeddings. Swapping the two banks (a view contrasted against its own memory) fails here."""
    k, t = 16, 0.07
    m = _method("cmc", channels=(1, 2), nce_k=k, nce_mode="softmax", temperature=t, bank_momentum=0.5)
    v = _views(channels=(1, 2))
    index = torch.tensor([0, 9, 18, 27, 36, 45])
    b0, b1 = m.memories[0].bank.clone(), m.memories[1].bank.clone()
    torch.manual_seed(5)
    loss = call(m, v, index, 0)
    torch.manual_seed(5)
    neg_a = torch.randint(0, N_DATA, (B, k))  # drawn for L against ab's memory
    neg_b = torch.randint(0, N_DATA, (B, k))  # then ab against L's memory
    with torch.no_grad():
        zL = _unit(m.heads[0](m.backbone.encoders[0](v[0])))
        zab = _unit(m.heads[1](m.backbone.encoders[1](v[1])))
    want = _bank_softmax(zL, b1, index, neg_a, t) + _bank_softmax(zab, b0, index, neg_b, t)
    assert abs(loss.item() - want.item()) <= 1e-9 * abs(want.item())
    finish(m, 0)
    torch.testing.assert_close(m.memories[0].bank, _bank_update(b0, index, zL, 0.5), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.memories[1].bank, _bank_update(b1, index, zab, 0.5), rtol=0, atol=1e-12)

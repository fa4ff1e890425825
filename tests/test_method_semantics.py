"""Each method against its paper's definitions, in float64: the loss on a fixed batch equals the formula
written here from the paper (not the method's own helpers or kernels), and the state updates (queue
contents and pointer, EMA targets) equal their definitions after one step. Injecting the bugs these
guard against (MoCo enqueueing q instead of k, BYOL without its EMA update, a queue pointer that does
not wrap) makes a test here fail."""

from __future__ import annotations

import pytest
import torch

from train import config
from train.methods import get_method, method_defaults

B, SIZE = 6, 16
TINY = {"arch": "resnet18", "width": 4, "cifar_stem": True, "proj_hidden": 16, "pred_hidden": 16, "proj_dim": 8}


def _method(name: str, **over):
    torch.manual_seed(0)
    cfg = config.build({"method": name, **TINY, **over}, method_defaults(name))
    m = get_method(name)(cfg, 100, 50, [3, 3]).double()
    m.train()
    return m


def _views(n: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]


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
    loss, _ = m(v, index, 0)
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
    loss, _ = m(v, torch.arange(B), 0)
    want = _infonce(q[0], k[1], queue0, 0.2)
    keys_in = [k[1]]
    if name == "infomin":
        want = 0.5 * (want + _infonce(q[1], k[0], queue0, 0.2))
        keys_in.append(k[0])
    assert abs(loss.item() - want.item()) <= 1e-10 * abs(want.item())
    _optimizer_step(m.backbone, m.projector)
    m.after_step(0)
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
    loss, _ = m(v, torch.arange(B), 0)
    want = 0.5 * ((2 - 2 * (p[0] * z[1]).sum(1)).mean() + (2 - 2 * (p[1] * z[0]).sum(1)).mean())
    assert abs(loss.item() - want.item()) <= 1e-10 * abs(want.item())
    _optimizer_step(m.backbone, m.projector, m.predictor)
    m.after_step(0)
    tau = m.ema(0)
    online = [*m.backbone.parameters(), *m.projector.parameters()]
    now = [*m.target_backbone.parameters(), *m.target_projector.parameters()]
    changed = 0
    for t0, tn, po in zip(tgt0, now, online):
        torch.testing.assert_close(tn, tau * t0 + (1 - tau) * po.detach(), rtol=0, atol=1e-12)
        changed += int(not torch.equal(tn, t0))
    assert changed > 0, "the EMA update must move the target"

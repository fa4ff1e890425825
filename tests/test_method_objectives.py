"""RényiCL, C-SimCLR, C-BYOL, SSL-HSIC, Deep Bregman and AugSelf against float64 computations written
here from their papers / reference code (Gram matrices, explicit loops, the reference's surrogate
gradients), on fresh random inputs, through each method's own forward where it has state (EMA targets,
a trainable kernel bandwidth)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_helpers import call, finish, make_method
from train.methods import build_config

B, SIZE = 6, 16
TINY = {"arch": "resnet18", "width": 4, "cifar_stem": True, "proj_hidden": 16, "pred_hidden": 16, "proj_dim": 8}


def _method(name, **over):
    torch.manual_seed(0)
    cfg = build_config({"method": name, **TINY, **over})
    m = make_method(cfg, 100, 50, (3, 3)).double()
    m.train()
    return m


def _views(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _rand_unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return _unit(torch.randn(n, d, generator=g, dtype=torch.float64))


# -- RényiCL -------------------------------------------------------------------------------------------
def _renyi_ref(p, z, t, gamma, alpha):
    """The bound with batch-global means: pos = diagonal, neg = off-diagonal of cos / t."""
    s = _unit(p) @ _unit(z).T / t
    n = s.shape[0]
    pos = s.diagonal()
    neg = s[~torch.eye(n, dtype=torch.bool)]
    first = -pos.mean() if gamma == 1 else -torch.log(torch.exp((gamma - 1) * pos).mean()) / (gamma - 1)
    return first + torch.log(alpha * torch.exp(gamma * pos).mean() + (1 - alpha) * torch.exp(gamma * neg).mean()) / gamma


def _renyi_surrogate(p, z, t, gamma, alpha):
    """The reference's loss (renyicl/builder.py contrastive_loss): detached weights, global means."""
    s = _unit(p) @ _unit(z).T / t
    n = s.shape[0]
    pos = s.diagonal()
    neg = s[~torch.eye(n, dtype=torch.bool)]
    ps, ns = pos.detach(), neg.detach()
    loss1 = -pos.mean() if gamma == 1 else -(pos * torch.exp((gamma - 1) * ps)).mean() / torch.exp((gamma - 1) * ps).mean()
    den = alpha * torch.exp(gamma * ps).mean() + (1 - alpha) * torch.exp(gamma * ns).mean()
    num = alpha * (pos * torch.exp(gamma * ps)).mean() + (1 - alpha) * (neg * torch.exp(gamma * ns)).mean()
    return loss1 + num / den


@pytest.mark.parametrize("gamma", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [1 / 65536, 0.3])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_renyi_loss_is_the_bound_with_the_references_gradient(gamma, alpha, t):
    from train.methods.renyicl import renyi_loss
    g = torch.Generator().manual_seed(int(gamma * 10 + t * 100))
    p = torch.randn(13, 24, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(13, 24, generator=g, dtype=torch.float64)
    got = renyi_loss([p], z, t, gamma, alpha)
    want = _renyi_ref(p, z, t, gamma, alpha)
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    (g_got,) = torch.autograd.grad(got, p)
    (g_ref,) = torch.autograd.grad(_renyi_surrogate(p, z, t, gamma, alpha), p)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)


def test_renyicl_method_pools_sources_per_target_and_updates_its_ema():
    m = _method("renyicl", temperature=0.5, gamma=2.0, alpha=0.01, ema=0.8)
    v = _views()
    with torch.no_grad():
        p = [m.predictor(m.projector(m.backbone(x))) for x in v]
        z = [m.target_projector(m.target_backbone(x)) for x in v]
        tgt0 = [q.clone() for q in m.target_backbone.parameters()]
    loss = call(m, v, torch.arange(B), 0)
    want = _renyi_ref(p[1], z[0], 0.5, 2.0, 0.01) + _renyi_ref(p[0], z[1], 0.5, 2.0, 0.01)
    assert abs(loss.item() - want.item()) <= 1e-10 * abs(want.item())
    assert isinstance(m.projector[-1], torch.nn.BatchNorm1d) and not m.projector[-1].affine
    with torch.no_grad():
        for q in m.backbone.parameters():
            q.add_(0.01)
    finish(m, 0)
    for t0, tn, po in zip(tgt0, m.target_backbone.parameters(), m.backbone.parameters()):
        torch.testing.assert_close(tn, 0.8 * t0 + 0.2 * po, rtol=0, atol=1e-12)


# -- C-SimCLR / C-BYOL: the loss given the vMF samples the method drew ----------------------------------
class _Recorder:
    def __init__(self, monkeypatch):
        from train.models import vmf
        self.draws = []
        real = vmf.sample

        def sample(mu, kappa, **kw):
            z = real(mu, kappa, **kw)
            self.draws.append((mu.detach().clone(), kappa, z.detach().clone()))
            return z
        monkeypatch.setattr(vmf, "sample", sample)


def _log_vmf(z, mu, kappa):
    d = z.shape[1]
    v = d / 2 - 1
    log_c = float(v * mpmath_log(kappa) - (d / 2) * math.log(2 * math.pi) - mpmath_log_besseli(v, kappa))
    return kappa * (z * mu).sum(1) + log_c


def mpmath_log(x):
    import mpmath
    return float(mpmath.log(x))


def mpmath_log_besseli(v, x):
    import mpmath
    return float(mpmath.log(mpmath.besseli(v, x)))


def test_csimclr_loss_is_the_contrastive_ceb(monkeypatch):
    """Per direction: β (log e(z|x) - log b(z|y)) - (log(2B-1) - CE), logits log b(z|h2_j) for all j and
    log vMF(z | h1_j, κ_b) for j != i (the double batch trick), summed over both directions."""
    rec = _Recorder(monkeypatch)
    ke, kb, beta = 300.0, 7.0, 0.5
    m = _method("csimclr", kappa_e=ke, kappa_b=kb, beta=beta)
    v = _views()
    with torch.no_grad():
        h1, h2 = (_unit(m.projector(m.backbone(x))) for x in v)
    loss = call(m, v, torch.arange(B), 0)
    (mu_a, k_a, z_a), (mu_b, k_b, z_b) = rec.draws
    assert k_a == k_b == ke
    torch.testing.assert_close(mu_a, h1, rtol=0, atol=1e-12)
    torch.testing.assert_close(mu_b, h2, rtol=0, atol=1e-12)
    total = 0.0
    for z, a, b in ((z_a, h1, h2), (z_b, h2, h1)):
        for i in range(B):
            logits = [_log_vmf(z[i:i + 1], b[j:j + 1], kb) for j in range(B)]
            logits += [_log_vmf(z[i:i + 1], a[j:j + 1], kb) for j in range(B) if j != i]
            logits = torch.cat(logits)
            ce = torch.logsumexp(logits, 0) - logits[i]
            residual = _log_vmf(z[i:i + 1], a[i:i + 1], ke) - _log_vmf(z[i:i + 1], b[i:i + 1], kb)
            total = total + beta * residual - (math.log(2 * B - 1) - ce)
    want = (total / B).item()
    assert abs(loss.item() - want) <= 1e-9 * abs(want)


def test_cbyol_loss_and_its_trainable_target_head(monkeypatch):
    """Σ_directions w |z - t|² + β (log e(z|μ) - log b(z|g(t))), batch mean; the target head g is
    trained (gets gradients), the EMA target is not."""
    rec = _Recorder(monkeypatch)
    ke, kb, beta, w = 2000.0, 10.0, 0.7, 3.0
    m = _method("cbyol", kappa_e=ke, kappa_b=kb, beta=beta, byol_weight=w)
    v = _views()
    with torch.no_grad():
        mu = [_unit(m.predictor(m.projector(m.backbone(x)))) for x in v]
        t = [_unit(m.target_projector(m.target_backbone(x))) for x in v]
        bm = [_unit(m.target_head(x)) for x in t]
    loss = call(m, v, torch.arange(B), 0)
    (mu_a, _, z_a), (mu_b, _, z_b) = rec.draws
    torch.testing.assert_close(mu_a, mu[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(mu_b, mu[1], rtol=0, atol=1e-12)
    want = 0.0
    for z, a, b in ((z_a, 0, 1), (z_b, 1, 0)):
        want = want + w * ((z - t[b]) ** 2).sum(1) + beta * (_log_vmf(z, mu[a], ke) - _log_vmf(z, bm[b], kb))
    want = want.mean().item()
    assert abs(loss.item() - want) <= 1e-9 * abs(want)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.target_head.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in m.target_backbone.parameters())


# -- SSL-HSIC --------------------------------------------------------------------------------------------
def _centered(k):
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    return h @ k @ h


def test_hsic_estimates_equal_their_gram_matrix_forms():
    """HSIC(Z, Y) = mean of within-image view-pair kernel values (incl. a view with itself, / k(k-1)) minus
    the mean over all pairs; HSIC(Z, Z) = tr(K1c K2c) / n² of the two draws' Gram matrices."""
    from train.methods.ssl_hsic import draw_frequencies, hsic_loss, rff
    k, n, d, D, c, gamma = 4, 7, 10, 64, 0.8, 3.0
    hid = [_rand_unit(n, d, s) for s in range(k)]
    loss, logs = hsic_loss(hid, c, gamma, D, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    f1 = draw_frequencies(d, D, g, "cpu", torch.float64)
    f2 = draw_frequencies(d, D, g, "cpu", torch.float64)
    x = torch.cat(hid)  # rows view-major: view v, image b at v * n + b
    p1, p2 = rff(x, c, *f1), rff(x, c, *f2)
    k1, k2 = p1 @ p1.T, p2 @ p2.T
    same = (torch.arange(k * n)[:, None] % n) == (torch.arange(k * n)[None, :] % n)
    xy = k1[same].sum() / (n * k * (k - 1)) - k1.sum() / (n * k) ** 2
    xx = torch.trace(_centered(k2) @ _centered(k1)) / (n * k) ** 2
    assert logs["hsic_xy"].item() == pytest.approx(xy.item(), rel=1e-10, abs=1e-14)
    assert logs["hsic_xx"].item() == pytest.approx(xx.item(), rel=1e-10, abs=1e-14)
    assert loss.item() == pytest.approx((gamma * xx.sqrt() - xy).item(), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_rff_features_approximate_the_imq_kernel(c):
    from train.methods.ssl_hsic import draw_frequencies, rff
    x = _rand_unit(8, 16, 3)
    f = draw_frequencies(16, 200000, torch.Generator().manual_seed(0), "cpu", torch.float64)
    p = rff(x, c, *f)
    exact = c / torch.sqrt(c * c + torch.cdist(x, x) ** 2)
    assert (p @ p.T - exact).abs().max().item() < 0.02


@pytest.mark.parametrize("d", [4, 16])
def test_frequency_amplitudes_follow_the_references_bessel_table(d):
    """|ω| of the Gamma-mixture sampler against the reference's mpmath table K_ν(r) r^ν: mean and second
    moment (E|ω|² = d exactly) within the table's grid error."""
    from train.methods.ssl_hsic import draw_frequencies, imq_amplitude_table
    r, p = imq_amplitude_table(d, 2000)
    w, _ = draw_frequencies(d, 200000, torch.Generator().manual_seed(1), "cpu", torch.float64)
    a = w.norm(dim=1).numpy()
    assert a.mean() == pytest.approx((r * p).sum(), rel=0.03)
    assert (a ** 2).mean() == pytest.approx(((r ** 2) * p).sum(), rel=0.03)
    assert (a ** 2).mean() == pytest.approx(d, rel=0.02)


def test_bandwidth_objective_is_the_log_gradient_magnitude():
    from train.methods.ssl_hsic import bandwidth_loss
    hid = [_rand_unit(9, 6, s) for s in range(4)]
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    got = bandwidth_loss(hid, scale, torch.Generator().manual_seed(4), pairs=40)
    g = torch.Generator().manual_seed(4)
    pick = lambda: torch.cat([h[torch.randint(9, (10,), generator=g)] for h in hid])
    x, y = pick(), pick()
    delta = torch.cdist(x, y) ** 2
    dk = torch.func.vmap(torch.func.grad(lambda dl: scale.detach() / torch.sqrt(dl + scale.detach() ** 2)))(delta.reshape(-1))
    want = -torch.log(dk.abs()).clamp_min(math.log(1e-7)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    got.backward()
    assert scale.grad is not None and scale.grad.item() != 0


def test_ssl_hsic_method_draws_the_same_features_per_step_and_trains_its_bandwidth():
    m = _method("ssl_hsic")
    v = _views()
    a, b = call(m, v, torch.arange(B), 3), call(m, v, torch.arange(B), 3)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)  # same step: same RFF draws
    assert call(m, v, torch.arange(B), 4).item() != a.item()
    names = [e.name for e in m.extra_optimizers()]
    assert "kernel_scale" in names
    assert all(p is not m.kernel_scale for p in m.main_parameters())


# -- Deep Bregman ----------------------------------------------------------------------------------------
def test_bregman_loss_from_explicit_subnetworks():
    """Φ_j(z) = w2_j · relu(W1_j z + b1_j) + b2_j one subnet at a time; D(a,b) = max Φ(a) - Φ_{argmax Φ(b)}(a);
    logits exp(-D / 2σ²) / τ, NT-Xent with the other view positive and self excluded, + NT-Xent of z."""
    t, sigma = 0.5, 0.9
    m = _method("bregman", temperature=t, sigma=sigma, subnets=5, subnet_hidden=7, subnet_dropout=0.0)
    v = _views()
    with torch.no_grad():
        z = _unit(torch.cat([m.projector(m.backbone(x)) for x in v]))
        s = m.subnets
        phi = torch.stack([torch.relu(z @ s.w1[j] + s.b1[j]) @ s.w2[j] + s.b2[j] for j in range(s.w1.shape[0])], 1)
    loss = call(m, v, torch.arange(B), 0)
    n = 2 * B
    pos = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])

    def xent(logits):
        logits = logits.clone()
        logits.fill_diagonal_(float("-inf"))
        return (torch.logsumexp(logits, 1) - logits[torch.arange(n), pos]).mean()
    jstar = phi.argmax(1)
    dmat = torch.stack([torch.stack([phi[a].max() - phi[a, jstar[b]] for b in range(n)]) for a in range(n)])
    want = xent(torch.exp(-dmat / (2 * sigma ** 2)) / t) + xent(z @ z.T / t)
    assert abs(loss.item() - want.item()) <= 1e-10 * abs(want.item())
    assert (dmat >= -1e-12).all() and dmat.diagonal().abs().max() < 1e-12


# -- AugSelf ----------------------------------------------------------------------------------------------
def _records(seed):
    from pipeline.views.params import view_params
    from pipeline.views.recipes import get_recipe
    from pipeline.loaders.batch import aug_records
    spec = get_recipe("simclr", 32)
    idx = np.arange(10)
    rng = np.random.default_rng(seed)
    w, h = rng.integers(40, 90, 10), rng.integers(40, 90, 10)
    recs = [view_params(spec.views[v], seed, 0, v, idx, w, h) for v in range(2)]
    return spec, aug_records(recs)


def test_augself_targets_from_the_applied_parameters():
    from train.auxiliary.augself import AugSelf, targets
    spec, (r1, r2) = _records(0)
    aux = AugSelf(8, spec.views)
    assert aux.types == ["crop", "color", "flip"]
    d = targets(r1, r2, aux.scale1, aux.scale2)
    j = spec.views[0].jitter
    for b in range(10):
        box = []
        for r in (r1, r2):
            top, left, hh, ww = r["crop"][b].tolist()
            H, W = r["size"][b].tolist()
            cx = (left + ww / 2) / W
            box.append([(top + hh / 2) / H, 1 - cx if r["flip"][b] else cx, hh / H, ww / W])
        np.testing.assert_allclose(d["crop"][b].numpy(), np.subtract(*box), rtol=0, atol=1e-12)
        col = []
        for r in (r1, r2):
            if not r["jitter_on"][b]:
                col.append([0.0] * 4)
                continue
            bb, cc, ss, hh = r["jitter"][b].tolist()
            col.append([(bb - 1) / (2 * j.brightness), (cc - 1) / (2 * j.contrast), (ss - 1) / (2 * j.saturation),
                        hh / (2 * j.hue)])
        np.testing.assert_allclose(d["color"][b].numpy(), np.subtract(*col), rtol=0, atol=1e-12)
        assert d["flip"][b, 0].item() == float(bool(r1["flip"][b]) == bool(r2["flip"][b]))


def test_augself_loss_is_symmetric_mse_and_bce():
    from train.auxiliary.augself import AugSelf, targets
    torch.manual_seed(0)
    spec, (r1, r2) = _records(1)
    aux = AugSelf(8, spec.views, hidden=16).double()
    y1, y2 = torch.randn(10, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    got, logs = aux(y1, y2, r1, r2)
    d = targets(r1, r2, aux.scale1, aux.scale2)
    want = 0.0
    for t in aux.types:
        # one batch through the head (its BN sees both orders together, as in the reference)
        p12, p21 = aux.heads[t](torch.cat([torch.cat([y1, y2], 1), torch.cat([y2, y1], 1)])).split(10)
        if t == "flip":
            y = d[t]
            bce = lambda p: -(y * F.logsigmoid(p) + (1 - y) * F.logsigmoid(-p))
            want = want + torch.cat([bce(p12), bce(p21)]).mean()
        else:
            want = want + torch.cat([(torch.tanh(p12) - d[t]) ** 2, (torch.tanh(p21) + d[t]) ** 2]).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize("base", ["simclr", "mocov2", "byol"])
def test_aux_augself_adds_to_any_base_method(base):
    from pipeline.loaders.batch import Batch
    _, recs = _records(2)
    plain = _method(base, queue_size=16) if base == "mocov2" else _method(base)
    m = _method(base, aux="augself", aux_weight=0.5, queue_size=16) if base == "mocov2" else \
        _method(base, aux="augself", aux_weight=0.5)
    v = [x[:10] for x in _views(10)]
    batch = Batch(views=v, index=torch.arange(10), aug=[{k: t for k, t in r.items()} for r in recs])
    _, out = m(batch, 0)
    assert {"augself_crop", "augself_color", "augself_flip"} <= out.logs.keys()
    assert out.loss.item() == pytest.approx(out.logs["base_loss"].item() + 0.5 * out.logs["aux_loss"].item(), rel=1e-12)
    _, out0 = plain(Batch(views=v, index=torch.arange(10)), 0)
    assert out.logs["base_loss"].item() == pytest.approx(out0.loss.item(), rel=1e-12)  # base numerics unchanged
    out.loss.backward()
    assert all(p.grad is not None for p in m.aux.parameters())
    with pytest.raises(RuntimeError, match="augmentation records"):
        m(Batch(views=v, index=torch.arange(10)), 0)


def test_aux_on_a_one_view_recipe_fails_naming_it():
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="two views"):
        _method("instdisc", aux="augself")
    with pytest.raises(ConfigError, match="one encoder per view"):
        _method("cmc", aux="augself")

"""kernels.ring_nce (Ring / Ball negatives by similarity rank) against a float64 sort-based reference.

Inputs are drawn fresh per case (ties-free continuous scores), shapes are odd, temperatures span
0.05-1, windows include (0, 1) (plain InfoNCE), (0, 0.1) (Ball), (0.01, 0.1) (Ring) and a wide one.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from kernel_helpers import LargestOutput, rel_err

ring_mod = importlib.import_module("kernels.ring_nce")
backend_mod = importlib.import_module("kernels._backend")
WINDOWS = [(0.0, 1.0), (0.0, 0.1), (0.01, 0.1), (0.3, 0.75)]


def _case(seed, n=37, k=301, d=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    kk = torch.nn.functional.normalize(q + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return [t.to(dtype).requires_grad_() for t in (q, kk, c)]


def _grads(fn, q, k, c):
    loss = fn(q, k, c)
    gq, gk, gc = torch.autograd.grad(loss, (q, k, c))
    return loss.detach(), gq, gk, gc


@pytest.mark.parametrize("window", WINDOWS, ids=[f"{a}-{b}" for a, b in WINDOWS])
@pytest.mark.parametrize("temperature", [0.05, 0.2, 1.0])
def test_matches_float64_sort_reference(window, temperature):
    lower, upper = window
    q, k, c = _case(hash((window, temperature)) % 1000)
    ours = _grads(lambda a, b, cc: kernels.ring_nce(a, b, cc, temperature, lower, upper), q, k, c)
    ref = _grads(lambda a, b, cc: kernels.ring_nce_ref(a, b, cc, temperature, lower, upper), q, k, c)
    assert abs(ours[0].item() - ref[0].item()) <= 1e-10 * max(1.0, abs(ref[0].item()))
    for a, b in zip(ours[1:], ref[1:]):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("window", WINDOWS[1:3], ids=["ball", "ring"])
@pytest.mark.parametrize("select", ["numba", "topk"])
def test_float32_against_float64(window, select, monkeypatch):
    if select == "topk":  # the torch path's selection off CPU (CUDA), run here on CPU
        monkeypatch.setattr(ring_mod, "_numba_rows", lambda s: False)
    q, k, c = _case(7, n=64, k=1000, d=32, dtype=torch.float32)
    ours = _grads(lambda a, b, cc: kernels.ring_nce(a, b, cc, 0.1, *window), q, k, c)
    ref = _grads(lambda a, b, cc: kernels.ring_nce_ref(a, b, cc, 0.1, *window, upcast=True), q, k, c)
    assert abs(ours[0].item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())
    for a, b in zip(ours[1:], ref[1:]):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-4


def test_whole_window_is_info_nce_with_a_queue():
    q, k, c = _case(3)
    a = kernels.ring_nce(q, k, c.detach(), 0.2, 0.0, 1.0)
    b = kernels.info_nce(q, k, c.detach(), temperature=0.2)
    assert abs(a.item() - b.item()) < 1e-12
    ga = torch.autograd.grad(a, (q, k))
    gb = torch.autograd.grad(b, (q, k))
    assert all(rel_err(x, y) < 1e-10 for x, y in zip(ga, gb))


def test_window_keeps_exactly_the_ranks():
    """A row's window holds floor(upper K) - floor(lower K) candidates: with the positive made
    irrelevant (s+ far below), the loss is the LSE of exactly those ranks."""
    q, k, c = _case(11, n=5, k=200)
    lo, hi = ring_mod.window(200, 0.01, 0.1)
    assert (lo, hi) == (2, 20)
    s = (q @ c.T / 0.5).detach()
    want = torch.logsumexp(torch.sort(s, 1, descending=True).values[:, lo:hi], 1)
    low, high = ring_mod._thresholds(s.clone(), lo, hi)
    kept = ((s >= low[:, None]) & (s < high[:, None])).sum(1)
    assert kept.tolist() == [hi - lo] * 5
    masked = ring_mod._masked(s.clone(), low, high)
    torch.testing.assert_close(torch.logsumexp(masked, 1), want, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    q, k, c = _case(5, n=6, k=40, d=5)
    assert torch.autograd.gradcheck(lambda a, b, cc: kernels.ring_nce(a, b, cc, 0.3, 0.05, 0.5), (q, k, c),
                                    eps=1e-7, atol=1e-6)


def test_chunked_never_holds_n_by_k(monkeypatch):
    q, k, c = _case(9, n=50, k=500, d=8)
    whole = _grads(lambda a, b, cc: kernels.ring_nce(a, b, cc, 0.1, 0.01, 0.1), q, k, c)
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 1024)
    with LargestOutput() as mode:
        chunked = _grads(lambda a, b, cc: kernels.ring_nce(a, b, cc, 0.1, 0.01, 0.1), q, k, c)
    assert mode.largest < 50 * 500
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_autocast_rounds_operands_like_the_other_kernels():
    q, k, c = _case(13, n=20, k=300, d=16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = kernels.ring_nce(q, k, c, 0.1, 0.0, 0.2)
    ref = kernels.ring_nce_ref(*(t.detach().bfloat16().double() for t in (q, k, c)), 0.1, 0.0, 0.2)
    assert a.dtype == torch.float32 and abs(a.item() - ref.item()) < 1e-5 * abs(ref.item())


def test_bad_arguments():
    q, k, c = _case(1, n=4, k=10, d=3)
    with pytest.raises(ValueError, match="lower < upper"):
        kernels.ring_nce(q, k, c, 0.1, 0.5, 0.5)
    with pytest.raises(ValueError, match="holds no rank"):
        kernels.ring_nce(q, k, c, 0.1, 0.01, 0.05)  # floor(0.1) = floor(0.5) = 0
    with pytest.raises(ValueError, match="candidates must be"):
        kernels.ring_nce(q, k, c[:, :2], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        kernels.ring_nce(q, k, c, 0.0)
    with pytest.raises(TypeError, match="backend='torch'"):
        kernels.ring_nce(q, k, c, 0.1, backend="triton")  # float64: torch path only


# -- in-batch use: a column per row excluded ------------------------------------------------------------
@pytest.mark.parametrize("window", WINDOWS, ids=[f"{a}-{b}" for a, b in WINDOWS])
def test_excluded_column_is_never_ranked(window):
    """SimCLR's in-batch ring: the candidates are the anchors themselves plus their keys, each anchor's
    own row excluded (the window is over K - 1); gradients reach q (anchor and candidate) and k (key and
    candidate), against the float64 reference."""
    q, k, _ = _case(21, n=29, k=5, d=16)
    excl = torch.arange(29)
    fn = lambda a, b: kernels.ring_nce(a, b, torch.cat([a, b]), 0.2, *window, exclude=excl)  # noqa: E731
    ref = lambda a, b: kernels.ring_nce_ref(a, b, torch.cat([a, b]), 0.2, *window, exclude=excl)  # noqa: E731
    ours, want = fn(q, k), ref(q, k)
    assert abs(ours.item() - want.item()) <= 1e-10 * max(1.0, abs(want.item()))
    gq, gk = torch.autograd.grad(ours, (q, k))
    rq, rk = torch.autograd.grad(want, (q, k))
    assert rel_err(gq, rq) < 1e-10 and rel_err(gk, rk) < 1e-10
    # without the exclusion each anchor is its own most similar candidate: a different loss
    plain = kernels.ring_nce(q, k, torch.cat([q, k]), 0.2, *window)
    assert abs(plain.item() - ours.item()) > 1e-6


def test_exclude_is_checked():
    q, k, c = _case(1)
    with pytest.raises(ValueError, match="exclude"):
        kernels.ring_nce(q, k, c, 0.2, 0.0, 0.5, exclude=torch.zeros(3, dtype=torch.long))


# -- m negatives drawn from the window (IR-Ring) ---------------------------------------------------------
def _ranks(q, c, t):
    s = q.double() @ c.double().T / t
    order = torch.argsort(s, 1, descending=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(c.shape[0]).expand_as(order).contiguous())


@pytest.mark.parametrize("window, num", [((0.0, 0.1), 7), ((0.01, 0.1), 13), ((0.2, 0.5), 1000)])
def test_ring_sample_draws_distinct_window_members_reproducibly(window, num):
    q, _, c = (t.detach() for t in _case(5, n=23, k=401, d=12))
    g = torch.Generator().manual_seed(3)
    idx = kernels.ring_sample(q, c, 0.1, *window, num, generator=g)
    lo, hi = ring_mod.window(401, *window)
    assert idx.shape == (23, min(num, hi - lo))
    r = _ranks(q, c, 0.1).gather(1, idx)
    assert ((r >= lo) & (r < hi)).all()
    assert all(len(set(row.tolist())) == idx.shape[1] for row in idx)
    again = kernels.ring_sample(q, c, 0.1, *window, num, generator=torch.Generator().manual_seed(3))
    assert torch.equal(idx, again)
    other = kernels.ring_sample(q, c, 0.1, *window, num, generator=torch.Generator().manual_seed(4))
    assert num >= hi - lo or not torch.equal(idx, other)


def test_ring_sample_is_uniform_over_the_window():
    """Each window member is drawn with probability m / W: counts over 400 draws within 5 sigma."""
    q, _, c = (t.detach() for t in _case(8, n=2, k=200, d=8))
    lo, hi = ring_mod.window(200, 0.05, 0.25)
    m, draws = 10, 400
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 200)
    for _ in range(draws):
        idx = kernels.ring_sample(q, c, 0.5, 0.05, 0.25, m, generator=g)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    r = _ranks(q, c, 0.5)
    inside = (r >= lo) & (r < hi)
    assert counts[~inside].sum() == 0
    p = m / (hi - lo)
    mean, sd = draws * p, (draws * p * (1 - p)) ** 0.5
    assert (counts[inside] - mean).abs().max() < 5 * sd


def test_sampled_ring_loss_is_infonce_over_the_drawn_rows():
    q, k, c = _case(9, n=31, k=257, d=16)
    k, c = k.detach(), c.detach()
    loss = kernels.ring_nce(q, k, c, 0.2, 0.01, 0.2, num_negatives=9, generator=torch.Generator().manual_seed(2))
    idx = kernels.ring_sample(q, c, 0.2, 0.01, 0.2, 9, generator=torch.Generator().manual_seed(2))
    s_pos = (q * k).sum(1) / 0.2
    s_neg = (q[:, None, :] * c[idx]).sum(-1) / 0.2
    want = (torch.logsumexp(torch.cat([s_pos[:, None], s_neg], 1), 1) - s_pos).mean()
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item())
    (g,) = torch.autograd.grad(loss, q)
    (gw,) = torch.autograd.grad(want, q)
    assert rel_err(g, gw) < 1e-5
    with pytest.raises(ValueError, match="without gradients"):
        kernels.ring_nce(q, k, c.requires_grad_(), 0.2, 0.0, 0.5, num_negatives=4)


# -- the Triton kernels, through the interpreter on CPU --------------------------------------------------
@pytest.mark.parametrize("window", WINDOWS, ids=[f"{a}-{b}" for a, b in WINDOWS])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_triton_matches_float64_reference(window, temperature):
    """fp32 kernels against the float64 sort reference, odd shapes, gradients to the candidates too."""
    q, k, c = _case(hash((window, temperature, "t")) % 1000, n=37, k=301, d=24, dtype=torch.float32)
    ours = _grads(lambda a, b, cc: kernels.ring_nce(a, b, cc, temperature, *window, backend="triton"), q, k, c)
    ref = _grads(lambda a, b, cc: kernels.ring_nce_ref(a, b, cc, temperature, *window, upcast=True), q, k, c)
    assert abs(ours[0].item() - ref[0].item()) <= 2e-6 * max(1.0, abs(ref[0].item()))
    for a, b in zip(ours[1:], ref[1:]):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-4


@pytest.mark.parametrize("n, k, lower, upper", [(7, 300, 0.01, 0.1), (33, 97, 0.0, 0.5), (5, 1000, 0.5, 0.999)])
def test_triton_radix_select_is_exact(n, k, lower, upper):
    """Scores exact in fp32 (one-hot queries pick a coordinate of the candidates, distinct dyadic
    values of both signs): the thresholds equal the sorted scores at ranks hi-1 and lo-1."""
    g = torch.Generator().manual_seed(n * k)
    d = 19
    c = torch.stack([torch.randperm(2 * k, generator=g)[:k] for _ in range(d)], 1).float()
    c = (c - k + 0.5) / 64.0  # distinct per column, never 0, both signs
    q = torch.nn.functional.one_hot(torch.randint(0, d, (n,), generator=g), d).float()
    s = q @ c.T  # exact
    lo, hi = ring_mod.window(k, lower, upper)
    launch = ring_mod._Launch(q, c, None, 1.0, "ieee")
    low, high = ring_mod._select_triton(launch, lo, hi)
    desc = torch.sort(s, 1, descending=True).values
    assert torch.equal(low, desc[:, hi - 1])
    assert torch.equal(high, desc[:, lo - 1] if lo > 0 else torch.full((n,), float("inf")))


def test_triton_excluded_column_and_autocast():
    q, k, _ = _case(23, n=21, k=5, d=16, dtype=torch.float32)
    excl = torch.arange(21)
    fn = lambda a, b: kernels.ring_nce(a, b, torch.cat([a, b]), 0.2, 0.01, 0.5, exclude=excl, backend="triton")  # noqa: E731
    ref = lambda a, b: kernels.ring_nce_ref(a, b, torch.cat([a, b]), 0.2, 0.01, 0.5, exclude=excl, upcast=True)  # noqa: E731
    ours, want = fn(q, k), ref(q, k)
    assert abs(ours.item() - want.item()) <= 2e-6 * abs(want.item())
    for a, b in zip(torch.autograd.grad(ours, (q, k)), torch.autograd.grad(want, (q, k))):
        assert rel_err(a, b) < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # operands rounded to bf16 by the kernel
        a = kernels.ring_nce(q, k, torch.cat([q, k]).detach(), 0.2, 0.0, 0.2, exclude=excl, backend="triton")
    r = kernels.ring_nce_ref(*(t.detach().bfloat16().double() for t in (q, k, torch.cat([q, k]))), 0.2, 0.0, 0.2,
                             exclude=excl)
    assert a.dtype == torch.float32 and abs(a.item() - r.item()) < 1e-5 * abs(r.item())


def test_triton_transposed_column_pass(monkeypatch):
    """The compiled IEEE column pass (scores as c q^T) on scores exact in fp32, so both layouts give
    the same bits: gradients to in-batch-style candidates equal the default layout's and the torch
    path's."""
    g = torch.Generator().manual_seed(1)
    n, k, d = 13, 90, 11
    c = torch.stack([torch.randperm(2 * k, generator=g)[:k] for _ in range(d)], 1).float()
    c = ((c - k + 0.5) / 64.0).requires_grad_()
    q = torch.nn.functional.one_hot(torch.randint(0, d, (n,), generator=g), d).float().requires_grad_()
    kk = (q.detach() * 0.5).requires_grad_()
    grads = {}
    for name, flag, backend in [("default", False, "triton"), ("transposed", True, "triton"), ("torch", False, "torch")]:
        monkeypatch.setattr(ring_mod, "SCORES_T_INTERPRETED", flag)
        loss = kernels.ring_nce(q, kk, c, 1.0, 0.05, 0.4, backend=backend)
        grads[name] = torch.autograd.grad(loss, (q, kk, c))
    for a, b in zip(grads["transposed"], grads["default"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads["transposed"], grads["torch"]):
        assert rel_err(a, b) < 1e-5

"""kernels.local_nce (AMDIM / DIM local NCE) against an independent float64 computation, on both backends."""
from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import LargestOutput, rel_err

from kernels import local_nce, local_nce_ref

backend_mod = importlib.import_module("kernels._backend")
CUDA = torch.cuda.is_available()


def inputs(b, l, d, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(b, d, generator=g, dtype=torch.float64) * scale / d ** 0.25
    trg = torch.randn(b, l, d, generator=g, dtype=torch.float64) * scale / d ** 0.25
    return src.to(dtype), trg.to(dtype)


def loop_reference(src, trg, clip):
    """Float64, written from the definition with loops over (i, l): no shared code with the kernel."""
    src, trg = src.double(), trg.double()
    B, L, _ = trg.shape
    raw = torch.einsum("id,jld->ijl", src, trg)
    s = raw if clip is None else clip * torch.tanh(raw / clip)
    total = 0.0
    for i in range(B):
        neg = torch.cat([s[i, j] for j in range(B) if j != i])
        neg_lse = torch.logsumexp(neg, 0)
        for l in range(L):
            total = total + torch.logaddexp(s[i, i, l], neg_lse) - s[i, i, l]
    return total / (B * L), (raw ** 2).mean()


def run(fn, src, trg, clip, reg_weight, **kw):
    src = src.detach().clone().requires_grad_()
    trg = trg.detach().clone().requires_grad_()
    out = fn(src, trg, clip, return_reg=True, **kw)
    (1.3 * out[0] + reg_weight * out[1]).backward()
    return out[0].detach(), out[1].detach(), src.grad, trg.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("b,l,d", [(9, 49, 41), (2, 1, 16), (17, 25, 64), (5, 3, 7)])
@pytest.mark.parametrize("clip", [None, 2.0, 20.0])
def test_matches_float64_reference(backend, b, l, d, clip):
    src, trg = inputs(b, l, d, seed=b * l + d, scale=2.0)
    loss, reg, ds, dt = run(local_nce, src, trg, clip, 0.04, backend=backend)
    want_loss, want_reg = loop_reference(src, trg, clip)
    assert abs(loss.item() - want_loss.item()) <= 2e-6 * abs(want_loss.item()) + 1e-6
    assert abs(reg.item() - want_reg.item()) <= 2e-6 * want_reg.item()
    s64, t64 = src.double().requires_grad_(), trg.double().requires_grad_()
    lo, rg = loop_reference(s64, t64, clip)
    (1.3 * lo + 0.04 * rg).backward()
    assert rel_err(ds, s64.grad) < 5e-5 and rel_err(dt, t64.grad) < 5e-5
    # the materialising reference of the module agrees with the loop one
    ref_loss, ref_reg = local_nce_ref(src, trg, clip, return_reg=True, upcast=True)
    assert abs(ref_loss.item() - want_loss.item()) < 1e-10 and abs(ref_reg.item() - want_reg.item()) < 1e-10


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("return_reg", [False, True])
def test_loss_alone_and_with_reg_give_the_same_loss_gradient(backend, return_reg):
    """The forward-fused gradient path (no reg) and the recompute path (reg, weight 0) agree."""
    src, trg = inputs(12, 10, 24, seed=3)
    s, t = src.clone().requires_grad_(), trg.clone().requires_grad_()
    out = local_nce(s, t, 5.0, return_reg=return_reg, backend=backend)
    (out[0] if return_reg else out).backward()
    s64, t64 = src.double().requires_grad_(), trg.double().requires_grad_()
    loop_reference(s64, t64, 5.0)[0].backward()
    assert rel_err(s.grad, s64.grad) < 5e-5 and rel_err(t.grad, t64.grad) < 5e-5


@pytest.mark.parametrize("clip", [None, 3.0])
def test_gradcheck_float64(monkeypatch, clip):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 8)  # several chunks of sources
    src = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    trg = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: local_nce(a, b, clip, backend="torch"), (src, trg))
    assert torch.autograd.gradcheck(
        lambda a, b: sum(local_nce(a, b, clip, return_reg=True, backend="torch")), (src, trg))


@pytest.mark.parametrize("chunk", [7, 500, 1 << 22])
def test_chunk_size_does_not_change_result(monkeypatch, chunk):
    src, trg = inputs(16, 9, 20, seed=1, scale=2.0)
    base = run(local_nce, src, trg, 4.0, 0.1, backend="torch")
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", chunk)
    got = run(local_nce, src, trg, 4.0, 0.1, backend="torch")
    assert abs(got[0].item() - base[0].item()) <= 1e-6 * base[0].item()
    assert rel_err(got[2], base[2].double()) < 1e-5 and rel_err(got[3], base[3].double()) < 1e-5


@pytest.mark.parametrize("return_reg", [False, True])
def test_never_holds_the_b_by_b_by_l_scores(monkeypatch, return_reg):
    """The scores are B x B x L = 32 x 32 x 49 = 50,176; with a 2,000-element chunk budget no torch op
    of the chunked path outputs more than the inputs (B L d = 12,544) or one chunk."""
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 2000)
    src, trg = inputs(32, 49, 8, seed=0)
    src.requires_grad_(), trg.requires_grad_()
    with LargestOutput() as probe:
        out = local_nce(src, trg, 10.0, return_reg=return_reg, backend="torch")
        (sum(out) if return_reg else out).backward()
    assert probe.largest <= max(32 * 49 * 8, 2000)
    with LargestOutput() as ref_probe:
        local_nce_ref(src, trg, 10.0).backward()
    assert ref_probe.largest >= 32 * 32 * 49


def test_bf16_inputs_and_autocast_follow_the_dtype_contract():
    src, trg = inputs(8, 6, 32, seed=2, dtype=torch.bfloat16)
    s, t = src.clone().requires_grad_(), trg.clone().requires_grad_()
    local_nce(s, t, 10.0, backend="triton").backward()
    assert s.grad.dtype == t.grad.dtype == torch.bfloat16
    want = local_nce_ref(src, trg, 10.0, upcast=True)
    got = local_nce(src, trg, 10.0, backend="torch")
    assert abs(got.item() - want.item()) < 1e-6 * abs(want.item()) + 1e-6  # bf16 operands are exact in fp32 dots
    f32 = inputs(8, 6, 32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = local_nce(*f32, 10.0, backend="torch")
    assert auto.dtype == torch.float32
    assert abs(auto.item() - want.item()) < 1e-6 * abs(want.item()) + 1e-6  # rounded to bf16 once, as above


@pytest.mark.parametrize("kw,match", [
    (dict(src=torch.randn(4, 8), trg=torch.randn(4, 3, 7)), r"trg \(B, L, d\)"),
    (dict(src=torch.randn(4, 8), trg=torch.randn(5, 3, 8)), r"trg \(B, L, d\)"),
    (dict(src=torch.randn(1, 8), trg=torch.randn(1, 3, 8)), "B >= 2"),
    (dict(src=torch.randn(4, 8), trg=torch.randn(4, 3, 8), clip=0.0), "clip"),
])
def test_bad_input_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        local_nce(kw.pop("src"), kw.pop("trg"), **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,l,d,clip", [(256, 49, 128, 10.0), (97, 25, 256, None)])
def test_gpu_kernel_matches_reference(b, l, d, clip, dtype):
    src, trg = (x.cuda() for x in inputs(b, l, d, seed=b, scale=2.0, dtype=dtype))
    loss, reg, ds, dt = run(local_nce, src, trg, clip, 0.04, backend="triton")
    ref = run(local_nce_ref, src.double(), trg.double(), clip, 0.04)
    tol = 5e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref[0].item()) <= tol * abs(ref[0].item())
    assert abs(reg.item() - ref[1].item()) <= tol * ref[1].item()
    assert rel_err(ds, ref[2]) < tol and rel_err(dt, ref[3]) < tol

"""kernels.bank_nce (softmax / CMC NCE) and kernels.bank_update against float64 references."""
from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import LargestOutput, rel_err, unit
import torch.nn.functional as F

from kernels import bank_nce, bank_nce_ref, bank_update, bank_update_ref

backend_mod = importlib.import_module("kernels._backend")

CUDA = torch.cuda.is_available()


def indices(b: int, k: int, n: int, device="cpu"):
    pos = torch.randint(0, n, (b,), device=device)
    neg = torch.randint(0, n, (b, k), device=device)
    neg[0, :5] = neg[0, 7]  # repeated negatives within a row
    neg[1, 3] = pos[1]  # the positive also drawn as a negative
    pos[2] = pos[3]  # two queries sharing a positive
    return pos, neg


def run(fn, q, bank, pos, neg, temperature, mode, Z=None, **kw):
    q = q.detach().clone().requires_grad_()
    loss, z_used = fn(q, bank, pos, neg, temperature, mode, Z, **kw)
    loss.backward()
    return loss.detach(), q.grad, z_used


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["softmax", "nce"])
@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("b,k,n,d", [(9, 201, 1000, 41), (20, 33, 50, 64)])
def test_bank_nce_matches_float64_reference(backend, mode, temperature, b, k, n, d):
    q, bank = unit(b, d), unit(n, d)
    pos, neg = indices(b, k, n)
    loss, grad, z = run(bank_nce, q, bank, pos, neg, temperature, mode, backend=backend)
    ref_loss, ref_grad, ref_z = run(bank_nce_ref, q.double(), bank.double(), pos, neg,
                                    temperature, mode)
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item())
    assert rel_err(grad, ref_grad) < 5e-5
    if mode == "nce":  # Z estimated from this batch like CMC's first call
        assert z.dtype == torch.float32 and z.shape == ()
        assert abs(z.item() - ref_z.item()) <= 1e-5 * ref_z.item()
    else:
        assert z is None and ref_z is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bank_nce_given_z_is_used_as_is(backend):
    q, bank = unit(9, 41), unit(500, 41)
    pos, neg = indices(9, 100, 500)
    loss, grad, z = run(bank_nce, q, bank, pos, neg, 0.07, "nce", Z=123.5, backend=backend)
    ref_loss, ref_grad, _ = run(bank_nce_ref, q.double(), bank.double(), pos, neg, 0.07, "nce",
                                Z=123.5)
    assert z.item() == 123.5
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item())
    assert rel_err(grad, ref_grad) < 5e-5
    # The Z returned on a first call reproduces that call when passed back (persistent state).
    first_loss, _, first_z = run(bank_nce, q, bank, pos, neg, 0.07, "nce", backend=backend)
    again, _, again_z = run(bank_nce, q, bank, pos, neg, 0.07, "nce", Z=first_z, backend=backend)
    assert abs(again.item() - first_loss.item()) <= 1e-6 * abs(first_loss.item())
    assert torch.equal(again_z, first_z)


def test_bank_nce_large_k_torch_path():
    q, bank = unit(9, 41), unit(5000, 41)
    pos, neg = indices(9, 4231, 5000)
    for mode in ("softmax", "nce"):
        loss, grad, _ = run(bank_nce, q, bank, pos, neg, 0.07, mode, backend="torch")
        ref_loss, ref_grad, _ = run(bank_nce_ref, q.double(), bank.double(), pos, neg, 0.07, mode)
        assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item())
        assert rel_err(grad, ref_grad) < 5e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["softmax", "nce"])
def test_bank_nce_bf16_error_bounded_by_torch_bf16_error(backend, mode):
    q, bank = unit(16, 48, torch.bfloat16), unit(300, 48, torch.bfloat16)
    pos, neg = indices(16, 120, 300)
    Z = 400.0  # fixed, so the three runs below score the same function
    loss, grad, _ = run(bank_nce, q, bank, pos, neg, 0.1, mode, Z, backend=backend)
    ref_loss, ref_grad, _ = run(bank_nce_ref, q.double(), bank.double(), pos, neg, 0.1, mode, Z)
    bf_loss, bf_grad, _ = run(bank_nce_ref, q, bank, pos, neg, 0.1, mode, Z)  # torch in bf16
    assert grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref_loss.item()) <= 2 * abs(bf_loss.item() - ref_loss.item()) + 1e-5
    assert rel_err(grad, ref_grad) <= 2 * rel_err(bf_grad, ref_grad)


@pytest.mark.parametrize("mode", ["softmax", "nce"])
def test_bank_nce_gradcheck_float64_chunked(monkeypatch, mode):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 12)  # chunks of 2 negatives x 1 row at d=5
    q = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(20, 5, dtype=torch.float64)
    pos, neg = indices(4, 9, 20)
    assert torch.autograd.gradcheck(
        lambda x: bank_nce(x, bank, pos, neg, 0.5, mode, Z=3.0, backend="torch").loss, (q,))


@pytest.mark.parametrize("mode", ["softmax", "nce"])
def test_bank_nce_chunk_size_does_not_change_result(monkeypatch, mode):
    q, bank = unit(13, 41), unit(400, 41)
    pos, neg = indices(13, 341, 400)
    results = []
    for chunk in (100, 41 * 341 * 2, 1 << 22):  # 2 keys x 1 row, 2 full rows, everything
        monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", chunk)
        results.append(run(bank_nce, q, bank, pos, neg, 0.1, mode, backend="torch"))
    for loss, grad, _ in results[1:]:
        assert abs(loss.item() - results[0][0].item()) <= 1e-6 * abs(loss.item())
        assert rel_err(grad, results[0][1].double()) < 1e-5


def test_bank_nce_chunked_path_never_gathers_b_by_k_rows(monkeypatch):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 400)
    b, k, n, d = 16, 300, 500, 8
    q, bank = unit(b, d).requires_grad_(), unit(n, d)
    pos, neg = indices(b, k, n)
    with LargestOutput() as probe:
        bank_nce(q, bank, pos, neg, 0.1, "nce", backend="torch").loss.backward()
    assert probe.largest <= n * d  # the bank itself; gathers stay within 400 elements
    with LargestOutput() as ref_probe:
        bank_nce_ref(q, bank, pos, neg, 0.1, "nce").loss.backward()
    assert ref_probe.largest >= b * k * d


def test_bank_nce_leaves_bank_alone():
    q, bank = unit(9, 16).requires_grad_(), unit(60, 16).requires_grad_()
    before = bank.detach().clone()
    pos, neg = indices(9, 20, 60)
    bank_nce(q, bank, pos, neg, 0.1, "softmax", backend="triton").loss.backward()
    assert bank.grad is None and torch.equal(bank.detach(), before)
    with pytest.raises(ValueError, match="mode"):
        bank_nce(q, bank, pos, neg, 0.1, "infonce")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_bank_update_matches_float64_reference(backend, dtype, momentum):
    n, d, b = 211, 41, 37
    bank, x = unit(n, d, dtype), torch.randn(b, d).to(dtype)
    idx = torch.randint(0, 40, (b,))
    idx[:4] = idx[4]  # five rows of x land on one bank row
    expected = bank_update_ref(bank, idx, x, momentum, upcast=True)
    out = bank.clone()
    bank_update(out, idx, x, momentum, backend=backend)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(out[untouched], bank[untouched])
    if dtype == torch.float32:
        assert (out.double() - expected).abs().max() < 1e-6
    else:
        # One bf16 ulp (torch rounds to nearest, <= 1/2 ulp; the interpreter truncates, < 1 ulp)
        # plus fp32 arithmetic noise on unit-norm rows, which matters for entries near zero.
        ulp = 2.0 ** (torch.floor(torch.log2(expected.abs().clamp(min=1e-30))) - 7)
        assert ((out.double() - expected).abs() <= ulp + 1e-6).all()
    assert torch.allclose(out.double().norm(dim=1)[idx], torch.ones(b, dtype=torch.float64),
                          atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_bank_update_duplicates_are_averaged_not_last_write():
    bank = unit(10, 8)
    x = torch.randn(3, 8)
    idx = torch.tensor([4, 4, 4])
    for backend in ("torch", "triton"):
        out = bank.clone()
        bank_update(out, idx, x, 0.5, backend=backend)
        expected = F.normalize(0.5 * bank[4] + 0.5 * x.mean(0), dim=0)
        assert (out[4] - expected).abs().max() < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_bank_kernels_match_reference(dtype):
    b, k, n, d = 256, 4231, 100_003, 128
    q, bank = unit(b, d, dtype, "cuda"), unit(n, d, dtype, "cuda")
    pos, neg = indices(b, k, n, "cuda")
    tol = 5e-5 if dtype == torch.float32 else 1e-2
    for mode in ("softmax", "nce"):
        loss, grad, _ = run(bank_nce, q, bank, pos, neg, 0.07, mode, backend="triton")
        ref_loss, ref_grad, _ = run(bank_nce_ref, q.double(), bank.double(), pos, neg, 0.07, mode)
        assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
        assert rel_err(grad, ref_grad) < tol
    x = torch.randn(b, d, device="cuda", dtype=dtype)
    expected = bank_update_ref(bank, pos, x, 0.5, upcast=True)
    bank_update(bank, pos, x, 0.5, backend="triton")
    assert (bank.double() - expected).abs().max() < (1e-6 if dtype == torch.float32 else 4e-3)

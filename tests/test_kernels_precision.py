"""The kernels' precision contract (kernels._backend.dot_dtype), on both backends.

Under torch.autocast, fp32 embeddings are rounded to the autocast dtype for the dots (tensor cores
on the GPU), accumulation stays fp32 and gradients come back fp32; outside autocast fp32 follows
torch's float32 matmul precision (IEEE by default, tf32 when set to "high"). The chunked torch path
keeps the same contract in forward and backward, autocast or not (the forward used to run under
autocast in bf16 and the backward in fp32). References: float64 on the bf16-rounded inputs.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from kernel_helpers import rel_err, unit

backend_mod = importlib.import_module("kernels._backend")


class Launches:
    """Records (kernel name, first tensor's dtype, PRECISION) of every Triton launch."""

    def __init__(self, monkeypatch):
        self.seen = []
        original = backend_mod.TritonKernel.__call__

        def record(kernel, grid, *args, device_tensor, **kw):
            self.seen.append((kernel.fn.__name__, args[0].dtype, kw.get("PRECISION")))
            return original(kernel, grid, *args, device_tensor=device_tensor, **kw)

        monkeypatch.setattr(backend_mod.TritonKernel, "__call__", record)


def _losses(backend, z, q, k, queue):
    return {
        "nt_xent": lambda: kernels.nt_xent(z, 0.1, backend=backend),
        "info_nce_queue": lambda: kernels.info_nce(q, k, queue, temperature=0.1, backend=backend),
        "info_nce": lambda: kernels.info_nce(q, k, temperature=0.1, backend=backend),
    }


def _refs(z, q, k, queue):
    return {
        "nt_xent": lambda: kernels.nt_xent_ref(z, 0.1, upcast=True),
        "info_nce_queue": lambda: kernels.info_nce_ref(q, k, queue, temperature=0.1, upcast=True),
        "info_nce": lambda: kernels.info_nce_ref(q, k, temperature=0.1, upcast=True),
    }


def _inputs(seed, d=48):
    torch.manual_seed(seed)
    z = unit(40, d).requires_grad_()
    q, k = unit(24, d).requires_grad_(), unit(24, d).requires_grad_()
    return z, q, k, unit(70, d)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", ["nt_xent", "info_nce_queue", "info_nce"])
def test_autocast_rounds_operands_to_bf16_and_accumulates_in_fp32(backend, name, monkeypatch):
    z, q, k, queue = _inputs(0)
    rec = Launches(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _losses(backend, z, q, k, queue)[name]()
    loss.backward()
    leaves = [z] if name == "nt_xent" else [q, k]
    grads = [t.grad.clone() for t in leaves]
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    if backend == "triton":
        assert rec.seen and all(dt == torch.bfloat16 for _, dt, _ in rec.seen), rec.seen
    # float64 reference on the rounded operands: only the accumulation order differs
    rz, rq, rk, rqueue = (t.detach().bfloat16().double().requires_grad_() for t in (z, q, k, queue))
    ref = _refs(rz, rq, rk, rqueue)[name]()
    ref.backward()
    ref_leaves = [rz] if name == "nt_xent" else [rq, rk]
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    for g, r in zip(grads, ref_leaves):
        assert rel_err(g, r.grad) < 1e-4, name


@pytest.mark.parametrize("name", ["nt_xent", "info_nce_queue", "info_nce"])
def test_torch_path_forward_and_backward_follow_one_contract(name):
    """Autocast on or off around forward / backward changes nothing: the same as precision='bf16'."""
    results = []
    for fwd_ac, bwd_ac in ((True, False), (True, True), (False, False)):
        z, q, k, queue = _inputs(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fwd_ac):
            if fwd_ac:
                loss = _losses("torch", z, q, k, queue)[name]()
            else:  # explicit precision, no autocast
                loss = {"nt_xent": lambda: kernels.nt_xent(z, 0.1, precision="bf16", backend="torch"),
                        "info_nce_queue": lambda: kernels.info_nce(q, k, queue, temperature=0.1,
                                                                   precision="bf16", backend="torch"),
                        "info_nce": lambda: kernels.info_nce(q, k, temperature=0.1, precision="bf16",
                                                             backend="torch")}[name]()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bwd_ac):
            loss.backward()
        leaves = [z] if name == "nt_xent" else [q, k]
        results.append((loss.detach(), [t.grad.clone() for t in leaves]))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, results[0][1]))


def test_fp32_follows_torchs_matmul_precision(monkeypatch):
    z, q, k, queue = _inputs(2)
    rec = Launches(monkeypatch)
    kernels.nt_xent(z, 0.1, backend="triton")
    assert {p for _, _, p in rec.seen} == {"ieee"}
    rec.seen.clear()
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        kernels.info_nce(q, k, queue, temperature=0.1, backend="triton").backward()
    finally:
        torch.set_float32_matmul_precision(old)
    assert {p for _, _, p in rec.seen} == {"tf32"} and {dt for _, dt, _ in rec.seen} == {torch.float32}
    rec.seen.clear()
    kernels.nt_xent(z, 0.1, precision="tf32", backend="triton")
    assert {p for _, _, p in rec.seen} == {"tf32"}


def test_bank_nce_ignores_autocast():
    """No matrix unit there: fp32 products under autocast too (the torch path switches it off)."""
    torch.manual_seed(3)
    q, bank = unit(6, 32).requires_grad_(), unit(80, 32)
    pos, neg = torch.randint(0, 80, (6,)), torch.randint(0, 80, (6, 20))
    plain = kernels.bank_nce(q, bank, pos, neg, 0.1, "nce", 80.0, backend="torch").loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = kernels.bank_nce(q, bank, pos, neg, 0.1, "nce", 80.0, backend="torch").loss
    assert torch.equal(plain, auto)


def test_precision_argument_is_checked():
    z = unit(8, 16)
    with pytest.raises(ValueError, match="unknown precision"):
        kernels.nt_xent(z, 0.1, precision="fp8")
    with pytest.raises(TypeError, match="float64"):
        kernels.nt_xent(z.double(), 0.1, precision="bf16")
    # explicit bf16 outside autocast = the autocast result
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = kernels.nt_xent(z, 0.1)
    assert torch.equal(a, kernels.nt_xent(z, 0.1, precision="bf16"))


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_autocast_contract_and_bucketed_choice():
    """Compiled kernels under autocast: bf16 dots, fp32 gradients, float64-exact up to accumulation;
    a second size in the same power-of-two bucket reuses the tuned configs (no new entries)."""
    torch.manual_seed(0)
    z = unit(5000, 128, device="cuda").requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = kernels.nt_xent(z, 0.07)
    loss.backward()
    assert z.grad.dtype == torch.float32
    rz = z.detach().bfloat16().double().requires_grad_()
    ref = kernels.nt_xent(rz, 0.07, backend="torch")
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-4 * abs(ref.item())
    assert rel_err(z.grad, rz.grad) < 2e-4
    n = len(backend_mod._TUNED)
    z2 = unit(4500, 128, device="cuda").requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kernels.nt_xent(z2, 0.07).backward()
    assert len(backend_mod._TUNED) == n

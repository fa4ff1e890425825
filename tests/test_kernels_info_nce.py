"""kernels.info_nce (queue / in-batch) against a float64 reference on both backends."""
from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import LargestOutput, rel_err, unit

from kernels import info_nce, info_nce_ref

backend_mod = importlib.import_module("kernels._backend")

CUDA = torch.cuda.is_available()


def run(fn, q, k, queue, **kw):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    loss = fn(q, k, queue, **kw)
    loss.backward()
    return loss.detach(), q.grad, k.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [0.05, 0.2, 1.0])
@pytest.mark.parametrize("n,d,k_queue", [(9, 41, 341), (77, 64, None), (130, 33, 97), (9, 41, None)])
def test_matches_float64_reference(backend, temperature, n, d, k_queue):
    q, k = unit(n, d), unit(n, d)
    queue = None if k_queue is None else unit(k_queue, d)
    loss, dq, dk = run(info_nce, q, k, queue, temperature=temperature, backend=backend)
    ref = run(info_nce_ref, q.double(), k.double(), None if queue is None else queue.double(),
              temperature=temperature)
    assert abs(loss.item() - ref[0].item()) <= 2e-6 * abs(ref[0].item()) + 1e-6
    assert rel_err(dq, ref[1]) < 5e-5
    assert rel_err(dk, ref[2]) < 5e-5


def test_large_queue_torch_path():
    q, k, queue = unit(9, 41), unit(9, 41), unit(4231, 41)
    loss, dq, dk = run(info_nce, q, k, queue, temperature=0.07, backend="torch")
    ref = run(info_nce_ref, q.double(), k.double(), queue.double(), temperature=0.07)
    assert abs(loss.item() - ref[0].item()) <= 2e-6 * abs(ref[0].item())
    assert rel_err(dq, ref[1]) < 5e-5 and rel_err(dk, ref[2]) < 5e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_queue", [True, False])
def test_bf16_error_bounded_by_torch_bf16_error(backend, with_queue):
    q, k = unit(100, 48, torch.bfloat16), unit(100, 48, torch.bfloat16)
    queue = unit(150, 48, torch.bfloat16) if with_queue else None
    loss, dq, dk = run(info_nce, q, k, queue, temperature=0.1, backend=backend)
    ref = run(info_nce_ref, q.double(), k.double(), None if queue is None else queue.double(),
              temperature=0.1)
    bf = run(info_nce_ref, q, k, queue, temperature=0.1)  # torch's own bf16 error
    assert dq.dtype == dk.dtype == torch.bfloat16
    assert abs(loss.item() - ref[0].item()) <= 2 * abs(bf[0].item() - ref[0].item()) + 1e-5
    assert rel_err(dq, ref[1]) <= 2 * rel_err(bf[1], ref[1])
    assert rel_err(dk, ref[2]) <= 2 * rel_err(bf[2], ref[2])


@pytest.mark.parametrize("with_queue", [True, False])
def test_gradcheck_float64_chunked(monkeypatch, with_queue):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 10)
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(7, 4, dtype=torch.float64) if with_queue else None
    assert torch.autograd.gradcheck(
        lambda a, b: info_nce(a, b, queue, temperature=0.4, backend="torch"), (q, k))


def test_queue_gets_no_gradient_and_k_may_be_detached():
    q, k, queue = unit(12, 16).requires_grad_(), unit(12, 16), unit(20, 16).requires_grad_()
    info_nce(q, k, queue, temperature=0.2, backend="triton").backward()
    assert queue.grad is None and q.grad is not None


@pytest.mark.parametrize("with_queue", [True, False])
def test_chunk_size_does_not_change_result(monkeypatch, with_queue):
    q, k = unit(64, 41), unit(64, 41)
    queue = unit(341, 41) if with_queue else None
    results = []
    for chunk in (5, 700, 1 << 22):
        monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", chunk)
        results.append(run(info_nce, q, k, queue, temperature=0.1, backend="torch"))
    for loss, dq, dk in results[1:]:
        assert abs(loss.item() - results[0][0].item()) <= 1e-6 * abs(loss.item())
        assert rel_err(dq, results[0][1].double()) < 1e-5
        assert rel_err(dk, results[0][2].double()) < 1e-5


def test_chunked_path_never_allocates_n_by_k(monkeypatch):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 700)
    n, d, kq = 64, 8, 700
    q, k, queue = unit(n, d).requires_grad_(), unit(n, d).requires_grad_(), unit(kq, d)
    with LargestOutput() as probe:
        info_nce(q, k, queue, temperature=0.1, backend="torch").backward()
    assert probe.largest <= kq * d  # the queue itself; logits only ever one 700-element row
    with LargestOutput() as ref_probe:
        info_nce_ref(q, k, queue, temperature=0.1).backward()
    assert ref_probe.largest >= n * kq


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k_queue,d", [(4231, 16411, 128), (1000, None, 256)])
def test_gpu_kernel_matches_reference(n, k_queue, d, dtype):
    q, k = unit(n, d, dtype, "cuda"), unit(n, d, dtype, "cuda")
    queue = None if k_queue is None else unit(k_queue, d, dtype, "cuda")
    loss, dq, dk = run(info_nce, q, k, queue, temperature=0.07, backend="triton")
    ref = run(info_nce_ref, q.double(), k.double(), None if queue is None else queue.double(),
              temperature=0.07)
    tol = 5e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - ref[0].item()) <= tol * abs(ref[0].item())
    assert rel_err(dq, ref[1]) < tol and rel_err(dk, ref[2]) < tol


# -- targets= (k with more rows than q, target j = targets_i; CPC's every-patch candidates) --------
def _targets(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, m, (n,), generator=g)
    t[1] = t[0]  # two queries sharing a target: its key's gradient sums both
    return t


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,m,d", [(9, 37, 41), (50, 50, 16), (13, 200, 64)])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_targets_match_float64_reference(backend, n, m, d, temperature):
    q, k, t = unit(n, d), unit(m, d), _targets(n, m, n + m)
    loss, dq, dk = run(info_nce, q, k, None, temperature=temperature, targets=t, backend=backend)
    # independent float64 reference: the (N, M) logits and a cross entropy written out
    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    logits = qd @ kd.T / temperature
    ref = (torch.logsumexp(logits, 1) - logits[torch.arange(n), t]).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 2e-6 * abs(ref.item()) + 1e-6
    assert rel_err(dq, qd.grad) < 5e-5 and rel_err(dk, kd.grad) < 5e-5
    assert dk.shape == (m, d)


def test_targets_default_is_the_diagonal():
    q, k = unit(20, 16), unit(20, 16)
    a = info_nce(q, k, temperature=0.2, backend="torch")
    b = info_nce(q, k, temperature=0.2, targets=torch.arange(20), backend="torch")
    assert torch.equal(a, b)


def test_targets_gradcheck_and_no_n_by_m(monkeypatch):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 10)
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([7, 0, 0, 3, 5])
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, temperature=0.4, targets=t, backend="torch"), (q, k))
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 700)
    q, k = unit(64, 8).requires_grad_(), unit(700, 8).requires_grad_()
    with LargestOutput() as probe:
        info_nce(q, k, temperature=0.1, targets=_targets(64, 700, 0), backend="torch").backward()
    assert probe.largest <= 700 * 8


@pytest.mark.parametrize("bad,match", [
    (dict(targets=torch.tensor([0, 1, 40])), r"\[0, 12\)"),
    (dict(targets=torch.tensor([0, 1])), "shape"),
    (dict(targets=torch.tensor([0.0, 1.0, 2.0])), "integer"),
    (dict(targets=torch.tensor([0, 1, 2]), queue=unit(5, 4)), "no queue"),
])
def test_targets_bad_input_errors(bad, match):
    q, k = unit(3, 4), unit(12, 4)
    queue = bad.pop("queue", None)
    with pytest.raises(ValueError, match=match):
        info_nce(q, k, queue, temperature=0.1, **bad)

"""kernels.nt_xent against a float64 reference: torch chunked path, Triton (interpreter on CPU)."""
from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import LargestOutput, rel_err
from kernel_helpers import unit as embeddings

from kernels import nt_xent, nt_xent_ref

backend_mod = importlib.import_module("kernels._backend")

CUDA = torch.cuda.is_available()


def loss_and_grad(fn, z, **kw):
    z = z.detach().clone().requires_grad_()
    loss = fn(z, **kw)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [0.05, 0.2, 1.0])
@pytest.mark.parametrize("m,d,views", [(18, 41, 2), (150, 64, 3), (93, 17, 1)])
def test_matches_float64_reference(backend, temperature, m, d, views):
    z = embeddings(m, d)
    # views=1 means SupCon-style labels: a few classes, including singletons without positives.
    labels = None if views > 1 else torch.randint(0, m // 3, (m,))
    kw = dict(temperature=temperature, labels=labels, num_views=max(views, 1))
    loss, grad = loss_and_grad(nt_xent, z, backend=backend, **kw)
    ref_loss, ref_grad = loss_and_grad(nt_xent_ref, z.double(), **kw)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item()) + 1e-6
    assert rel_err(grad, ref_grad) < 5e-5
    assert grad.dtype == z.dtype


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_error_bounded_by_torch_bf16_error(backend):
    z = embeddings(130, 48, torch.bfloat16)
    loss, grad = loss_and_grad(nt_xent, z, temperature=0.1, backend=backend, num_views=2)
    ref_loss, ref_grad = loss_and_grad(nt_xent_ref, z.double(), temperature=0.1)
    bf_loss, bf_grad = loss_and_grad(nt_xent_ref, z, temperature=0.1)  # torch's own bf16 error
    assert grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref_loss.item()) <= 2 * abs(bf_loss.item() - ref_loss.item()) + 1e-5
    assert rel_err(grad, ref_grad) <= 2 * rel_err(bf_grad, ref_grad)


def test_gradcheck_float64_chunked(monkeypatch):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 8)  # several row chunks even at M = 6
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: nt_xent(x, 0.3, num_views=3, backend="torch"), (z,))
    labels = torch.tensor([0, 1, 0, 2, 1, 0])  # row 3 has no positive
    assert torch.autograd.gradcheck(lambda x: nt_xent(x, 0.7, labels, backend="torch"), (z,))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_anchor_without_positive_is_left_out(backend):
    z = embeddings(40, 24)
    labels = torch.arange(40) // 2
    labels[-1] = 999  # its former partner (row 38) loses its positive too
    loss = nt_xent(z, 0.2, labels, backend=backend)
    keep = torch.arange(38)
    expected = nt_xent_ref(z[keep].double(), 0.2, labels[keep])  # 38, 39 as candidates only ...
    full = nt_xent_ref(z.double(), 0.2, labels)  # ... are still negatives for the others
    assert abs(loss.item() - full.item()) < 1e-5
    assert abs(full.item() - expected.item()) > 1e-4  # the negatives really do matter
    assert torch.isnan(nt_xent(z, 0.2, torch.arange(40), backend=backend))  # no positives at all


def test_chunk_size_does_not_change_result(monkeypatch):
    z = embeddings(341, 41)
    results = []
    for chunk in (7, 1000, 1 << 22):  # 1 row per chunk, 2 rows, everything at once
        monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", chunk)
        results.append(loss_and_grad(nt_xent, z, temperature=0.1, backend="torch", num_views=11))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        assert rel_err(grad, results[0][1].double()) < 1e-5  # only summation order differs


def test_chunked_path_never_allocates_m_by_m(monkeypatch):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 600)
    m, d = 300, 16
    z = embeddings(m, d).requires_grad_()
    with LargestOutput() as probe:
        nt_xent(z, 0.1, backend="torch").backward()
    assert probe.largest <= max(600, m * d)
    with LargestOutput() as ref_probe:  # the probe does see an M x M matrix when there is one
        nt_xent_ref(z, 0.1).backward()
    assert ref_probe.largest >= m * m


def test_rejects_bad_inputs():
    z = embeddings(9, 8)
    with pytest.raises(ValueError, match="views"):
        nt_xent(z, 0.1)  # 9 rows are not 2 views
    with pytest.raises(ValueError, match="backend"):
        nt_xent(embeddings(8, 8), 0.1, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        nt_xent(embeddings(8, 8).double(), 0.1, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,d", [(4231, 128), (2 * 4096, 256)], ids=["odd", "d256"])
def test_gpu_kernel_matches_reference(m, d, dtype):
    z = embeddings(m, d, dtype, "cuda")
    labels = torch.arange(m, device="cuda") % (m // 3 + 1)
    loss, grad = loss_and_grad(nt_xent, z, temperature=0.07, labels=labels, backend="triton")
    ref_loss, ref_grad = loss_and_grad(nt_xent_ref, z.double(), temperature=0.07, labels=labels)
    tol = 5e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert rel_err(grad, ref_grad) < tol

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


# ---- local anchors: nt_xent(z_all, ..., anchors=rows) -----------------------------------------

def local_ref(z, temperature, labels, rows):
    """Independent float64 value: materialised logits, LSE over j != i, mean positive logit."""
    z = z.double()
    m = z.shape[0]
    eye = torch.eye(m, dtype=torch.bool)
    s = (z @ z.T / temperature).masked_fill(eye, float("-inf"))[rows]
    pos = ((labels[:, None] == labels[None, :]) & ~eye)[rows]
    cnt = pos.sum(1)
    mean_pos = torch.where(pos, s, 0.0).sum(1) / cnt.clamp(min=1)
    per_anchor = torch.logsumexp(s, 1) - mean_pos
    return per_anchor[cnt > 0].mean()


def supcon_labels(m, seed=0):
    """A few rows per class plus singletons: anchors with several positives, anchors with none."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, m // 4, (m,), generator=g)
    labels[torch.randperm(m, generator=g)[: m // 10]] = torch.arange(1000, 1000 + m // 10)
    counts = torch.bincount(labels)[labels]
    assert (counts >= 4).any() and (counts == 1).any()
    return labels


M_LOCAL = 90
ANCHOR_SETS = {  # block at the start / middle / end (ragged against the 16-row interpreter tiles)
    "start": slice(0, 37),
    "middle": slice(29, 61),
    "end": slice(70, None),
    "single": slice(44, 45),
    "index": torch.randperm(M_LOCAL, generator=torch.Generator().manual_seed(1))[:33],  # unsorted
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", list(ANCHOR_SETS))
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_local_anchors_match_float64_reference(backend, where, temperature, monkeypatch):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 5 * M_LOCAL)  # torch path: 5-anchor chunks
    z = embeddings(M_LOCAL, 20)
    labels = supcon_labels(M_LOCAL)
    anchors = ANCHOR_SETS[where]
    if where == "single":
        labels[44] = labels[3]  # make sure the lone anchor has a positive
    loss, grad = loss_and_grad(nt_xent, z, temperature=temperature, labels=labels, anchors=anchors,
                               backend=backend)
    ref_loss, ref_grad = loss_and_grad(local_ref, z, temperature=temperature, labels=labels,
                                       rows=anchors)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item()) + 1e-6
    assert rel_err(grad, ref_grad) < 5e-5
    rows = torch.arange(M_LOCAL)[anchors]
    keys_only = torch.ones(M_LOCAL, dtype=torch.bool)
    keys_only[rows] = False
    assert grad[keys_only].abs().sum() > 0  # gradients reach the keys that are not anchors


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_rows_as_anchors_is_the_full_loss(backend):
    z = embeddings(70, 24)
    labels = supcon_labels(70)
    full = loss_and_grad(nt_xent, z, temperature=0.2, labels=labels, backend=backend)
    for anchors in (slice(None), slice(0, 70), slice(-70, None)):  # the same code path: bitwise
        loss, grad = loss_and_grad(nt_xent, z, temperature=0.2, labels=labels, anchors=anchors,
                                   backend=backend)
        assert torch.equal(loss, full[0]) and torch.equal(grad, full[1])
    for anchors in (torch.arange(70), torch.randperm(70)):  # index path: only rounding differs
        loss, grad = loss_and_grad(nt_xent, z, temperature=0.2, labels=labels, anchors=anchors,
                                   backend=backend)
        torch.testing.assert_close(loss, full[0], rtol=1e-6, atol=0)
        assert rel_err(grad, full[1].double()) < 1e-5


def _partition_sum(z, temperature, labels, blocks, weights, backend):
    """sum_b w_b * loss(block b) and its gradient, each block's loss a separate nt_xent call."""
    z = z.detach().clone().requires_grad_()
    total = sum(w * nt_xent(z, temperature, labels, anchors=b, backend=backend)
                for b, w in zip(blocks, weights))
    total.backward()
    return total.detach(), z.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_blocks_sum_to_the_full_loss(backend, world):
    # SimCLR on `world` ranks of n instances: rank r gathers cat([z1_r, z2_r]), so the gathered
    # matrix is rank-major and rank r's anchors are the contiguous block [r*2n, (r+1)*2n).
    n = 13
    m = world * 2 * n
    z = embeddings(m, 16)
    index = torch.randperm(10 * m)[: world * n].view(world, n)  # dataset indices per rank
    labels = torch.cat([index[r].repeat(2) for r in range(world)])
    blocks = [slice(r * 2 * n, (r + 1) * 2 * n) for r in range(world)]
    full_loss, full_grad = loss_and_grad(nt_xent, z, temperature=0.1, labels=labels,
                                         backend=backend)
    # Every anchor has its positive, so each block counts 2n of the M anchors: the mean over
    # ranks of the local losses (and of their gradients: DDP's average) is the full loss.
    loss, grad = _partition_sum(z, 0.1, labels, blocks, [2 * n / m] * world, backend)
    assert abs(loss.item() - full_loss.item()) <= 1e-6 * abs(full_loss.item())
    assert rel_err(grad, full_grad.double()) < 1e-5
    ref = local_ref(z, 0.1, labels, torch.arange(m))
    assert abs(full_loss.item() - ref.item()) <= 2e-6 * abs(ref.item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("split", ["uneven_blocks", "interleaved"])
def test_partition_weighted_by_valid_anchors_is_the_full_loss(backend, split):
    m = 84
    z = embeddings(m, 20)
    labels = supcon_labels(m, seed=3)
    if split == "uneven_blocks":
        cuts = [0, 11, 40, 41, 77, m]
        blocks = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        rows = [torch.arange(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    else:
        rows = [torch.arange(r, m, 4) for r in range(4)]
        blocks = rows
    has_pos = (torch.bincount(labels)[labels] > 1)
    n_valid = [has_pos[r].sum().item() for r in rows]
    assert all(n_valid) and len(set(n_valid)) > 1  # the weights really differ
    full_loss, full_grad = loss_and_grad(nt_xent, z, temperature=0.3, labels=labels,
                                         backend=backend)
    weights = [v / has_pos.sum().item() for v in n_valid]
    loss, grad = _partition_sum(z, 0.3, labels, blocks, weights, backend)
    assert abs(loss.item() - full_loss.item()) <= 1e-6 * abs(full_loss.item())
    assert rel_err(grad, full_grad.double()) < 1e-5
    # and in float64 against the independent reference, block by block
    for b, r in zip(blocks, rows):
        got = nt_xent(z.double(), 0.3, labels, anchors=b, backend="torch")
        assert abs(got.item() - local_ref(z, 0.3, labels, r).item()) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_local_anchors_without_positive(backend):
    z = embeddings(40, 24)
    labels = torch.arange(40) // 2
    labels[[10, 13]] = torch.tensor([998, 999])  # 10, 13 and their partners 11, 12 lose theirs
    loss = nt_xent(z, 0.2, labels, anchors=slice(8, 16), backend=backend)
    valid = torch.tensor([8, 9, 14, 15])
    ref = local_ref(z, 0.2, labels, valid)  # 10..13 are left out of the mean ...
    assert abs(loss.item() - ref.item()) < 1e-5
    only_first_16 = local_ref(z[:16], 0.2, labels[:16], valid)  # ... and every row is a key
    assert abs(ref.item() - only_first_16.item()) > 1e-4
    assert torch.isnan(nt_xent(z, 0.2, labels, anchors=slice(10, 14), backend=backend))
    assert torch.isnan(nt_xent(z, 0.2, labels, anchors=torch.tensor([13, 10]), backend=backend))


def test_local_float64_gradcheck_chunked(monkeypatch):
    monkeypatch.setattr(backend_mod, "CHUNK_ELEMS", 8)  # one anchor row per chunk at M = 7
    z = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1])  # row 3 has no positive
    for anchors in (slice(2, 5), slice(0, 1), slice(5, None), torch.tensor([6, 1, 3])):
        out = nt_xent(z, 0.4, labels, anchors=anchors, backend="torch")
        assert out.dtype == torch.float64
        assert abs(out.item() - local_ref(z, 0.4, labels, anchors).item()) < 1e-12
        assert torch.autograd.gradcheck(
            lambda x, a=anchors: nt_xent(x, 0.4, labels, anchors=a, backend="torch"), (z,))


def test_local_anchors_cost_n_anchors_by_m():
    m, d, n_a = 300, 16, 30
    z = embeddings(m, d).requires_grad_()
    for anchors in (slice(120, 120 + n_a), torch.randperm(m)[:n_a]):
        with LargestOutput() as probe:  # default chunk budget: one chunk of all n_a anchor rows
            nt_xent(z, 0.1, anchors=anchors, backend="torch").backward()
        assert n_a * m <= probe.largest <= max(n_a * m, m * d)


def test_rejects_bad_anchors():
    z = embeddings(12, 8)
    for bad, err in [(slice(0, 12, 2), ValueError), (slice(5, 5), ValueError),
                     (torch.tensor([0, 12]), ValueError), (torch.tensor([3, 1, 3]), ValueError),
                     (torch.tensor([-1, 2]), ValueError), (torch.tensor([1.0, 2.0]), ValueError),
                     (torch.ones(12, dtype=torch.bool), ValueError),
                     (torch.tensor([], dtype=torch.long), ValueError),
                     (torch.tensor([[1, 2]]), ValueError), ([1, 2], TypeError)]:
        with pytest.raises(err):
            nt_xent(z, 0.1, anchors=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("anchors", [slice(1500, 3100), "index"])
def test_gpu_local_anchors_match_reference(anchors, dtype):
    m, d = 4231, 128
    z = embeddings(m, d, dtype, "cuda")
    labels = torch.arange(m, device="cuda") % (m // 3 + 1)
    if anchors == "index":
        anchors = torch.randperm(m, device="cuda")[:1777]
    loss, grad = loss_and_grad(nt_xent, z, temperature=0.07, labels=labels, anchors=anchors,
                               backend="triton")
    ref_loss, ref_grad = loss_and_grad(local_ref, z.cpu(), temperature=0.07, labels=labels.cpu(),
                                       rows=anchors.cpu() if torch.is_tensor(anchors) else anchors)
    tol = 5e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert rel_err(grad.cpu(), ref_grad) < tol

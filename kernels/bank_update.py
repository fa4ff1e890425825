# In-place momentum update of a memory bank (n, d), d <= 256 for Triton, from a batch x (B, d):
#   bank[i] = normalize(m * bank[i] + (1 - m) * mean{x_b : idx_b == i})   for each distinct i in idx
# (InstDisc / CMC memory banks, n up to ~1.28M). Duplicated indices in a batch are averaged and the
# row is updated once; CMC's index_copy_ would keep an arbitrary one of them. Rows are normalised
# like F.normalize (norm clamped at 1e-12). Work and memory are O(B d) whatever n is.
#
# Not fused into bank_nce's kernel on purpose: a row updated here may be another query's negative
# there, so every gather of the old row must finish before any write; a second launch is that
# grid-wide barrier. The launch costs microseconds next to the K-row gathers.
#
# Duplicates without a host sync: idx is sorted, and each sorted position learns where its run of
# equal indices starts and ends (searchsorted). The program at the start of a run averages the run
# and writes the row; the others exit. So exactly one program writes each row and there are no
# atomics.
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _backend
from ._backend import triton_kernel


# Single config: the kernel writes its input in place, so it must not be autotuned (re-launched).
@triton_kernel(configs=[triton.Config({}, num_warps=1, num_stages=1)], key=[], cpu_config={})
def _bank_update_kernel(bank_ptr, x_ptr, sorted_idx_ptr, order_ptr, run_start_ptr, run_end_ptr, D,
                        stride_b, stride_x, momentum, BLOCK_D: tl.constexpr):
    p = tl.program_id(0)
    start = tl.load(run_start_ptr + p)
    if start == p:
        end = tl.load(run_end_ptr + p)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        acc = tl.zeros([BLOCK_D], tl.float32)
        for r in range(start, end):
            src = tl.load(order_ptr + r).to(tl.int64)
            acc += tl.load(x_ptr + src * stride_x + offs_d, mask=dmask, other=0.0).to(tl.float32)
        mean = acc / (end - start).to(tl.float32)
        row = tl.load(sorted_idx_ptr + p).to(tl.int64)
        old = tl.load(bank_ptr + row * stride_b + offs_d, mask=dmask, other=0.0).to(tl.float32)
        new = momentum * old + (1.0 - momentum) * mean
        norm = tl.maximum(tl.sqrt(tl.sum(new * new, 0)), 1e-12)
        # fp32 -> bf16 rounds to nearest even on GPU; the triton 3.9 interpreter truncates (1 ulp).
        tl.store(bank_ptr + row * stride_b + offs_d, (new / norm).to(bank_ptr.dtype.element_ty),
                 mask=dmask)


def _update_triton(bank, idx, x, momentum):
    sorted_idx, order = torch.sort(idx)
    run_start = torch.searchsorted(sorted_idx, sorted_idx, right=False)
    run_end = torch.searchsorted(sorted_idx, sorted_idx, right=True)
    D = bank.shape[1]
    _bank_update_kernel((idx.shape[0],), bank, x, sorted_idx, order, run_start, run_end, D,
                        bank.stride(0), x.stride(0), float(momentum),
                        BLOCK_D=max(16, triton.next_power_of_2(D)), device_tensor=bank)


def _update_torch(bank, idx, x, momentum):
    ct = _backend.compute_dtype(bank, x)
    rows, inverse = torch.unique(idx, return_inverse=True)
    sums = torch.zeros(rows.shape[0], x.shape[1], device=x.device, dtype=ct)
    sums.index_add_(0, inverse, x.to(ct))
    mean = sums / torch.bincount(inverse, minlength=rows.shape[0]).to(ct)[:, None]
    new = momentum * bank[rows].to(ct) + (1.0 - momentum) * mean
    bank[rows] = F.normalize(new, dim=1).to(bank.dtype)


@_backend.opaque_to_compile
@torch.no_grad()
def bank_update(bank: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, momentum: float, *,
                backend: str = "auto") -> None:
    """In place: bank[i] = normalize(m * bank[i] + (1 - m) * mean of x rows with idx == i).

    bank (n, d) fp32/bf16 (a persistent buffer), idx (B,) valid row indices (duplicates allowed,
    averaged), x (B, d) new features (no gradient is taken). Computation is in fp32 (fp64 for an
    fp64 bank on the torch path). backend: "auto" (Triton on CUDA, torch on CPU), "triton"
    (interpreter on CPU), "torch".
    """
    if bank.dim() != 2 or x.dim() != 2 or x.shape[1] != bank.shape[1]:
        raise ValueError(f"bank (n, d) and x (B, d) expected, got {tuple(bank.shape)}, "
                         f"{tuple(x.shape)}")
    if idx.shape != (x.shape[0],):
        raise ValueError(f"idx must be ({x.shape[0]},), got {tuple(idx.shape)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if idx.numel() == 0:
        return
    if _backend.use_triton(backend, bank, idx, x):
        _backend.check_triton_inputs(bank.shape[1], bank, x)
        if bank.stride(1) != 1:
            raise ValueError("bank must have unit stride along d to be updated in place")
        _update_triton(bank, idx.contiguous(), x.detach().contiguous(), momentum)
    else:
        _update_torch(bank, idx, x.detach(), momentum)


def bank_update_ref(bank: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, momentum: float, *,
                    upcast: bool = False) -> torch.Tensor:
    """Out-of-place reference, one distinct index at a time; `upcast` computes in float64."""
    out = bank.double() if upcast else bank.clone()
    xs = x.double() if upcast else x.to(out.dtype)
    for i in torch.unique(idx).tolist():
        mean = xs[idx == i].mean(0)
        out[i] = F.normalize(momentum * out[i] + (1 - momentum) * mean, dim=0)
    return out

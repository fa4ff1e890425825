# InfoNCE with negatives restricted to a window of similarity ranks (Wu et al., "On Mutual
# Information in Contrastive Learning for Visual Representations": Ring and Ball negatives).
#   s+_i = q_i . k_i / T,   s_ij = q_i . c_j / T over K candidates c (a bank, a queue, in-batch keys)
#   rank the K scores of row i in descending order (rank 0 = most similar); the negatives of row i
#   are the candidates of rank r with floor(lower K) <= r < floor(upper K): lower = 0 is the Ball,
#   lower > 0 the Ring, (0, 1) plain InfoNCE over every candidate.
#   loss_i = logsumexp({s+_i} U {s_ij : j a negative of i}) - s+_i,   loss = mean_i loss_i
#
# The window is a pair of per-row thresholds on the scores: with the scores sorted descending as
# v_0 >= v_1 >= ..., row i keeps the s with v_{hi-1} <= s (hi-1 is the last rank in the window) and
# s < v_{lo-1} (lo-1 the last rank above it; +inf when lo = 0). For distinct scores that is exactly
# the ranks lo..hi-1. Only the 2N thresholds and N LSEs are kept for backward, which recomputes the
# logits chunk by chunk with the same code (identical values, hence identical windows) and applies
#   dq_i = (1/T) [sum_{j in W_i} p_ij c_j + (p+_i - 1) k_i],   dk_i = (1/T) (p+_i - 1) q_i,
#   dc_j = (1/T) sum_i p_ij q_i  (only when the candidates require grad: in-batch use),
# with p over {+} U W_i and every row weighted by grad / N. The selection itself is constant.
#
# This file holds the chunked torch path (order statistics by torch.kthvalue on row chunks of at
# most CHUNK_ELEMS logits: no N x K matrix, memory O(CHUNK + (N + K) d)) and the sort-based
# float64 reference. The Triton kernels (a radix-select pass over the score bits, then the
# info_nce passes with the window mask) are the next step of the issue: backend="triton" says so.
from __future__ import annotations

import math

import torch

from . import _backend


def window(k: int, lower: float, upper: float) -> tuple[int, int]:
    """The rank window [lo, hi) of K candidates for fractions lower < upper in [0, 1]."""
    if not (0.0 <= lower < upper <= 1.0) or not (math.isfinite(lower) and math.isfinite(upper)):
        raise ValueError(f"need 0 <= lower < upper <= 1, got lower={lower}, upper={upper}")
    lo, hi = math.floor(lower * k), math.floor(upper * k)
    return lo, hi


def _thresholds(s: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inclusive lower bound v_{hi-1}, exclusive upper bound v_{lo-1}) of each row of s (r, K)."""
    # The hi largest (unsorted), then within them: their minimum is rank hi-1, and rank lo-1 is the
    # (hi - lo + 1)-th smallest of them. 2.8x faster than two kthvalue calls over all K (measured on a
    # 64 x 65,536 chunk, 1 thread: 40 vs 113 ms) and as exact.
    top = torch.topk(s, hi, dim=1, sorted=False).values
    low = top.min(1).values
    if lo == 0:
        high = torch.full_like(low, float("inf"))
    else:
        high = torch.kthvalue(top, hi - lo + 1, dim=1).values
    return low, high


def _chunks(n: int, k: int):
    step = _backend.rows_per_chunk(k)
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _masked(s: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """s with everything outside each row's window at -inf."""
    keep = (s >= low[:, None]) & (s < high[:, None])
    return s.masked_fill_(~keep, float("-inf"))


class _RingNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, c, temperature, lo, hi, dot_dt):
        ctx.in_dtypes = (q.dtype, k.dtype, c.dtype)
        with _backend.no_autocast(q.device):
            # operands rounded once per the kernels' precision contract (_backend.dot_dtype), the
            # dots accumulated in fp32: the ranks are those of the rounded operands' scores
            q, k, c = (t.detach().to(dot_dt) for t in (q, k, c))
            ct = _backend.compute_dtype(q, k, c)
            qs, kc, cc = q.to(ct) / temperature, k.to(ct), c.to(ct)
            s_pos = (qs * kc).sum(1)
            n = q.shape[0]
            lse = torch.empty(n, device=q.device, dtype=ct)
            low = torch.empty(n, device=q.device, dtype=ct)
            high = torch.empty(n, device=q.device, dtype=ct)
            for r0, r1 in _chunks(n, c.shape[0]):
                s = qs[r0:r1] @ cc.T
                low[r0:r1], high[r0:r1] = _thresholds(s, lo, hi)
                s = _masked(s, low[r0:r1], high[r0:r1])
                lse[r0:r1] = torch.logaddexp(torch.logsumexp(s, 1), s_pos[r0:r1])
        ctx.save_for_backward(q, k, c, lse, s_pos, low, high)
        ctx.temperature = temperature
        return (lse - s_pos).mean()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, c, lse, s_pos, low, high = ctx.saved_tensors
        temperature = ctx.temperature
        need_c = ctx.needs_input_grad[2]
        with _backend.no_autocast(q.device):
            ct = lse.dtype
            qc, kc, cc = q.to(ct), k.to(ct), c.to(ct)
            qs = qc / temperature
            n = q.shape[0]
            a = torch.empty_like(qc)
            dc = torch.zeros_like(cc) if need_c else None
            for r0, r1 in _chunks(n, c.shape[0]):
                s = _masked(qs[r0:r1] @ cc.T, low[r0:r1], high[r0:r1])  # the forward's logits
                p = s.sub_(lse[r0:r1, None]).exp_()
                a[r0:r1] = p @ cc
                if need_c:
                    dc += p.T @ qc[r0:r1]
            scale = grad_out / (n * temperature)
            w = (torch.exp(s_pos - lse) - 1.0)[:, None]
            dq = scale * (a + w * kc)
            dk = scale * w * qc
            if need_c:
                dc = scale * dc
        q_dt, k_dt, c_dt = ctx.in_dtypes
        return (dq.to(q_dt), dk.to(k_dt), None if dc is None else dc.to(c_dt), None, None, None, None)


@_backend.opaque_to_compile
def ring_nce(q: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, temperature: float,
             lower: float = 0.0, upper: float = 1.0, *, precision: str = "auto",
             backend: str = "auto") -> torch.Tensor:
    """InfoNCE of queries q (N, d) against their keys k (N, d) with, per row, the negatives of
    similarity rank floor(lower K) <= r < floor(upper K) among the K candidates (K, d) (rank 0 the
    most similar): the Ball (lower = 0), the Ring (lower > 0), plain InfoNCE at (0, 1). Returns
    the mean loss, a 0-dim float32 tensor (float64 for float64 inputs). Gradients reach q, k and
    the candidates when they require grad (in-batch candidates); the selection is constant. Inputs
    are used as given (normalise them first for cosine similarity). The window is exact for distinct
    scores; tied scores at a boundary are all kept or all left out together.
    precision: the dot operands' precision, as for the other kernels (kernels._backend.dot_dtype):
    "auto" rounds fp32 inputs to bf16 under torch.autocast.
    backend: "auto" / "torch" (the chunked torch path, any device); "triton" is not written yet.
    """
    if q.dim() != 2 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (N, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if candidates.dim() != 2 or candidates.shape[1] != q.shape[1] or candidates.shape[0] < 1:
        raise ValueError(f"candidates must be (K >= 1, {q.shape[1]}), got {tuple(candidates.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if backend not in _backend.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_backend.BACKENDS}")
    if backend == "triton":
        raise NotImplementedError("ring_nce has no Triton kernel yet; use backend='torch' (or 'auto')")
    lo, hi = window(candidates.shape[0], lower, upper)
    if hi <= lo:
        raise ValueError(f"the window [{lower}, {upper}) of {candidates.shape[0]} candidates holds no rank "
                         f"(floor gives [{lo}, {hi}))")
    dot_dt, _ = _backend.dot_dtype(precision, q, k, candidates)
    return _RingNCE.apply(q, k, candidates, float(temperature), lo, hi, dot_dt)


def ring_nce_ref(q: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, temperature: float,
                 lower: float = 0.0, upper: float = 1.0, *, upcast: bool = False) -> torch.Tensor:
    """Plain torch: the N x K logits, a full sort per row, the window by rank; `upcast`: float64."""
    if upcast:
        q, k, candidates = q.double(), k.double(), candidates.double()
    K = candidates.shape[0]
    lo, hi = window(K, lower, upper)
    s = q @ candidates.T / temperature
    order = torch.argsort(s, dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(K, device=s.device).expand_as(order).contiguous())
    keep = (ranks >= lo) & (ranks < hi)
    s_pos = (q * k).sum(1) / temperature
    logits = torch.cat([s_pos[:, None], s.masked_fill(~keep, float("-inf"))], 1)
    return (torch.logsumexp(logits, 1) - s_pos).mean()

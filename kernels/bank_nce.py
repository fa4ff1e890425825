# Memory-bank contrastive losses (InstDisc, CMC) for queries q (B, d), d <= 256 for Triton, scored
# against rows of a bank (n, d) (up to ~1.28M x 128): row i scores the positive bank[pos_idx[i]]
# and K negatives bank[neg_idx[i, :]], s_ij = q_i . bank[idx_ij] / T, meant for B up to a few
# thousand and K up to ~64k.
#   mode="softmax": cross-entropy over [s_i0, s_i1..s_iK] with target 0
#   mode="nce":     CMC's NCECriterion on P = exp(s) / Z with uniform noise Pn = 1/n:
#                   loss = -(sum_i log(P_i0 / (P_i0 + K Pn + eps))
#                            + sum_ij log(K Pn / (P_ij + K Pn + eps))) / B,   eps = 1e-7
# CMC's index_select + bmm copies the B x (K+1) x d gathered rows (~2 GB at B=256, K=16384); here
# each program gathers BLOCK_K bank rows straight into registers, dots them with q_i and throws them
# away. The loss gradient w.r.t. q is a weighted sum of the same gathered rows, so the forward pass
# accumulates it on the fly (flash-attention-forward style for softmax, a plain sum for nce): the
# bank is read once, backward is a scale of the saved (B, d) gradient, and the bank gets no grad.
# K is split across programs for parallelism; the per-split (LSE or loss, weighted row sum) partials
# are merged in torch, O(B * splits * d). The positive column is an O(B d) gather done in torch.
#
# NCE normalisation: as in CMC's NCEAverage, Z is a constant. If Z is None it is estimated once from
# the current batch as mean(exp(s)) * n (over all B x (K+1) scores, computed as a logsumexp so it
# cannot overflow at small T) and returned; the caller keeps it (e.g. in a persistent buffer) and
# passes it back on later steps. No gradient flows through Z.
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _backend
from ._backend import triton_kernel

NCE_EPS = 1e-7  # CMC NCECriterion's eps

_SOFTMAX, _NCE, _LSE_ONLY = 0, 1, 2

_CONFIGS = [
    triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bk, w, s in [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 2), (128, 4, 3), (32, 8, 3),
                     (16, 4, 3)]
]
# A program holds a (BLOCK_K x BLOCK_D) fp32 tile of gathered rows; at 64 elements per thread the
# NCE backward variant spilled 156-164 B (sm_90 compiles, tests/test_kernels_backend.py), so tiles
# stay at <= 32 per thread: wide rows get the narrower ones.
_MAX_TILE_PER_THREAD = 32


def _admit(cfg, constexprs, elem):
    per_thread = cfg.kwargs["BLOCK_K"] * constexprs["BLOCK_D"] // (32 * cfg.num_warps)
    return per_thread <= _MAX_TILE_PER_THREAD


_CPU_CONFIG = {"BLOCK_K": 32}
_CPU_SPLITS = 3  # interpreter: exercise the cross-split merge on small K


@triton_kernel(configs=_CONFIGS, key=["K", "D"], cpu_config=_CPU_CONFIG, admit=_admit)
def _bank_scores_kernel(q_ptr, bank_ptr, idx_ptr, logz_ptr, part_ptr, acc_ptr, K, D, stride_q,
                        stride_b, stride_idx, stride_pb, stride_ab, stride_as, k_per_split, inv_t,
                        log_c, log_c_eps, MODE: tl.constexpr, NEED_GRAD: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program = (row i, split s): scores q_i against bank[idx[i, k]] for k in the split.

    MODE 0 (softmax): part = LSE over the split, acc = softmax-within-split weighted row sum.
    MODE 1 (nce):     part = sum of negative NCE losses, acc = sum of dloss/dy_k * bank row.
    MODE 2:           part = LSE over the split (estimating Z); acc untouched.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + row * stride_q + offs_d, mask=dmask, other=0.0).to(tl.float32)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    log2e = 1.4426950408889634
    scale2 = inv_t * log2e

    acc = tl.zeros([BLOCK_D], tl.float32)
    m_i = tl.max(tl.full([BLOCK_K], float("-inf"), tl.float32), 0)  # scalar running max (base 2)
    l_i = tl.sum(tl.zeros([BLOCK_K], tl.float32), 0)  # scalar running sum, or loss sum for nce
    if MODE == 1:
        logz = tl.load(logz_ptr)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_hi
        # int64 row offsets: 1.28M x 128 rows overflow int32 byte offsets in wider dtypes.
        idx = tl.load(idx_ptr + row.to(tl.int64) * stride_idx + ks, mask=kmask, other=0)
        b = tl.load(bank_ptr + idx.to(tl.int64)[:, None] * stride_b + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(b * q[None, :], 1)
        if MODE == 1:
            # y = log P = s/T - log Z;  -log D0 = log(c+eps) - log c + softplus(y - log(c+eps))
            t = s * inv_t - logz - log_c_eps
            softplus = tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t)))
            l_i += tl.sum(tl.where(kmask, log_c_eps - log_c + softplus, 0.0), 0)
            if NEED_GRAD:
                w = tl.where(kmask, 1.0 / (1.0 + tl.exp(-t)), 0.0)  # d(-log D0)/dy = sigmoid(t)
                acc += tl.sum(w[:, None] * b, 0)
        else:
            s2 = tl.where(kmask, s * scale2, float("-inf"))
            # Each tile has at least one real column, so m_new is finite from the first tile on.
            m_new = tl.maximum(m_i, tl.max(s2, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s2 - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            if MODE == 0 and NEED_GRAD:
                acc = acc * alpha + tl.sum(p[:, None] * b, 0)
            m_i = m_new

    part_off = row * stride_pb + split
    if MODE == 1:
        tl.store(part_ptr + part_off, l_i)
    else:
        tl.store(part_ptr + part_off, (m_i + tl.log2(l_i)) * 0.6931471805599453)
        acc = acc / l_i
    if NEED_GRAD and MODE != 2:
        tl.store(acc_ptr + row * stride_ab + split * stride_as + offs_d, acc, mask=dmask)


def _num_splits(B, K, device):
    if _backend.interpreted(torch.empty(0, device=device)):
        return min(_CPU_SPLITS, K)
    # Enough (row, split) programs to keep every SM streaming gathers: ~8 per SM, >= 256 keys each.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(K, 256), triton.cdiv(8 * sms, B)))


def _partials_triton(q, bank, neg_idx, temperature, mode, logz, need_grad, consts):
    B, D = q.shape
    K = neg_idx.shape[1]
    n_split = _num_splits(B, K, q.device)
    k_per_split = triton.cdiv(K, n_split)
    n_split = triton.cdiv(K, k_per_split)  # no empty split
    part = torch.empty(B, n_split, device=q.device, dtype=torch.float32)
    acc = (torch.empty(B, n_split, D, device=q.device, dtype=torch.float32) if need_grad
           else part)  # placeholder pointer, never written when NEED_GRAD is False
    _bank_scores_kernel(
        (B, n_split), q, bank, neg_idx, part if logz is None else logz, part, acc, K, D,
        q.stride(0), bank.stride(0), neg_idx.stride(0), part.stride(0),
        acc.stride(0) if need_grad else 0, acc.stride(1) if need_grad else 0, k_per_split,
        1.0 / temperature, consts[0], consts[1], MODE=mode, NEED_GRAD=need_grad,
        BLOCK_D=max(16, triton.next_power_of_2(D)), device_tensor=q)
    return part, (acc if need_grad else None)


def _partials_torch(q, bank, neg_idx, temperature, mode, logz, need_grad, consts):
    """Same partials as the kernel with one merged split, chunked over rows and K."""
    ct = _backend.compute_dtype(q, bank)
    qc = q.to(ct)
    B, D = q.shape
    K = neg_idx.shape[1]
    k_step = min(K, max(1, _backend.CHUNK_ELEMS // D))
    r_step = max(1, _backend.CHUNK_ELEMS // (k_step * D))
    part = torch.empty(B, 1, device=q.device, dtype=ct)
    acc = torch.zeros(B, 1, D, device=q.device, dtype=ct) if need_grad else None
    log_c, log_c_eps = consts
    for r0 in range(0, B, r_step):
        r1 = min(B, r0 + r_step)
        run = torch.full((r1 - r0,), float("-inf") if mode != _NCE else 0.0, device=q.device,
                         dtype=ct)
        run_acc = torch.zeros(r1 - r0, D, device=q.device, dtype=ct)
        for k0 in range(0, K, k_step):
            idx = neg_idx[r0:r1, k0:k0 + k_step]
            rows = torch.index_select(bank, 0, idx.reshape(-1)).view(*idx.shape, D).to(ct)
            s = torch.einsum("rkd,rd->rk", rows, qc[r0:r1]) / temperature
            if mode == _NCE:
                t = s - logz.to(ct) - log_c_eps
                run += (log_c_eps - log_c + F.softplus(t)).sum(1)
                if need_grad:
                    run_acc += torch.bmm(torch.sigmoid(t)[:, None, :], rows)[:, 0]
            else:
                lse = torch.logsumexp(s, 1)
                new = torch.logaddexp(run, lse)
                if need_grad and mode == _SOFTMAX:
                    p = torch.exp(s - new[:, None])
                    run_acc = (run_acc * torch.exp(run - new)[:, None]
                               + torch.bmm(p[:, None, :], rows)[:, 0])
                run = new
        part[r0:r1, 0] = run
        if need_grad:
            acc[r0:r1, 0] = run_acc
    return part, acc


def _nce_consts(K, n_data):
    log_c = math.log(K / n_data)  # K * Pn
    return log_c, math.log(K / n_data + NCE_EPS)


class _BankNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, bank, pos_idx, neg_idx, logz, temperature, mode, triton_path):
        with _backend.no_autocast(q.device):
            return _BankNCE._forward(ctx, q, bank, pos_idx, neg_idx, logz, temperature, mode,
                                     triton_path)

    @staticmethod
    def _forward(ctx, q, bank, pos_idx, neg_idx, logz, temperature, mode, triton_path):
        need_grad = ctx.needs_input_grad[0]
        B, K = neg_idx.shape
        consts = _nce_consts(K, bank.shape[0])
        partials = _partials_triton if triton_path else _partials_torch
        part, acc = partials(q, bank, neg_idx, temperature, mode, logz, need_grad, consts)
        ct = part.dtype
        pos_rows = bank[pos_idx].to(ct)
        s0 = (q.to(ct) * pos_rows).sum(1) / temperature
        if mode == _SOFTMAX:
            lse = torch.logsumexp(torch.cat([s0[:, None], part], 1), 1)
            loss = (lse - s0).mean()
            if need_grad:
                # Splits were each normalised by their own sum; reweight by their share of the total.
                w = torch.exp(part - lse[:, None])
                grad = (w[:, :, None] * acc).sum(1) + (torch.exp(s0 - lse) - 1.0)[:, None] * pos_rows
        else:
            t0 = s0 - logz.to(ct) - consts[1]
            loss = (part.sum() + F.softplus(-t0).sum()) / B  # -log D1 = softplus(log(c+eps) - y0)
            if need_grad:
                grad = acc.sum(1) - torch.sigmoid(-t0)[:, None] * pos_rows
        if need_grad:
            ctx.save_for_backward(grad * (1.0 / (B * temperature)))
            ctx.q_dtype = q.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (dq,) = ctx.saved_tensors
        return (grad_out * dq).to(ctx.q_dtype), *[None] * 7


class BankNCEOutput(NamedTuple):
    loss: torch.Tensor
    Z: torch.Tensor | None  # nce: the normalisation constant used (0-dim float32); softmax: None


def _estimate_logz(q, bank, pos_idx, neg_idx, temperature, triton_path):
    with _backend.no_autocast(q.device):
        return _estimate_logz_fp32(q, bank, pos_idx, neg_idx, temperature, triton_path)


def _estimate_logz_fp32(q, bank, pos_idx, neg_idx, temperature, triton_path):
    partials = _partials_triton if triton_path else _partials_torch
    part, _ = partials(q, bank, neg_idx, temperature, _LSE_ONLY, None, False, (0.0, 0.0))
    ct = part.dtype
    s0 = (q.to(ct) * bank[pos_idx].to(ct)).sum(1) / temperature
    lse_all = torch.logsumexp(torch.cat([s0, part.flatten()]), 0)
    n_scores = neg_idx.shape[0] * (neg_idx.shape[1] + 1)
    return lse_all - math.log(n_scores) + math.log(bank.shape[0])  # log(mean(exp(s)) * n)


@_backend.opaque_to_compile
def bank_nce(q: torch.Tensor, bank: torch.Tensor, pos_idx: torch.Tensor, neg_idx: torch.Tensor,
             temperature: float, mode: str = "softmax", Z: float | torch.Tensor | None = None, *,
             backend: str = "auto") -> BankNCEOutput:
    """Memory-bank InfoNCE / NCE loss without materialising the B x K x d gathered rows.

    q (B, d) gets the gradient; bank (n, d) is a buffer (no gradient, update it afterwards with
    bank_update); pos_idx (B,) and neg_idx (B, K) index bank rows. mode "softmax" is cross-entropy
    with the positive as target; "nce" is CMC's NCECriterion with P = exp(s/T) / Z. In nce mode pass
    the Z returned by the first call (Z=None estimates it from this batch, as CMC does once).
    Returns BankNCEOutput(loss, Z); loss is a float32 scalar (float64 for float64 torch-path inputs).
    Precision: no matrix unit is involved (each score is a gathered row's dot with q_i, a memory-
    bound loop), so q and the bank are read in their own dtypes and every product and sum is fp32,
    under autocast too (the torch path switches autocast off, as the kernel ignores it).
    backend: "auto" (Triton on CUDA, chunked torch on CPU), "triton" (interpreter on CPU), "torch".
    """
    if mode not in ("softmax", "nce"):
        raise ValueError(f"mode must be 'softmax' or 'nce', got {mode!r}")
    if q.dim() != 2 or bank.dim() != 2 or bank.shape[1] != q.shape[1]:
        raise ValueError(f"q (B, d) and bank (n, d) expected, got {tuple(q.shape)}, "
                         f"{tuple(bank.shape)}")
    B = q.shape[0]
    if pos_idx.shape != (B,) or neg_idx.dim() != 2 or neg_idx.shape[0] != B or neg_idx.shape[1] < 1:
        raise ValueError(f"pos_idx must be ({B},) and neg_idx ({B}, K>=1), got "
                         f"{tuple(pos_idx.shape)}, {tuple(neg_idx.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    triton_path = _backend.use_triton(backend, q, bank, pos_idx, neg_idx)
    bank = bank.detach()
    if triton_path:
        _backend.check_triton_inputs(q.shape[1], q, bank)
        q = q if q.stride(1) == 1 else q.contiguous()
        bank = bank if bank.stride(1) == 1 else bank.contiguous()
        neg_idx = neg_idx if neg_idx.stride(1) == 1 else neg_idx.contiguous()
    temperature = float(temperature)
    if mode == "softmax":
        return BankNCEOutput(_BankNCE.apply(q, bank, pos_idx, neg_idx, None, temperature,
                                            _SOFTMAX, triton_path), None)
    with torch.no_grad():
        if Z is None:
            logz = _estimate_logz(q.detach(), bank, pos_idx, neg_idx, temperature, triton_path)
            Z = logz.double().exp().float()
        else:
            # Returned as given (no exp(log) round trip), so a caller storing it never drifts.
            Z = torch.as_tensor(Z, device=q.device, dtype=torch.float32).clone()
            logz = Z.double().log()
        logz = logz.to(torch.float32 if triton_path else _backend.compute_dtype(q, bank)).reshape(1)
    loss = _BankNCE.apply(q, bank, pos_idx, neg_idx, logz, temperature, _NCE, triton_path)
    return BankNCEOutput(loss, Z.reshape(()))


def bank_nce_ref(q: torch.Tensor, bank: torch.Tensor, pos_idx: torch.Tensor, neg_idx: torch.Tensor,
                 temperature: float, mode: str = "softmax", Z: float | torch.Tensor | None = None, *,
                 upcast: bool = False) -> BankNCEOutput:
    """CMC's computation: index_select + bmm over B x (K+1) x d gathered rows, exp / Z, then
    NCECriterion (or cross-entropy). `upcast` computes in float64."""
    if upcast:
        q, bank = q.double(), bank.double()
    B, d = q.shape
    idx = torch.cat([pos_idx[:, None], neg_idx], 1)
    weight = torch.index_select(bank.detach(), 0, idx.reshape(-1)).view(B, -1, d)
    s = torch.bmm(weight, q.view(B, d, 1)).squeeze(2) / temperature
    if mode == "softmax":
        target = torch.zeros(B, dtype=torch.long, device=q.device)
        return BankNCEOutput(F.cross_entropy(s, target), None)
    out = torch.exp(s)
    if Z is None:
        Z = (out.mean() * bank.shape[0]).detach()
    P = out / Z
    K = neg_idx.shape[1]
    Pn = 1.0 / bank.shape[0]
    log_d1 = torch.log(P[:, 0] / (P[:, 0] + K * Pn + NCE_EPS))
    log_d0 = torch.log((K * Pn) / (P[:, 1:] + K * Pn + NCE_EPS))
    loss = -(log_d1.sum() + log_d0.sum()) / B
    return BankNCEOutput(loss, torch.as_tensor(Z).reshape(()))

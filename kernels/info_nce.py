# InfoNCE between queries q (N, d) and keys k (N, d), d <= 256 for Triton, two layouts:
#   with a queue (K, d)  (MoCo / InfoMin): logits_i = [q_i.k_i, q_i.queue_j for j < K] / T, target 0
#   without a queue (in-batch, CLIP-style one direction): logits_ij = q_i.k_j / T, target i
#   loss = mean_i (LSE_i - s_i,pos)
# Meant for N up to ~64k and K up to ~64k. The logits against the "column matrix" C (queue, or k when
# there is no queue) are streamed in tiles with an online logsumexp; only LSE_i is saved. The
# positive logit q_i.k_i is an O(N d) rowwise dot done in torch and enters the queue-case LSE as the
# initial running value. Backward recomputes the tiles:
#   A = softmax(q C^T / T) C  (row pass)     B = softmax(q C^T / T)^T q  (column pass, no-queue only)
#   queue:    dq = g/T (A + (p_pos - 1) k),  dk = g/T (p_pos - 1) q,  queue gets no gradient
#   no queue: dq = g/T (A - k),              dk = g/T (B - q)
# with g = grad / N and p_pos = exp(s_pos - LSE). The column pass re-walks rows per column block
# instead of scattering with atomics, so results are deterministic.
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _backend
from ._backend import triton_kernel

_LOG2E = 1.0 / math.log(2.0)

_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32}


@triton_kernel(configs=_backend.DOT_CONFIGS, admit=_backend.admit_dot("lse"), key=["N", "NC", "D"],
               cpu_config=_CPU_CONFIG)
def _lse_kernel(q_ptr, c_ptr, spos_ptr, lse_ptr, N, NC, D, stride_q, stride_c, scale2,
                HAS_POS: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """LSE_i over [s_pos_i (if HAS_POS), q_i.c_j / T for all j], natural log."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < N
    dmask = offs_d < D
    a = tl.load(q_ptr + rows[:, None] * stride_q + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # the interpreter has no bf16 dot
        a = a.to(tl.float32)
    log2e = 1.4426950408889634
    if HAS_POS:
        # Seed the running max/sum with the positive logit: m = s_pos, l = exp2(0) = 1.
        m_i = tl.load(spos_ptr + rows, mask=rmask, other=0.0) * log2e
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, NC, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        b = tl.load(c_ptr + cols[:, None] * stride_c + offs_d[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        s = tl.where(cmask[None, :], s, float("-inf"))
        # Every tile has at least one real column, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)


@triton_kernel(configs=_backend.DOT_CONFIGS, admit=_backend.admit_dot("acc"), key=["N", "NC", "D"],
               cpu_config=_CPU_CONFIG)
def _softmax_c_kernel(q_ptr, c_ptr, lse_ptr, out_ptr, N, NC, D, stride_q, stride_c, stride_o,
                      scale2, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out_i = sum_j softmax_ij c_j  (row pass; softmax_ij = exp(q_i.c_j / T - LSE_i))."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < N
    dmask = offs_d < D
    a = tl.load(q_ptr + rows[:, None] * stride_q + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NC, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        b = tl.load(c_ptr + cols[:, None] * stride_c + offs_d[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        p = tl.where(cmask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        acc += tl.dot(p.to(b.dtype), b, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_o + offs_d[None, :], acc,
             mask=rmask[:, None] & dmask[None, :])


@triton_kernel(configs=_backend.DOT_CONFIGS, admit=_backend.admit_dot("acc"), key=["N", "NC", "D"],
               cpu_config=_CPU_CONFIG)
def _softmax_t_q_kernel(q_ptr, c_ptr, lse_ptr, out_ptr, N, NC, D, stride_q, stride_c, stride_o,
                        scale2, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out_j = sum_i softmax_ij q_i  (column pass: program = BLOCK_M columns, loop over q rows)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cmask = cols < NC
    dmask = offs_d < D
    b = tl.load(c_ptr + cols[:, None] * stride_c + offs_d[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        rmask = rows < N
        a = tl.load(q_ptr + rows[:, None] * stride_q + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
        s_t = tl.dot(b, tl.trans(a), input_precision=PRECISION) * scale2  # (cols, rows)
        p_t = tl.where(rmask[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
        acc += tl.dot(p_t.to(a.dtype), a, input_precision=PRECISION)
    tl.store(out_ptr + cols[:, None] * stride_o + offs_d[None, :], acc,
             mask=cmask[:, None] & dmask[None, :])


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)


def _lse_triton(q, c, s_pos, temperature, precision):
    N, D = q.shape
    lse = torch.empty(N, device=q.device, dtype=torch.float32)
    has_pos = s_pos is not None
    _lse_kernel(_grid(N), q, c, s_pos if has_pos else lse, lse, N, c.shape[0], D, q.stride(0),
                c.stride(0), _LOG2E / temperature, HAS_POS=has_pos, **_backend.dot_meta(q, precision))
    return lse


def _softmax_c_triton(q, c, lse, temperature, precision):
    N, D = q.shape
    out = torch.empty(N, D, device=q.device, dtype=torch.float32)
    _softmax_c_kernel(_grid(N), q, c, lse, out, N, c.shape[0], D, q.stride(0), c.stride(0),
                      out.stride(0), _LOG2E / temperature, **_backend.dot_meta(q, precision))
    return out


def _softmax_t_q_triton(q, c, lse, temperature, precision):
    N, D = q.shape
    out = torch.empty(c.shape[0], D, device=q.device, dtype=torch.float32)
    _softmax_t_q_kernel(_grid(c.shape[0]), q, c, lse, out, N, c.shape[0], D, q.stride(0),
                        c.stride(0), out.stride(0), _LOG2E / temperature, **_backend.dot_meta(q, precision))
    return out


def _lse_torch(q, c, s_pos, temperature):
    ct = _backend.compute_dtype(q, c)
    qs, cc = q.to(ct) / temperature, c.to(ct)
    lse = torch.empty(q.shape[0], device=q.device, dtype=ct)
    step = _backend.rows_per_chunk(c.shape[0])
    for r0 in range(0, q.shape[0], step):
        lse[r0:r0 + step] = torch.logsumexp(qs[r0:r0 + step] @ cc.T, 1)
    return lse if s_pos is None else torch.logaddexp(lse, s_pos)


def _softmax_grads_torch(q, c, lse, temperature, need_t):
    """(softmax @ c, softmax^T @ q or None), one row chunk of the logits at a time."""
    ct = _backend.compute_dtype(q, c)
    qc, cc = q.to(ct), c.to(ct)
    qs = qc / temperature
    out_c = torch.empty(q.shape, device=q.device, dtype=ct)
    out_t = torch.zeros(c.shape, device=q.device, dtype=ct) if need_t else None
    step = _backend.rows_per_chunk(c.shape[0])
    for r0 in range(0, q.shape[0], step):
        p = (qs[r0:r0 + step] @ cc.T).sub_(lse[r0:r0 + step, None]).exp_()
        out_c[r0:r0 + step] = p @ cc
        if need_t:
            out_t += p.T @ qc[r0:r0 + step]
    return out_c, out_t


class _InfoNCE(torch.autograd.Function):
    # Dtype contract (_backend.dot_dtype): q, k and the queue are rounded to `dot_dt` once, here;
    # every logit (the positive one too) is a fp32-accumulated dot of rounded rows, in forward and
    # backward; gradients come back in the inputs' dtype. Autocast is off inside.
    @staticmethod
    def forward(ctx, q, k, queue, temperature, triton_path, dot_dt, precision, targets=None):
        ctx.in_dtypes = (q.dtype, k.dtype)
        with _backend.no_autocast(q.device):
            q, k = q.detach().to(dot_dt), k.detach().to(dot_dt)
            queue = None if queue is None else queue.to(dot_dt)
            ct = _backend.compute_dtype(q, k)
            kt = k if targets is None else k[targets]
            s_pos = (q.to(ct) * kt.to(ct)).sum(1) / temperature
            c = k if queue is None else queue
            if triton_path:
                lse = _lse_triton(q, c, None if queue is None else s_pos.float(), temperature,
                                  precision)
            else:
                lse = _lse_torch(q, c, None if queue is None else s_pos, temperature)
        ctx.save_for_backward(q, k, queue, lse, s_pos, targets)
        ctx.temperature, ctx.triton_path, ctx.precision = temperature, triton_path, precision
        return (lse - s_pos).mean()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, queue, lse, s_pos, targets = ctx.saved_tensors
        with _backend.no_autocast(q.device):
            dq, dk = _InfoNCE._grads(ctx, q, k, queue, lse, s_pos, grad_out, targets)
        q_dt, k_dt = ctx.in_dtypes
        return dq.to(q_dt), None if dk is None else dk.to(k_dt), None, None, None, None, None, None

    @staticmethod
    def _grads(ctx, q, k, queue, lse, s_pos, grad_out, targets=None):
        temperature = ctx.temperature
        c = k if queue is None else queue
        need_dk = ctx.needs_input_grad[1]
        if ctx.triton_path:
            a = _softmax_c_triton(q, c, lse, temperature, ctx.precision)
            b = (_softmax_t_q_triton(q, c, lse, temperature, ctx.precision)
                 if queue is None and need_dk else None)
        else:
            a, b = _softmax_grads_torch(q, c, lse, temperature, queue is None and need_dk)
        scale = grad_out / (q.shape[0] * temperature)
        ct = a.dtype
        qc, kc = q.to(ct), k.to(ct)
        if queue is None and targets is not None:
            # target j = targets_i: the positive's gradient goes to row targets_i of k (summed over
            # queries sharing a target; index_add_ is deterministic on CPU, atomic on CUDA)
            dq = scale * (a - kc[targets])
            dk = scale * b.index_add_(0, targets, qc, alpha=-1.0) if need_dk else None
        elif queue is None:
            dq = scale * (a - kc)
            dk = scale * (b - qc) if need_dk else None
        else:
            w = (torch.exp(s_pos.to(ct) - lse) - 1.0)[:, None]
            dq = scale * (a + w * kc)
            dk = scale * w * qc
        return dq, dk


@_backend.opaque_to_compile
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, *,
             temperature: float, targets: torch.Tensor | None = None, precision: str = "auto",
             backend: str = "auto") -> torch.Tensor:
    """InfoNCE of queries q (N, d) against keys k (N, d); returns a float32 scalar.

    With `queue` (K, d): MoCo / InfoMin, logits [q_i.k_i, q_i.queue_j] / T with target 0; the queue
    gets no gradient (it is a buffer). Without: in-batch logits q_i.k_j / T with target i.
    `targets` (LongTensor (N,), no queue): k may be (M, d) with any M, the logits are q_i.k_j / T over
    all M rows and the target of query i is row targets_i (CPC: every patch of the batch a candidate).
    Gradients flow to q and k (detach k yourself for a momentum encoder). Inputs are used as given
    (normalise first for cosine similarity).

    Pure function: for data-parallel training pass all-gathered features (gathered with gradients);
    the loss is a plain autograd function of its inputs.
    precision: the dot operands' precision (see kernels._backend.dot_dtype): "auto" rounds fp32
    inputs to bf16 under torch.autocast and otherwise follows torch's float32 matmul precision;
    "ieee", "tf32", "bf16", "fp16" force one. Accumulation is fp32 in every case.
    backend: "auto" (Triton on CUDA, chunked torch on CPU), "triton" (interpreter on CPU), "torch".
    """
    if targets is not None:
        if queue is not None:
            raise ValueError("info_nce: targets= is for the in-batch form (no queue); with a queue the "
                             "target is the positive key k_i")
        if q.dim() != 2 or k.dim() != 2 or k.shape[1] != q.shape[1]:
            raise ValueError(f"with targets, q must be (N, d) and k (M, d), got {tuple(q.shape)} and "
                             f"{tuple(k.shape)}")
        if targets.shape != (q.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be an integer tensor of shape ({q.shape[0]},), got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        targets = targets.to(device=k.device, dtype=torch.long)
        if not targets.is_cuda and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= k.shape[0]):
            # (checked where it costs no device sync; on CUDA an out-of-range index fails the gather)
            raise ValueError(f"targets must lie in [0, {k.shape[0]}), got [{int(targets.min())}, "
                             f"{int(targets.max())}]")
    elif q.dim() != 2 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (N, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue is not None and (queue.dim() != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tensors = (q, k) if queue is None else (q, k, queue)
    triton_path = _backend.use_triton(backend, *tensors)
    if queue is not None:
        queue = queue.detach()
    if triton_path:
        _backend.check_triton_inputs(q.shape[1], *tensors)
        q, k = (t if t.stride(1) == 1 else t.contiguous() for t in (q, k))
        if queue is not None and queue.stride(1) != 1:
            queue = queue.contiguous()
    dot_dt, prec = _backend.dot_dtype(precision, *tensors)
    return _InfoNCE.apply(q, k, queue, float(temperature), triton_path, dot_dt, prec, targets)


def info_nce_ref(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, *,
                 temperature: float, targets: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """Plain-torch InfoNCE that materialises the logits; `upcast` computes in float64."""
    if upcast:
        q, k = q.double(), k.double()
        queue = None if queue is None else queue.double()
    if queue is None:
        logits = q @ k.T / temperature
        target = torch.arange(q.shape[0], device=q.device) if targets is None else targets.long()
    else:
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.detach().T], 1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return torch.nn.functional.cross_entropy(logits, target)

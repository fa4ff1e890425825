# NT-Xent / multi-positive contrastive loss over M = V*N embeddings z (M, d), d <= 256 for Triton:
#   s_ij = z_i . z_j / T,  LSE_i = logsumexp_{j != i} s_ij,  P(i) = {j != i : labels_j == labels_i}
#   loss = mean over anchors with |P(i)| > 0 of  LSE_i - mean_{p in P(i)} s_ip
# V = 2 with default labels is SimCLR's NT-Xent; V > 2 is multi-crop; arbitrary labels give
# SupCon-style positives. Meant for M up to ~64k and d in 64..256.
#
# The M x M logit matrix is never stored. Only the LSE needs all pairs: forward streams column tiles
# with an online logsumexp (flash-attention style) and keeps LSE_i per row. The positive part is
# linear in s, so it goes through per-label feature sums S_g = sum_{labels_j = g} z_j in O(M d):
#   sum_{p in P(i)} s_ip = z_i . (S_{g_i} - z_i) / T,   |P(i)| = |g_i| - 1.
# Backward recomputes each tile for the softmax part. With c_i = dL/dloss_i,
#   dz_i = (1/T) sum_j (c_i p_ij + c_j p_ji) z_j  -  positive part (again via label sums),
# and since s is symmetric a row block forms p_ji for its tile from the column rows' own LSE, so
# one pass over column tiles gives dz with no atomics and no second kernel.
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _backend
from ._backend import triton_kernel

_LOG2E = 1.0 / math.log(2.0)

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3),
                         (128, 32, 4, 3), (64, 32, 4, 4)]
]
# Interpreter: small tiles so that test shapes of a few hundred rows span several programs.
_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32}


@triton_kernel(configs=_CONFIGS, key=["M", "D"], cpu_config=_CPU_CONFIG)
def _nt_xent_fwd_kernel(z_ptr, lse_ptr, M, D, stride_z, scale2, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """LSE_i = logsumexp_{j != i} z_i . z_j / T (natural log) for a block of rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    dmask = offs_d < D
    a = tl.load(z_ptr + rows[:, None] * stride_z + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # the interpreter has no bf16 dot
        a = a.to(tl.float32)

    # Logits are kept in base 2 (scale2 = log2(e) / T) so the exponentials are exp2.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < M
        b = tl.load(z_ptr + cols[:, None] * stride_z + offs_d[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        s = tl.where(cmask[None, :] & (rows[:, None] != cols[None, :]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose tiles so far are all masked (itself only) keeps m = -inf; shift by 0 instead
        # so exp2(-inf - -inf) never produces NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)


@triton_kernel(configs=_CONFIGS, key=["M", "D"], cpu_config=_CPU_CONFIG)
def _nt_xent_bwd_kernel(z_ptr, lse_ptr, coef_ptr, dz_ptr, M, D, stride_z, stride_dz, scale2, inv_t,
                        BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz_i = (1/T) sum_{j != i} (c_i p_ij + c_j p_ji) z_j, the softmax part of the gradient."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    dmask = offs_d < D
    a = tl.load(z_ptr + rows[:, None] * stride_z + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    log2e = 1.4426950408889634
    lse_r = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * log2e
    c_r = tl.load(coef_ptr + rows, mask=rmask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < M
        b = tl.load(z_ptr + cols[:, None] * stride_z + offs_d[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        lse_c = tl.load(lse_ptr + cols, mask=cmask, other=0.0) * log2e
        c_c = tl.load(coef_ptr + cols, mask=cmask, other=0.0)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        # p_rc from row r's softmax, p_cr from column c's softmax of the same (symmetric) logit.
        g = (c_r[:, None] * tl.exp2(s - lse_r[:, None])
             + c_c[None, :] * tl.exp2(s - lse_c[None, :]))
        g = tl.where(rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :]), g, 0.0)
        acc += tl.dot(g.to(b.dtype), b, input_precision=PRECISION)

    tl.store(dz_ptr + rows[:, None] * stride_dz + offs_d[None, :], acc * inv_t,
             mask=rmask[:, None] & dmask[None, :])


def _launch_grid(M):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)


def _meta(z):
    return dict(BLOCK_D=max(16, triton.next_power_of_2(z.shape[1])),
                UPCAST=_backend.interpreted(z) and z.dtype != torch.float32,
                PRECISION=_backend.dot_precision(z.dtype), device_tensor=z)


def _lse_triton(z, temperature):
    M, D = z.shape
    lse = torch.empty(M, device=z.device, dtype=torch.float32)
    _nt_xent_fwd_kernel(_launch_grid(M), z, lse, M, D, z.stride(0), _LOG2E / temperature,
                        **_meta(z))
    return lse


def _softmax_grad_triton(z, lse, coef, temperature):
    M, D = z.shape
    dz = torch.empty(M, D, device=z.device, dtype=torch.float32)
    _nt_xent_bwd_kernel(_launch_grid(M), z, lse, coef, dz, M, D, z.stride(0), dz.stride(0),
                        _LOG2E / temperature, 1.0 / temperature, **_meta(z))
    return dz


def _chunk_logits(zs, zc, r0, r1):
    """Logits of rows r0:r1 (zs = z / T) against all rows, self masked to -inf."""
    s = zs[r0:r1] @ zc.T
    ar = torch.arange(r1 - r0, device=zc.device)
    s[ar, ar + r0] = float("-inf")
    return s


def _lse_torch(z, temperature):
    zc = z.to(_backend.compute_dtype(z))
    zs = zc / temperature
    M = zc.shape[0]
    lse = torch.empty(M, device=z.device, dtype=zc.dtype)
    step = _backend.rows_per_chunk(M)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        lse[r0:r1] = torch.logsumexp(_chunk_logits(zs, zc, r0, r1), 1)
    return lse


def _softmax_grad_torch(z, lse, coef, temperature):
    zc = z.to(_backend.compute_dtype(z))
    zs = zc / temperature
    M = zc.shape[0]
    dz = torch.zeros_like(zc)
    step = _backend.rows_per_chunk(M)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        g = _chunk_logits(zs, zc, r0, r1).sub_(lse[r0:r1, None]).exp_().mul_(coef[r0:r1, None])
        dz[r0:r1] += g @ zc  # c_i p_ij z_j for the chunk's rows i
        dz += g.T @ zc[r0:r1]  # c_i p_ij z_i for every column j
    return dz / temperature


def _label_sums(zc, groups, num_groups, weights=None):
    """Per-label sums of z rows (optionally weighted), gathered back to each row: (M, d)."""
    rows = zc if weights is None else zc * weights[:, None]
    sums = torch.zeros(num_groups, zc.shape[1], device=zc.device, dtype=zc.dtype)
    return sums.index_add_(0, groups, rows)[groups]


class _NTXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, groups, num_groups, temperature, triton_path):
        lse = (_lse_triton if triton_path else _lse_torch)(z, temperature)
        zc = z.to(lse.dtype)
        pos_cnt = (torch.bincount(groups, minlength=num_groups)[groups] - 1).to(lse.dtype)
        pos_sum = (zc * (_label_sums(zc, groups, num_groups) - zc)).sum(1) / temperature
        has_pos = pos_cnt > 0
        n_valid = has_pos.sum()
        row_loss = lse - pos_sum / pos_cnt.clamp(min=1)
        loss = torch.where(has_pos, row_loss, 0.0).sum() / n_valid
        ctx.save_for_backward(z, groups, lse, pos_cnt, n_valid)
        ctx.temperature, ctx.triton_path, ctx.num_groups = temperature, triton_path, num_groups
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        z, groups, lse, pos_cnt, n_valid = ctx.saved_tensors
        num_groups = ctx.num_groups
        temperature = ctx.temperature
        has_pos = pos_cnt > 0
        coef = torch.where(has_pos, grad_out / n_valid, 0.0).to(lse.dtype)
        grad_fn = _softmax_grad_triton if ctx.triton_path else _softmax_grad_torch
        dz = grad_fn(z, lse, coef, temperature)
        # Positive part: d/dz_k of sum_i w_i z_i . (S_{g_i} - z_i) / T with w_i = c_i / |P(i)|
        #   = (w_k (S_{g_k} - z_k) + (W_{g_k} - w_k z_k)) / T,   W_g = sum_{g_i = g} w_i z_i.
        zc = z.to(dz.dtype)
        w = (coef / pos_cnt.clamp(min=1)).to(dz.dtype)
        pos_grad = (w[:, None] * (_label_sums(zc, groups, num_groups) - zc)
                    + _label_sums(zc, groups, num_groups, w) - w[:, None] * zc)
        dz -= pos_grad / temperature
        return dz.to(z.dtype), None, None, None, None


def default_labels(m: int, num_views: int, device) -> torch.Tensor:
    """View-major labels: rows v*N .. v*N+N-1 are view v of instances 0..N-1."""
    if num_views < 1 or m % num_views:
        raise ValueError(f"{m} rows are not {num_views} views of the same number of instances")
    return torch.arange(m, device=device) % (m // num_views)


@_backend.opaque_to_compile
def nt_xent(z: torch.Tensor, temperature: float, labels: torch.Tensor | None = None, *,
            num_views: int = 2, backend: str = "auto") -> torch.Tensor:
    """Multi-positive NT-Xent loss of embeddings z (M, d); returns a float32 scalar (float64 for
    float64 inputs on the torch path).

    z is used as given (normalise it first for cosine similarity). With `labels=None`, z holds
    `num_views` views of N = M / num_views instances, view-major (SimCLR: cat([z1, z2])). Rows with
    equal `labels` are positives of each other; the anchor itself is never a candidate. Per anchor
    the loss is LSE over all other rows minus the mean positive logit; anchors without any positive
    are left out of the mean (the loss is NaN if no anchor has one, like cross_entropy when every
    target is ignored).

    Pure function: for data-parallel training pass all-gathered features (gathered with gradients,
    e.g. torch.distributed.nn.all_gather); the loss is a plain autograd function of its input.
    backend: "auto" (Triton on CUDA, chunked torch on CPU), "triton" (interpreter on CPU), "torch".
    """
    if z.dim() != 2:
        raise ValueError(f"z must be (M, d), got {tuple(z.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels is None:
        groups = default_labels(z.shape[0], num_views, z.device)
        num_groups = z.shape[0] // num_views
    elif labels.shape != (z.shape[0],):
        raise ValueError(f"labels must be ({z.shape[0]},), got {tuple(labels.shape)}")
    else:
        # Dense ids 0..G-1 for the label sums (a host sync on CUDA; default labels skip it).
        uniq, groups = torch.unique(labels, return_inverse=True)
        num_groups = uniq.numel()
    triton_path = _backend.use_triton(backend, z, groups)
    if triton_path:
        _backend.check_triton_inputs(z.shape[1], z)
        if z.stride(1) != 1:
            z = z.contiguous()
    return _NTXent.apply(z, groups, num_groups, float(temperature), triton_path)


def nt_xent_ref(z: torch.Tensor, temperature: float, labels: torch.Tensor | None = None, *,
                num_views: int = 2, upcast: bool = False) -> torch.Tensor:
    """Plain-torch NT-Xent that materialises the M x M logits; `upcast` computes in float64."""
    if labels is None:
        labels = default_labels(z.shape[0], num_views, z.device)
    if upcast:
        z = z.double()
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    s = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    logp = torch.log_softmax(s, dim=1)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    cnt = pos.sum(1)
    row = -logp.masked_fill(~pos, 0.0).sum(1) / cnt.clamp(min=1)
    return row[cnt > 0].mean()

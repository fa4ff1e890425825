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
#
# Local anchors (`anchors=`): only a subset A of the rows are anchors, all M rows stay keys (the
# per-process share of a data-parallel loss over gathered z). Forward runs the same row kernel over
# A's rows only (n_a x M tiles). In backward c_j = 0 for j outside A (and LSE_j = +inf, so p_ij = 0
# exactly): A's rows still need every column, but any other row only needs A's columns, so backward
# is n_a x M + (M - n_a) x n_a tiles; the chunked torch path forms only A's n_a x M logits.
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _backend
from ._backend import triton_kernel

_LOG2E = 1.0 / math.log(2.0)

# Interpreter: small tiles so that test shapes of a few hundred rows span several programs.
_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32}


@triton_kernel(configs=_backend.DOT_CONFIGS, admit=_backend.admit_dot("lse"), key=["n_rows", "M", "D"],
               cpu_config=_CPU_CONFIG)
def _nt_xent_fwd_kernel(z_ptr, lse_ptr, row_idx_ptr, row_start, n_rows, M, D, stride_z, scale2,
                        BLOCK_D: tl.constexpr, ROW_IDX: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """LSE_i = logsumexp_{j != i} z_i . z_j / T (natural log) for a block of anchor rows.

    The anchors are rows row_start .. row_start + n_rows - 1 of z, or (ROW_IDX) the n_rows indices
    at row_idx_ptr; lse_ptr gets one value per anchor, in anchor order. Columns are all M rows.
    """
    pid = tl.program_id(0)
    local = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = local < n_rows
    if ROW_IDX:
        rows = tl.load(row_idx_ptr + local, mask=rmask, other=0)
    else:
        rows = row_start + local
    offs_d = tl.arange(0, BLOCK_D)
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
    tl.store(lse_ptr + local, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)


@triton_kernel(configs=_backend.DOT_CONFIGS, admit=_backend.admit_dot("acc"), key=["n_rows", "n_cols", "D"],
               cpu_config=_CPU_CONFIG)
def _nt_xent_bwd_kernel(z_ptr, lse_ptr, coef_ptr, dz_ptr, row_idx_ptr, row_start, n_rows,
                        col_idx_ptr, col_start, n_cols, D, stride_z, stride_dz, scale2, inv_t,
                        BLOCK_D: tl.constexpr, ROW_IDX: tl.constexpr, COL_IDX: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """dz_i = (1/T) sum_{j in cols, j != i} (c_i p_ij + c_j p_ji) z_j for the rows i of the launch.

    Rows and columns are each a contiguous range (start, count) or an index list (*_IDX). lse and
    coef are indexed by global row and have an entry for every row of z: c_j = 0 and LSE_j = +inf
    for rows that are not anchors, so their softmax terms are exactly 0 (never 0 * inf).
    """
    pid = tl.program_id(0)
    local = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = local < n_rows
    if ROW_IDX:
        rows = tl.load(row_idx_ptr + local, mask=rmask, other=0)
    else:
        rows = row_start + local
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    a = tl.load(z_ptr + rows[:, None] * stride_z + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    log2e = 1.4426950408889634
    lse_r = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * log2e
    c_r = tl.load(coef_ptr + rows, mask=rmask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        lcol = start + tl.arange(0, BLOCK_N)
        cmask = lcol < n_cols
        if COL_IDX:
            cols = tl.load(col_idx_ptr + lcol, mask=cmask, other=0)
        else:
            cols = col_start + lcol
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


def _launch_grid(n_rows):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)


# Anchor sets inside this module: a (start, stop) pair of ints for a contiguous block (all rows is
# (0, M)), or a 1-D int64 tensor of distinct row indices. A kernel's *_IDX=False launch still needs
# some int64 device tensor in the unused index slot; `groups` (M ints) is always at hand for that.
def _rows_args(rows, dummy):
    """(index tensor, start, count, indexed) kernel arguments for an anchor set."""
    if isinstance(rows, tuple):
        return dummy, rows[0], rows[1] - rows[0], False
    return rows, 0, rows.numel(), True


def _all_rows(rows, m):
    return isinstance(rows, tuple) and rows == (0, m)


def _num_rows(rows):
    return rows[1] - rows[0] if isinstance(rows, tuple) else rows.numel()


def _lse_triton(z, rows, groups, temperature, precision):
    M, D = z.shape
    idx, start, n, indexed = _rows_args(rows, groups)
    lse = torch.empty(n, device=z.device, dtype=torch.float32)
    _nt_xent_fwd_kernel(_launch_grid(n), z, lse, idx, start, n, M, D, z.stride(0),
                        _LOG2E / temperature, ROW_IDX=indexed, **_backend.dot_meta(z, precision))
    return lse


def _softmax_grad_triton(z, rows, groups, lse, coef, temperature, precision):
    """Softmax part of dz for every row of z, anchors `rows` with LSE `lse` and weights `coef`.

    Anchor rows need every column (their own softmax row, plus their column in the other anchors'
    rows); any other row k only appears as a column of the anchors' softmax rows, so its launch runs
    over the anchor columns only: (n_a x M) + ((M - n_a) x n_a) tiles rather than M x M.
    """
    M, D = z.shape
    dz = torch.empty(M, D, device=z.device, dtype=torch.float32)
    if _all_rows(rows, M):  # every row is an anchor, in row order: today's single M x M launch
        lse_all, coef_all, launches = lse, coef, [((0, M), (0, M))]
    else:
        lse_all = torch.full((M,), float("inf"), device=z.device, dtype=torch.float32)
        coef_all = torch.zeros(M, device=z.device, dtype=torch.float32)
        if isinstance(rows, tuple):
            a0, a1 = rows
            lse_all[a0:a1], coef_all[a0:a1] = lse, coef
            launches = [(rows, (0, M))] + [(other, rows) for other in ((0, a0), (a1, M))
                                           if other[1] > other[0]]
        else:
            lse_all[rows], coef_all[rows] = lse, coef
            others = torch.ones(M, dtype=torch.bool, device=z.device)
            others[rows] = False
            others = others.nonzero().squeeze(1)  # a host sync, like the index checks in nt_xent
            launches = [(rows, (0, M))] + ([(others, rows)] if others.numel() else [])
    for row_set, col_set in launches:
        ridx, rstart, nr, rind = _rows_args(row_set, groups)
        cidx, cstart, nc, cind = _rows_args(col_set, groups)
        _nt_xent_bwd_kernel(_launch_grid(nr), z, lse_all, coef_all, dz, ridx, rstart, nr, cidx,
                            cstart, nc, D, z.stride(0), dz.stride(0), _LOG2E / temperature,
                            1.0 / temperature, ROW_IDX=rind, COL_IDX=cind,
                            **_backend.dot_meta(z, precision))
    return dz


def _chunk_rows(rows, r0, r1, device):
    """Anchors r0:r1 of an anchor set: (what indexes z, their global row indices)."""
    if isinstance(rows, tuple):
        start = rows[0]
        return slice(start + r0, start + r1), torch.arange(start + r0, start + r1, device=device)
    idx = rows[r0:r1]
    return idx, idx


def _chunk_logits(zs, zc, rows, r0, r1):
    """Logits of anchors r0:r1 (zs = z / T) against all rows, each anchor's own column -inf."""
    sel, own = _chunk_rows(rows, r0, r1, zc.device)
    s = zs[sel] @ zc.T
    s[torch.arange(r1 - r0, device=zc.device), own] = float("-inf")
    return s


def _lse_torch(z, rows, temperature):
    zc = z.to(_backend.compute_dtype(z))
    zs = zc / temperature
    n = _num_rows(rows)
    lse = torch.empty(n, device=z.device, dtype=zc.dtype)
    step = _backend.rows_per_chunk(zc.shape[0])
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        lse[r0:r1] = torch.logsumexp(_chunk_logits(zs, zc, rows, r0, r1), 1)
    return lse


def _softmax_grad_torch(z, rows, lse, coef, temperature):
    zc = z.to(_backend.compute_dtype(z))
    zs = zc / temperature
    n = _num_rows(rows)
    dz = torch.zeros_like(zc)
    step = _backend.rows_per_chunk(zc.shape[0])
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        g = _chunk_logits(zs, zc, rows, r0, r1).sub_(lse[r0:r1, None]).exp_()
        g.mul_(coef[r0:r1, None])
        sel, _ = _chunk_rows(rows, r0, r1, zc.device)
        if isinstance(sel, slice):
            dz[sel] += g @ zc  # c_i p_ij z_j for the chunk's anchors i
        else:
            dz.index_add_(0, sel, g @ zc)
        dz += g.T @ zc[sel]  # c_i p_ij z_i for every column j
    return dz / temperature


def _group_sums(zc, groups, num_groups, weights=None):
    """Per-label sums of z rows (optionally weighted): (num_groups, d)."""
    rows = zc if weights is None else zc * weights[:, None]
    sums = torch.zeros(num_groups, zc.shape[1], device=zc.device, dtype=zc.dtype)
    return sums.index_add_(0, groups, rows)


def _select(rows):
    return slice(*rows) if isinstance(rows, tuple) else rows


class _NTXent(torch.autograd.Function):
    # Dtype contract (_backend.dot_dtype): z is rounded to `dot_dt` once, here, and every logit in
    # forward and backward is a fp32-accumulated dot of the rounded rows; the gradient is returned in
    # z's own dtype. Autocast is off inside (_backend.no_autocast).
    @staticmethod
    def forward(ctx, z, groups, num_groups, temperature, triton_path, rows, dot_dt, precision):
        with _backend.no_autocast(z.device):
            zd = z.detach().to(dot_dt)
            if triton_path:
                lse = _lse_triton(zd, rows, groups, temperature, precision)
            else:
                lse = _lse_torch(zd, rows, temperature)
            sel = _select(rows)
            zc = zd.to(lse.dtype)
            za, ga = zc[sel], groups[sel]
            pos_cnt = (torch.bincount(groups, minlength=num_groups)[ga] - 1).to(lse.dtype)
            pos_sum = (za * (_group_sums(zc, groups, num_groups)[ga] - za)).sum(1) / temperature
            has_pos = pos_cnt > 0
            n_valid = has_pos.sum()
            row_loss = lse - pos_sum / pos_cnt.clamp(min=1)
            loss = torch.where(has_pos, row_loss, 0.0).sum() / n_valid
        ctx.rows = rows if isinstance(rows, tuple) else None
        ctx.save_for_backward(zd, groups, lse, pos_cnt, n_valid,
                              *(() if isinstance(rows, tuple) else (rows,)))
        ctx.temperature, ctx.triton_path, ctx.num_groups = temperature, triton_path, num_groups
        ctx.precision, ctx.in_dtype = precision, z.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        z, groups, lse, pos_cnt, n_valid, *idx = ctx.saved_tensors
        with _backend.no_autocast(z.device):
            dz = _NTXent._grad(ctx, z, groups, lse, pos_cnt, n_valid, idx, grad_out)
        return dz.to(ctx.in_dtype), None, None, None, None, None, None, None

    @staticmethod
    def _grad(ctx, z, groups, lse, pos_cnt, n_valid, idx, grad_out):
        rows = ctx.rows if ctx.rows is not None else idx[0]
        num_groups = ctx.num_groups
        temperature = ctx.temperature
        has_pos = pos_cnt > 0
        coef = torch.where(has_pos, grad_out / n_valid, 0.0).to(lse.dtype)  # per anchor
        if ctx.triton_path:
            dz = _softmax_grad_triton(z, rows, groups, lse, coef, temperature, ctx.precision)
        else:
            dz = _softmax_grad_torch(z, rows, lse, coef, temperature)
        # Positive part: d/dz_k of sum_i w_i z_i . (S_{g_i} - z_i) / T with w_i = c_i / |P(i)| for
        # anchors and w_i = 0 for other rows
        #   = (w_k (S_{g_k} - z_k) + (W_{g_k} - w_k z_k)) / T,   W_g = sum_{g_i = g} w_i z_i.
        zc = z.to(dz.dtype)
        w_anchor = (coef / pos_cnt.clamp(min=1)).to(dz.dtype)
        if _all_rows(rows, z.shape[0]):
            w = w_anchor
        else:
            w = torch.zeros(z.shape[0], device=z.device, dtype=dz.dtype)
            w[_select(rows)] = w_anchor
        pos_grad = (w[:, None] * (_group_sums(zc, groups, num_groups)[groups] - zc)
                    + _group_sums(zc, groups, num_groups, w)[groups] - w[:, None] * zc)
        return dz - pos_grad / temperature


def default_labels(m: int, num_views: int, device) -> torch.Tensor:
    """View-major labels: rows v*N .. v*N+N-1 are view v of instances 0..N-1."""
    if num_views < 1 or m % num_views:
        raise ValueError(f"{m} rows are not {num_views} views of the same number of instances")
    return torch.arange(m, device=device) % (m // num_views)


def dense_groups(labels: torch.Tensor) -> torch.Tensor:
    """Labels -> dense group ids with the same equalities, without a host sync (torch.unique's
    inverse needs one on CUDA): sort, number the runs of equal values, scatter back. Ids lie in
    [0, M) with M = len(labels), so M bounds the number of groups (the label sums are M x d)."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer ids, got {labels.dtype}")
    sorted_l, order = torch.sort(labels)
    starts = torch.ones_like(sorted_l, dtype=torch.long)
    starts[0] = 0
    starts[1:] = (sorted_l[1:] != sorted_l[:-1]).long()
    groups = torch.empty_like(starts)
    groups[order] = starts.cumsum(0)
    return groups


def _anchor_set(anchors, m: int, device):
    """None / slice / index tensor -> (start, stop) or distinct int64 indices (see _rows_args)."""
    if anchors is None:
        return (0, m)
    if isinstance(anchors, slice):
        start, stop, step = anchors.indices(m)
        if step != 1:
            raise ValueError(f"an anchors slice must have step 1, got {step}; pass an index tensor")
        if stop <= start:
            raise ValueError(f"anchors {anchors} select no row of {m}")
        return (start, stop)
    if not torch.is_tensor(anchors):
        raise TypeError(f"anchors must be None, a slice or an index tensor, got {type(anchors)}")
    if anchors.dim() != 1 or anchors.dtype.is_floating_point or anchors.dtype == torch.bool:
        raise ValueError(f"an anchors tensor must be 1-D integer row indices, got "
                         f"{anchors.dtype} {tuple(anchors.shape)}")
    if anchors.device != device:
        raise ValueError(f"anchors are on {anchors.device}, z on {device}")
    if anchors.numel() == 0:
        raise ValueError("anchors select no row")
    idx = anchors.long().contiguous()
    # Host syncs on CUDA (a slice needs none).
    if not bool(((idx >= 0) & (idx < m)).all()):
        raise ValueError(f"anchor indices must lie in [0, {m})")
    if bool(torch.bincount(idx, minlength=m).max() > 1):
        raise ValueError("anchor indices must be distinct")
    return idx


@_backend.opaque_to_compile
def nt_xent(z: torch.Tensor, temperature: float, labels: torch.Tensor | None = None, *,
            num_views: int = 2, anchors: slice | torch.Tensor | None = None,
            precision: str = "auto",
            backend: str = "auto") -> torch.Tensor:
    """Multi-positive NT-Xent loss of embeddings z (M, d); returns a float32 scalar (float64 for
    float64 inputs on the torch path).

    z is used as given (normalise it first for cosine similarity). With `labels=None`, z holds
    `num_views` views of N = M / num_views instances, view-major (SimCLR: cat([z1, z2])). Rows with
    equal `labels` are positives of each other; the anchor itself is never a candidate. Per anchor
    the loss is LSE over all other rows minus the mean positive logit; anchors without any positive
    are left out of the mean (the loss is NaN if no anchor has one, like cross_entropy when every
    target is ignored).

    anchors: which rows of z are anchors; None = all M (the full loss). A slice with step 1 (e.g.
    slice(r * B, (r + 1) * B)) or a 1-D tensor of distinct row indices (checked: a host sync on
    CUDA). Every row of z stays a candidate (key) for every anchor, labels / default labels are
    those of all M rows, and the result is the mean over the chosen anchors that have a positive,
    with gradients for all of z. The work is n_anchors x M logits instead of M x M (the Triton
    backward also re-forms the other rows' tiles against the anchors: n_anchors x (2M - n_anchors)
    in all). Over a partition of the rows into blocks, the sum of loss(block) * n_valid(block) /
    n_valid is the full loss (n_valid: anchors with a positive), and the same for the gradients.

    Pure function: for data-parallel training pass all-gathered features (gathered with gradients,
    e.g. torch.distributed.nn.all_gather); the loss is a plain autograd function of its input. To
    split the work, each of W processes can take its own block of the gathered rows as anchors.
    If every process has the same number of anchors with a positive (SimCLR / multi-crop: all of
    them), the mean over processes of the local losses is the full loss, and with the gather's
    backward summing the gradients over processes and DDP averaging them, the update is the full
    loss's. (The default labels assume a view-major z; a per-process gather of cat([z1, z2]) is
    process-major, so pass its labels.)
    precision: the dot operands' precision (see kernels._backend.dot_dtype): "auto" rounds fp32
    inputs to bf16 under torch.autocast and otherwise follows torch's float32 matmul precision;
    "ieee", "tf32", "bf16", "fp16" force one. Accumulation is fp32 in every case; the gradient
    comes back in z's dtype.
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
        groups, num_groups = dense_groups(labels), z.shape[0]
    triton_path = _backend.use_triton(backend, z, groups)
    rows = _anchor_set(anchors, z.shape[0], z.device)
    dot_dt, prec = _backend.dot_dtype(precision, z)
    if triton_path:
        _backend.check_triton_inputs(z.shape[1], z)
        if z.stride(1) != 1:
            z = z.contiguous()
    return _NTXent.apply(z, groups, num_groups, float(temperature), triton_path, rows, dot_dt, prec)


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

# Local NCE (AMDIM / DIM): one source embedding per image against every location of every image.
#   src (B, d), trg (B, L, d); scores s_ijl = src_i . trg_jl; with a clip c, s' = c tanh(s / c).
#   positives of source i: its own image's L locations a_il = s'_iil; negatives: every location of
#   every other image, shared by the L positives: NEG_i = log sum_{j != i, l'} exp(s'_ijl').
#   loss_il = logaddexp(a_il, NEG_i) - a_il,  loss = mean_il;  reg = mean_ijl s_ijl^2 (unclipped).
# With T = trg viewed as (N = B L, d), the scores are one (B, N) matrix S = src T^T whose row i has
# its positives in columns [iL, (i+1)L). Gradients, with g the loss's and r the reg's output grad:
#   p_il = sigmoid(a_il - NEG_i)                  w_i = g / (B L) sum_l (1 - p_il)
#   dS'_in = w_i exp(s'_in - NEG_i)   (negatives)   dS'_i,iL+l = g / (B L) (p_il - 1)   (positives)
#   dS_in = dS'_in (1 - tanh^2(s_in / c)) + r 2 s_in / (B^2 L)
#   dsrc = dS T (row pass),  dT = dS^T src (column pass).
# Nothing holds S whole: the torch path walks row chunks of S (each chunk: softmax weights and both
# gradient products at once); the Triton path streams column tiles with an online logsumexp and
# recomputes the tiles in two backward passes, the positive block (B x L) being done in torch.
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _backend
from ._backend import triton_kernel

_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32}
_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _clip_tanh(s, inv_clip):
    # tanh(s / c) from exp2: stable at both ends (exp2 -> inf gives 1, -> 0 gives -1) and available
    # under the interpreter, which has no libdevice tanh.
    e = tl.exp2(s * (2.0 * 1.4426950408889634) * inv_clip)
    return 1.0 - 2.0 / (e + 1.0)


@triton_kernel(configs=_backend.DOT_CONFIGS, admit=_backend.admit_dot("lse"), key=["B", "NC", "D"],
               cpu_config=_CPU_CONFIG)
def _local_lse_kernel(s_ptr, t_ptr, neg_ptr, reg_ptr, B, NC, L, D, stride_s, stride_t, clip, inv_clip,
                      HAS_CLIP: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """NEG_i (natural log) over the columns of other images, and sum_n s_in^2 over all columns."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < B
    dmask = offs_d < D
    a = tl.load(s_ptr + rows[:, None] * stride_s + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0)
    if UPCAST:  # the interpreter has no bf16 dot
        a = a.to(tl.float32)
    log2e = 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    sq = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, NC, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        b = tl.load(t_ptr + cols[:, None] * stride_t + offs_d[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
        sq += tl.sum(tl.where(cmask[None, :], s * s, 0.0), 1)
        if HAS_CLIP:
            s = clip * _clip_tanh(s, inv_clip)
        neg = cmask[None, :] & ((cols[None, :] // L) != rows[:, None])
        s = tl.where(neg, s * log2e, float("-inf"))
        # A tile can lie wholly inside a row's own image: keep the running max finite for the shift.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(neg_ptr + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)
    tl.store(reg_ptr + rows, sq, mask=rmask)


@triton.jit
def _grad_weights(s, rows, cols, cmask, neg2, w, clip, inv_clip, reg_scale, L, HAS_CLIP: tl.constexpr):
    # reg_scale = 2 g_reg / (B^2 L), read on the device (no host sync for the reg's output grad)
    """dS of a (rows, cols) tile without the positives' loss part (added in torch)."""
    if HAS_CLIP:
        th = _clip_tanh(s, inv_clip)
        sc = clip * th
    else:
        sc = s
    neg = cmask & ((cols // L) != rows)
    p = tl.where(neg, tl.exp2(sc * 1.4426950408889634 - neg2) * w, 0.0)
    if HAS_CLIP:
        p = p * (1.0 - th * th)
    return tl.where(cmask, p + reg_scale * s, 0.0)


@triton_kernel(configs=_backend.DOT_CONFIGS, admit=_backend.admit_dot("acc"), key=["B", "NC", "D"],
               cpu_config=_CPU_CONFIG)
def _local_row_kernel(s_ptr, t_ptr, neg_ptr, w_ptr, rs_ptr, out_ptr, B, NC, L, D, stride_s, stride_t, stride_o,
                      clip, inv_clip, HAS_CLIP: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """dsrc_i = sum_n dS_in T_n (row pass; program = BLOCK_M sources, loop over all locations)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < B
    dmask = offs_d < D
    a = tl.load(s_ptr + rows[:, None] * stride_s + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    neg2 = tl.load(neg_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
    reg_scale = tl.load(rs_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NC, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        b = tl.load(t_ptr + cols[:, None] * stride_t + offs_d[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
        ds = _grad_weights(s, rows[:, None], cols[None, :], cmask[None, :] & rmask[:, None], neg2[:, None],
                           w[:, None], clip, inv_clip, reg_scale, L, HAS_CLIP)
        acc += tl.dot(ds.to(b.dtype), b, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_o + offs_d[None, :], acc, mask=rmask[:, None] & dmask[None, :])


@triton_kernel(configs=_backend.DOT_CONFIGS, admit=_backend.admit_dot("acc"), key=["B", "NC", "D"],
               cpu_config=_CPU_CONFIG)
def _local_col_kernel(s_ptr, t_ptr, neg_ptr, w_ptr, rs_ptr, out_ptr, B, NC, L, D, stride_s, stride_t, stride_o,
                      clip, inv_clip, HAS_CLIP: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """dT_n = sum_i dS_in src_i (column pass; program = BLOCK_M locations, loop over sources). The
    tile is computed transposed (locations x sources) so both dots keep the reduction on axis 1."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cmask = cols < NC
    dmask = offs_d < D
    b = tl.load(t_ptr + cols[:, None] * stride_t + offs_d[None, :], mask=cmask[:, None] & dmask[None, :],
                other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    reg_scale = tl.load(rs_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, B, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        rmask = rows < B
        a = tl.load(s_ptr + rows[:, None] * stride_s + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        neg2 = tl.load(neg_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
        s_t = tl.dot(b, tl.trans(a), input_precision=PRECISION)  # (locations, sources)
        ds_t = _grad_weights(s_t, rows[None, :], cols[:, None], cmask[:, None] & rmask[None, :], neg2[None, :],
                             w[None, :], clip, inv_clip, reg_scale, L, HAS_CLIP)
        acc += tl.dot(ds_t.to(a.dtype), a, input_precision=PRECISION)
    tl.store(out_ptr + cols[:, None] * stride_o + offs_d[None, :], acc, mask=cmask[:, None] & dmask[None, :])


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)


def _clip_args(clip):
    return (float(clip), 1.0 / float(clip)) if clip is not None else (1.0, 1.0)


# -- torch path ----------------------------------------------------------------------------------
def _torch_pass(src, t, L, clip, grads, reg_grads):
    """One walk over source chunks of S: (loss sum over (i, l), sum of s^2, loss grads, reg grads).
    Loss grads (dsrc, dT) are those of the mean loss; reg grads are the raw products (S T, S^T src),
    which the reg's gradient scales by 2 g_reg / (B^2 L). Each pair is None unless asked for.
    The chunk is held transposed, (N locations, r sources): on CPU `t @ src_chunk^T` and both gradient
    products in that layout ran ~1.6x faster than `src_chunk @ t^T` (MKL, 2 cores, B=128 L=49 d=256),
    and the products are most of the time."""
    B, N = src.shape[0], t.shape[0]
    ct = _backend.compute_dtype(src, t)
    sc, tc = src.to(ct), t.to(ct)
    loss_sum = torch.zeros((), dtype=ct, device=src.device)
    sq_sum = torch.zeros((), dtype=ct, device=src.device)
    # dT sums over chunks: the first chunk writes it (mm out=), later ones add (no zero fill pass)
    dsrc, dt = (torch.empty_like(sc), torch.empty_like(tc)) if grads else (None, None)
    rsrc, rt = (torch.empty_like(sc), torch.empty_like(tc)) if reg_grads else (None, None)
    inv_bl = 1.0 / (B * L)
    step = max(1, _backend.rows_per_chunk(N) // (2 if clip is not None or reg_grads else 1))
    for r0 in range(0, B, step):
        r1 = min(B, r0 + step)
        r = r1 - r0
        cols = torch.arange(r, device=src.device)
        own = cols + r0
        st = tc @ sc[r0:r1].T                              # (N, r) raw scores, transposed
        sq_sum += torch.linalg.vector_norm(st) ** 2
        if reg_grads:
            rsrc[r0:r1] = st.T @ tc
            torch.mm(st, sc[r0:r1], out=rt) if r0 == 0 else rt.addmm_(st, sc[r0:r1])
        if clip is not None:
            # tanh(x) = 2 sigmoid(2x) - 1: torch's CPU sigmoid is ~3x faster than its tanh
            th = torch.mul(st, 2.0 / clip).sigmoid_().mul_(2.0).sub_(1.0)
            sp = th * clip
        else:
            th, sp = None, st
        sp3 = sp.view(B, L, r)
        pos = sp3[own, :, cols].clone()                    # (r, L): a_il of the chunk's sources
        sp3[own, :, cols] = float("-inf")
        neg = torch.logsumexp(sp, 0)                       # (r,)
        loss_sum += (torch.logaddexp(pos, neg[:, None]) - pos).sum()
        if not grads:
            continue
        p = torch.sigmoid(pos - neg[:, None])
        w = (1.0 - p).sum(1) * inv_bl
        e = sp.sub_(neg).exp_().mul_(w)                    # dS' of the negatives (positives are 0 here)
        e.view(B, L, r)[own, :, cols] = (p - 1.0) * inv_bl
        if th is not None:
            e.addcmul_(e * th, th, value=-1.0)             # e (1 - th^2)
        dsrc[r0:r1] = e.T @ tc
        torch.mm(e, sc[r0:r1], out=dt) if r0 == 0 else dt.addmm_(e, sc[r0:r1])
    return loss_sum, sq_sum, (dsrc, dt), (rsrc, rt)


# -- Triton path ---------------------------------------------------------------------------------
def _lse_triton(src, t, L, clip, precision):
    B, D = src.shape
    neg = torch.empty(B, device=src.device, dtype=torch.float32)
    sq = torch.empty(B, device=src.device, dtype=torch.float32)
    c, ic = _clip_args(clip)
    _local_lse_kernel(_grid(B), src, t, neg, sq, B, t.shape[0], L, D, src.stride(0), t.stride(0), c, ic,
                      HAS_CLIP=clip is not None, **_backend.dot_meta(src, precision))
    return neg, sq


def _grads_triton(src, t, L, clip, neg, w, reg_scale, precision):
    B, D = src.shape
    N = t.shape[0]
    c, ic = _clip_args(clip)
    meta = dict(HAS_CLIP=clip is not None, **_backend.dot_meta(src, precision))
    dsrc = torch.empty(B, D, device=src.device, dtype=torch.float32)
    dt = torch.empty(N, D, device=src.device, dtype=torch.float32)
    _local_row_kernel(_grid(B), src, t, neg, w, reg_scale, dsrc, B, N, L, D, src.stride(0), t.stride(0),
                      dsrc.stride(0), c, ic, **meta)
    _local_col_kernel(_grid(N), src, t, neg, w, reg_scale, dt, B, N, L, D, src.stride(0), t.stride(0),
                      dt.stride(0), c, ic, **meta)
    return dsrc, dt


def _positives(src, trg, clip):
    """(clipped positive scores a_il, tanh(s_iil / c) or None): the B x L own-image block."""
    ct = _backend.compute_dtype(src, trg)
    s = torch.einsum("bd,bld->bl", src.to(ct), trg.to(ct))
    if clip is None:
        return s, None
    th = torch.tanh(s / clip)
    return th * clip, th


class _LocalNCE(torch.autograd.Function):
    # Dtype contract as in info_nce (_backend.dot_dtype): operands rounded to `dot_dt` once; every
    # score is a fp32-accumulated dot of rounded rows; gradients come back in the inputs' dtypes.
    # Torch path: the gradients are formed in forward, chunk by chunk, while each chunk's scores exist
    # (loss and reg are each linear in their output grad, so backward only scales and adds): the
    # scores are computed once per step, not again in backward. With the regulariser that is two more
    # products (S T, S^T src), cheaper on CPU than recomputing the chunk in backward (measured: the
    # recompute path was 1.45x eager at B=128 L=49 d=256, this one see README).
    @staticmethod
    def forward(ctx, src, trg, clip, want_reg, triton_path, dot_dt, precision):
        ctx.in_dtypes = (src.dtype, trg.dtype)
        B, L, D = trg.shape
        with _backend.no_autocast(src.device):
            src, trg = src.detach().to(dot_dt), trg.detach().to(dot_dt)
            t = trg.reshape(B * L, D)
            need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            ctx.clip, ctx.triton_path, ctx.precision, ctx.want_reg = clip, triton_path, precision, want_reg
            if triton_path:
                neg, sq = _lse_triton(src, t, L, clip, precision)
                pos, _ = _positives(src, trg, clip)
                loss = (torch.logaddexp(pos, neg[:, None]) - pos).mean()
                reg = sq.sum() / (B * B * L)
                ctx.save_for_backward(src, trg, neg)
            else:
                loss_sum, sq_sum, (dsrc, dt), (rsrc, rt) = _torch_pass(src, t, L, clip, need, need and want_reg)
                loss, reg = loss_sum / (B * L), sq_sum / (B * B * L)
                ctx.save_for_backward(dsrc, dt, rsrc, rt)
        return loss, reg  # fp32 (fp64 for fp64 inputs: the compute dtype)

    @staticmethod
    def backward(ctx, g_loss, g_reg):
        with _backend.no_autocast(g_loss.device):
            if ctx.triton_path:
                dsrc, dt = _LocalNCE._triton_grads(ctx, g_loss, g_reg)
            else:
                dsrc, dt, rsrc, rt = ctx.saved_tensors
                dsrc, dt = dsrc * g_loss, dt * g_loss
                if ctx.want_reg:
                    r = g_reg * (2.0 / (dsrc.shape[0] * dt.shape[0]))  # 2 / (B^2 L), N = B L rows of dT
                    dsrc, dt = dsrc.addcmul_(rsrc, r), dt.addcmul_(rt, r)
        s_dt, t_dt = ctx.in_dtypes
        B = dsrc.shape[0]
        return dsrc.to(s_dt), dt.reshape(B, -1, dt.shape[1]).to(t_dt), None, None, None, None, None

    @staticmethod
    def _triton_grads(ctx, g_loss, g_reg):
        src, trg, neg = ctx.saved_tensors
        B, L, D = trg.shape
        clip = ctx.clip
        pos, th = _positives(src, trg, clip)
        p = torch.sigmoid(pos - neg[:, None])
        scale = g_loss / (B * L)
        w = ((1.0 - p).sum(1) * scale).float().contiguous()
        # 2 g_reg / (B^2 L) as a 1-element device tensor the kernels read (no host sync)
        reg_scale = ((2.0 / (B * B * L)) * g_reg if ctx.want_reg else torch.zeros_like(g_reg)).float().reshape(1)
        dsrc, dt = _grads_triton(src, trg.reshape(B * L, D), L, clip, neg.contiguous(), w, reg_scale,
                                 ctx.precision)
        dpos = (p - 1.0) * scale                        # the positives' loss part, (B, L)
        if th is not None:
            dpos = dpos * (1.0 - th * th)
        ct = dsrc.dtype
        dsrc = dsrc + torch.einsum("bl,bld->bd", dpos.to(ct), trg.to(ct))
        dt = dt.view(B, L, D) + dpos.to(ct)[:, :, None] * src.to(ct)[:, None, :]
        return dsrc, dt.reshape(B * L, D)


@_backend.opaque_to_compile
def local_nce(src: torch.Tensor, trg: torch.Tensor, clip: float | None = None, *, return_reg: bool = False,
              precision: str = "auto", backend: str = "auto"):
    """Local NCE of AMDIM / DIM: one source per image (src (B, d)) against L target locations per
    image (trg (B, L, d)); scores s_ijl = src_i . trg_jl (scale them yourself, e.g. by 1/sqrt(d)).

    The positives of source i are the L locations of its own image, its negatives every location of
    every other image: loss_il = log(exp(s_iil) + sum_{j != i, l'} exp(s_ijl')) - s_iil, averaged
    over (i, l). `clip=c` soft-clips every score to c tanh(s / c) first (AMDIM's tclip).
    return_reg=True returns (loss, reg) with reg the mean over (i, j, l) of the unclipped s^2.
    Gradients flow to src and trg; no B x B x L tensor is ever held (see the header comment).
    precision / backend: as for kernels.info_nce. Data-parallel: pass all-gathered features.
    """
    if src.dim() != 2 or trg.dim() != 3 or trg.shape[0] != src.shape[0] or trg.shape[2] != src.shape[1]:
        raise ValueError(f"local_nce takes src (B, d) and trg (B, L, d), got {tuple(src.shape)} and "
                         f"{tuple(trg.shape)}")
    if src.shape[0] < 2 or trg.shape[1] < 1:
        raise ValueError(f"local_nce needs B >= 2 images (the negatives are the other images) and L >= 1 "
                         f"locations, got src {tuple(src.shape)}, trg {tuple(trg.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    triton_path = _backend.use_triton(backend, src, trg)
    if triton_path:
        _backend.check_triton_inputs(src.shape[1], src, trg)
        src = src if src.stride(1) == 1 else src.contiguous()
        trg = trg.contiguous()
    dot_dt, prec = _backend.dot_dtype(precision, src, trg)
    loss, reg = _LocalNCE.apply(src, trg, None if clip is None else float(clip), bool(return_reg),
                                triton_path, dot_dt, prec)
    return (loss, reg) if return_reg else loss


def local_nce_ref(src: torch.Tensor, trg: torch.Tensor, clip: float | None = None, *, return_reg: bool = False,
                  upcast: bool = False):
    """Plain torch: materialises the (B, L, 1 + (B-1) L) logits of every positive, one cross entropy
    per (i, l); `upcast` computes in float64."""
    if upcast:
        src, trg = src.double(), trg.double()
    B, L, _ = trg.shape
    raw = torch.einsum("id,jld->ijl", src, trg)                    # (B, B, L)
    s = raw if clip is None else clip * torch.tanh(raw / clip)
    eye = torch.eye(B, dtype=torch.bool, device=src.device)
    pos = s[eye]                                                   # (B, L): s_iil
    negs = s[~eye].reshape(B, (B - 1) * L)                         # row i: every s_ijl', j != i
    logits = torch.cat([pos[:, :, None], negs[:, None, :].expand(B, L, (B - 1) * L)], 2)
    loss = torch.nn.functional.cross_entropy(logits.reshape(B * L, -1),
                                             torch.zeros(B * L, dtype=torch.long, device=src.device))
    return (loss, (raw ** 2).mean()) if return_reg else loss

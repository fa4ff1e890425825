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
# the ranks lo..hi-1. The gradients, with p over {+} U W_i and every row weighted by grad / N:
#   dq_i = (1/T) [sum_{j in W_i} p_ij c_j + (p+_i - 1) k_i],   dk_i = (1/T) (p+_i - 1) q_i,
#   dc_j = (1/T) sum_i p_ij q_i  (only when the candidates require grad: in-batch use).
# The selection itself is constant.
#
# Two paths, neither holding an N x K matrix:
# - torch (CPU, or any device with backend="torch"): row chunks of at most CHUNK_ELEMS scores; per
#   chunk one matmul into a reused buffer, the thresholds by a numba histogram select (topk off
#   CPU), exp on the window only, and the softmax-weighted sums of the gradient right there, so
#   backward is a rescale. Memory O(CHUNK + (N + K) d).
# - Triton (CUDA; the interpreter on CPU with backend="triton"): a radix select over the scores'
#   bits (three histogram passes, O(N) state), an online-LSE pass with the window mask, and in
#   backward the row / column passes of info_nce with the same mask. Memory O((N + K) d + N).
from __future__ import annotations

import math

import numba
import numpy as np
import torch
import triton
import triton.language as tl

from . import _backend
from ._backend import triton_kernel


def window(k: int, lower: float, upper: float) -> tuple[int, int]:
    """The rank window [lo, hi) of K candidates for fractions lower < upper in [0, 1]."""
    if not (0.0 <= lower < upper <= 1.0) or not (math.isfinite(lower) and math.isfinite(upper)):
        raise ValueError(f"need 0 <= lower < upper <= 1, got lower={lower}, upper={upper}")
    lo, hi = math.floor(lower * k), math.floor(upper * k)
    return lo, hi


BINS = 4096


@numba.njit(inline="always")
def _bin(v, mn, scale):
    """Histogram bin of v in a row whose finite range starts at mn (-inf and NaN go to bin 0)."""
    b = int((v - mn) * scale) if v >= mn else 0
    return min(max(b, 0), BINS - 1)


@numba.njit(inline="always")
def _bin_of_rank(counts, rank):
    """(bin holding descending rank `rank`, members of the bins above it)."""
    above, b = 0, BINS - 1
    while above + counts[b] <= rank:
        above += counts[b]
        b -= 1
    return b, above


@numba.njit(cache=True, parallel=True)
def _select_rows(s, lo, hi, s_pos, low, high, m_out, z_out, apply):
    """Per row of s (r, K), exactly: low = the score of descending rank hi-1, high = that of rank lo-1
    (+inf when lo = 0). The row's finite range is cut into BINS bins, one pass counts them, the bins
    holding the two ranks are found from the top, one more pass collects only those bins' members,
    which are sorted. With `apply`, the row becomes e = exp(s - m) on its window [low, high) and 0
    elsewhere, in place, with m = max(s+, window max) and z = exp(s+ - m) + sum e (in float64).
    Linear passes over a row that stays in cache, where torch.topk partially sorts hi elements
    (kernels/bench.py's ring_nce rows time both); exp only on the window (the bulk of a Ring row is
    outside it, and torch's vectorised exp is 3-4x slower on -inf or underflowing inputs than on
    ordinary ones, so masking first and exponentiating the whole row would not be cheaper)."""
    r, k = s.shape
    for i in numba.prange(r):
        row = s[i]
        mn, mx = np.inf, -np.inf
        for j in range(k):
            v = row[j]
            if v > -np.inf:
                mn = min(mn, v)
                mx = max(mx, v)
        scale = (BINS - 1) / (mx - mn) if mx > mn else 0.0
        counts = np.zeros(BINS, np.int64)
        for j in range(k):
            counts[_bin(row[j], mn, scale)] += 1
        b_hi, above_hi = _bin_of_rank(counts, hi - 1)
        b_lo, above_lo = _bin_of_rank(counts, lo - 1) if lo > 0 else (BINS, 0)
        in_hi = np.empty(counts[b_hi], row.dtype)
        in_lo = np.empty(counts[b_lo] if lo > 0 else 0, row.dtype)
        n_hi = n_lo = 0
        below = -np.inf  # the largest score in the bins under b_lo: all below high
        for j in range(k):
            v = row[j]
            b = _bin(v, mn, scale)
            if b == b_hi:
                in_hi[n_hi] = v
                n_hi += 1
            if b == b_lo:
                in_lo[n_lo] = v
                n_lo += 1
            elif b < b_lo:
                below = max(below, v)
        in_hi.sort()
        lo_v = in_hi[n_hi - 1 - (hi - 1 - above_hi)]  # descending rank within the bin
        if lo > 0:
            in_lo.sort()
            p = n_lo - 1 - (lo - 1 - above_lo)
            hi_v = in_lo[p]
            while p > 0 and in_lo[p - 1] == hi_v:
                p -= 1
            top = max(below, in_lo[p - 1]) if p > 0 else below  # the window's largest score
        else:
            hi_v, top = np.inf, mx
        low[i], high[i] = lo_v, hi_v
        if apply:
            m = max(top, s_pos[i])
            z = math.exp(s_pos[i] - m)
            for j in range(k):
                v = row[j]
                if v >= lo_v and v < hi_v:
                    e = math.exp(v - m)
                    row[j] = e
                    z += e
                else:
                    row[j] = 0.0
            m_out[i], z_out[i] = m, z


def _numba_rows(s: torch.Tensor) -> bool:
    return s.device.type == "cpu" and s.dtype in (torch.float32, torch.float64) and s.is_contiguous()


def _numba_select(s, lo, hi, s_pos, apply):
    # numba's own thread pool, as wide as torch's (a 1-thread benchmark stays one thread)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    a = s.detach().numpy()
    r = a.shape[0]
    low, high = np.empty(r, a.dtype), np.empty(r, a.dtype)
    m, z = np.empty(r, a.dtype), np.empty(r, np.float64)
    sp = np.zeros(r, a.dtype) if s_pos is None else s_pos.detach().contiguous().numpy()
    _select_rows(a, lo, hi, sp, low, high, m, z, apply)
    if not apply:
        return torch.from_numpy(low), torch.from_numpy(high)
    return torch.from_numpy(m), torch.from_numpy(z.astype(a.dtype))


def _topk_thresholds(s: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The hi largest, unsorted; their minimum is rank hi-1 and rank lo-1 the (hi - lo + 1)-th
    # smallest of them. 2.8x faster than two kthvalue calls over all K (measured on a 64 x 65,536
    # chunk, 1 thread: 40 vs 113 ms) and as exact.
    top_hi = torch.topk(s, hi, dim=1, sorted=False).values
    low = top_hi.min(1).values
    if lo == 0:
        return low, torch.full_like(low, float("inf"))
    return low, torch.kthvalue(top_hi, hi - lo + 1, dim=1).values


def _thresholds(s: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inclusive lower bound v_{hi-1}, exclusive upper bound v_{lo-1}) of each row of s (r, K):
    numba's histogram select on CPU, topk elsewhere (the torch path on CUDA)."""
    if _numba_rows(s):
        return _numba_select(s, lo, hi, None, False)
    return _topk_thresholds(s, lo, hi)


def _window_exp(s: torch.Tensor, lo: int, hi: int, s_pos: torch.Tensor):
    """In place: s (r, K) -> e = exp(s - m) on each row's window, 0 elsewhere. Returns m, the row's
    max over {s+} and its window, and z = exp(s+ - m) + sum e, so LSE = m + log z and the softmax
    weights are e / z."""
    if _numba_rows(s):
        return _numba_select(s, lo, hi, s_pos, True)
    s = _masked(s, *_topk_thresholds(s, lo, hi))
    m = torch.maximum(s.max(1).values, s_pos)
    s.sub_(m[:, None]).exp_()
    return m, s.sum(1).add_(torch.exp(s_pos - m))


def _chunks(n: int, k: int):
    step = _backend.rows_per_chunk(k)
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _masked(s: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """s with everything outside each row's window at -inf."""
    keep = (s >= low[:, None]) & (s < high[:, None])
    return s.masked_fill_(~keep, float("-inf"))


def _exclude(s: torch.Tensor, exclude: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor:
    """s (rows r0..r1) with each row's excluded column at -inf: ranked last, never in a window."""
    if exclude is not None:
        s.scatter_(1, exclude[r0:r1, None], float("-inf"))
    return s


def _score_rows(qs, cc, exclude, r0, r1, buf):
    """Rows r0..r1 of the scores q c^T / T into a reused buffer (no new pages per chunk)."""
    return _exclude(torch.mm(qs[r0:r1], cc.T, out=buf[: r1 - r0]), exclude, r0, r1)


# -- Triton kernels --------------------------------------------------------------------------------
# The window's two thresholds are found by a radix select over order-preserving uint32 keys of the
# fp32 scores (a float's bits, the sign bit flipped for positives and all bits for negatives, sort
# as the floats do): three passes over the scores with 12, 12 and 8 key bits, each adding to a
# per-row histogram (2 x N x 4,096 int32, the O(N) state) only the scores whose higher bits match
# the prefix chosen so far; between passes torch picks, per row and target rank, the digit whose
# cumulative count from the top crosses the rank (no host sync). After the last pass the prefix is
# the exact key of the target score. Then the info_nce passes run with the window mask. Every pass
# recomputes the scores with the same helper, tile shape and config (`_tile_config`), so the
# scores, hence the windows, are bit-identical between the select, forward and backward passes.
RADIX = (12, 12, 8)  # key bits per pass, most significant first
NBINS = 1 << max(RADIX)
_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32}
# No tuner: every launch passes the one config of _tile_config (the passes must tile the scores
# alike). kernels.compile_check compiles exactly that config per variant and checks the compiled
# shared memory and spills against the limits; the dot-kernel smem estimate does not bound the
# histogram pass (its atomics stage the key tile: 98-197 KB against the estimate's 83-165 KB).
_RING_CONFIGS = _backend.DOT_CONFIGS


@triton.jit
def _load_rows(ptr, idx, mask, D, stride, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(ptr + idx[:, None] * stride + offs_d[None, :], mask=mask[:, None] & (offs_d < D)[None, :],
                other=0.0)
    if UPCAST:  # the interpreter has no bf16 dot
        x = x.to(tl.float32)
    return x


@triton.jit
def _scores(a, b, rows, rmask, cols, cmask, excl_ptr, scale, HAS_EXCL: tl.constexpr,
            PRECISION: tl.constexpr):
    """The (rows x cols) tile of q c^T / T, -inf on padding columns and on each row's excluded one."""
    s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
    s = tl.where(cmask[None, :], s, float("-inf"))
    if HAS_EXCL:
        ex = tl.load(excl_ptr + rows, mask=rmask, other=-1)
        s = tl.where(cols[None, :] == ex[:, None], float("-inf"), s)
    return s


@triton.jit
def _window_mask(s, low_ptr, high_ptr, rows, rmask):
    low = tl.load(low_ptr + rows, mask=rmask, other=0.0)
    high = tl.load(high_ptr + rows, mask=rmask, other=0.0)
    return (s >= low[:, None]) & (s < high[:, None])


@triton_kernel(configs=_RING_CONFIGS, key=["N", "NC", "D"], cpu_config=_CPU_CONFIG)
def _ring_hist_kernel(q_ptr, c_ptr, excl_ptr, prefix_ptr, hist_ptr, N, NC, D, stride_q, stride_c, scale,
                 TILES, SHIFT: tl.constexpr, BITS: tl.constexpr, TARGETS: tl.constexpr, NB: tl.constexpr,
                 HAS_EXCL: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """hist[t, i, digit] += #{j : key_ij's bits above SHIFT + BITS == prefix[t, i]}, digit = the BITS
    bits at SHIFT. Program (row block, column split): split p takes column tiles p, p + splits, ..."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    a = _load_rows(q_ptr, rows, rmask, D, stride_q, BLOCK_D, UPCAST)
    for t_i in range(0, TILES):
        cols = (tl.program_id(1) + t_i * tl.num_programs(1)) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        b = _load_rows(c_ptr, cols, cmask, D, stride_c, BLOCK_D, UPCAST)
        s = _scores(a, b, rows, rmask, cols, cmask, excl_ptr, scale, HAS_EXCL, PRECISION)
        u = s.to(tl.uint32, bitcast=True)
        key = tl.where((u >> 31) != 0, ~u, u | 0x80000000)
        digit = ((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
        valid = rmask[:, None] & cmask[None, :]
        for t in tl.static_range(TARGETS):
            keep = valid
            if SHIFT + BITS < 32:
                prefix = tl.load(prefix_ptr + t * N + rows, mask=rmask, other=0)
                keep = keep & ((key >> (SHIFT + BITS)).to(tl.int64) == prefix[:, None])
            tl.atomic_add(hist_ptr + (t * N + rows[:, None]).to(tl.int64) * NB + digit, 1, mask=keep)


@triton_kernel(configs=_RING_CONFIGS, key=["N", "NC", "D"], cpu_config=_CPU_CONFIG)
def _ring_lse_kernel(q_ptr, c_ptr, excl_ptr, low_ptr, high_ptr, spos_ptr, lse_ptr, N, NC, D, stride_q,
                stride_c, scale, HAS_EXCL: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """LSE_i over {s+_i} and the window of row i (natural log), an online logsumexp over tiles."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    a = _load_rows(q_ptr, rows, rmask, D, stride_q, BLOCK_D, UPCAST)
    log2e = 1.4426950408889634
    m_i = tl.load(spos_ptr + rows, mask=rmask, other=0.0) * log2e  # seeded with the positive:
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)  # m = s+, l = exp2(0); m stays finite
    for start in range(0, NC, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        b = _load_rows(c_ptr, cols, cmask, D, stride_c, BLOCK_D, UPCAST)
        s = _scores(a, b, rows, rmask, cols, cmask, excl_ptr, scale, HAS_EXCL, PRECISION)
        s2 = tl.where(_window_mask(s, low_ptr, high_ptr, rows, rmask), s * log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)


@triton_kernel(configs=_RING_CONFIGS, key=["N", "NC", "D"], cpu_config=_CPU_CONFIG)
def _ring_softmax_c_kernel(q_ptr, c_ptr, excl_ptr, low_ptr, high_ptr, lse_ptr, out_ptr, N, NC, D,
                      stride_q, stride_c, stride_o, scale, HAS_EXCL: tl.constexpr,
                      BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out_i = sum_{j in W_i} p_ij c_j (row pass), p_ij = exp(s_ij - LSE_i)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    a = _load_rows(q_ptr, rows, rmask, D, stride_q, BLOCK_D, UPCAST)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NC, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        b = _load_rows(c_ptr, cols, cmask, D, stride_c, BLOCK_D, UPCAST)
        s = _scores(a, b, rows, rmask, cols, cmask, excl_ptr, scale, HAS_EXCL, PRECISION)
        keep = _window_mask(s, low_ptr, high_ptr, rows, rmask)
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        acc += tl.dot(p.to(b.dtype), b, input_precision=PRECISION)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + rows[:, None] * stride_o + offs_d[None, :], acc,
             mask=rmask[:, None] & (offs_d < D)[None, :])


@triton_kernel(configs=_RING_CONFIGS, key=["N", "NC", "D"], cpu_config=_CPU_CONFIG)
def _ring_softmax_t_q_kernel(q_ptr, c_ptr, excl_ptr, low_ptr, high_ptr, lse_ptr, out_ptr, N, NC, D,
                             stride_q, stride_c, stride_o, scale, HAS_EXCL: tl.constexpr,
                             SCORES_T: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out_j = sum_i p_ij q_i (column pass): a program owns BLOCK_N columns and walks the rows in
    the forward's (BLOCK_M x BLOCK_N) tiles; no atomics, so the result is deterministic.
    Default: the scores in the forward's orientation, dot(q, c^T), then p^T @ q, so the windows
    match bit for bit. SCORES_T (compiled IEEE fp32 only): that p^T operand, or q^T p, spilled 3-24
    KB at every tile on sm_90 (kernels.compile_check), so the tile is computed as dot(c, q^T),
    info_nce's layout. Triton lowers an IEEE dot to one fma chain per element, over d in order,
    so each score still has the forward's bits; the interpreter's numpy matmul does not promise
    that, so it keeps the default (a test runs SCORES_T there on scores that are exact)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < NC
    b = _load_rows(c_ptr, cols, cmask, D, stride_c, BLOCK_D, UPCAST)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < N
        a = _load_rows(q_ptr, rows, rmask, D, stride_q, BLOCK_D, UPCAST)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        if SCORES_T:
            low = tl.load(low_ptr + rows, mask=rmask, other=0.0)
            high = tl.load(high_ptr + rows, mask=rmask, other=0.0)
            s_t = tl.dot(b, tl.trans(a), input_precision=PRECISION) * scale  # (cols, rows)
            keep = cmask[:, None] & rmask[None, :] & (s_t >= low[None, :]) & (s_t < high[None, :])
            if HAS_EXCL:
                ex = tl.load(excl_ptr + rows, mask=rmask, other=-1)
                keep = keep & (cols[:, None] != ex[None, :])
            p_t = tl.where(keep, tl.exp(s_t - lse[None, :]), 0.0)
        else:
            s = _scores(a, b, rows, rmask, cols, cmask, excl_ptr, scale, HAS_EXCL, PRECISION)
            keep = _window_mask(s, low_ptr, high_ptr, rows, rmask) & rmask[:, None]
            p_t = tl.trans(tl.where(keep, tl.exp(s - lse[:, None]), 0.0))
        acc += tl.dot(p_t.to(a.dtype), a, input_precision=PRECISION)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + cols[:, None] * stride_o + offs_d[None, :], acc,
             mask=cmask[:, None] & (offs_d < D)[None, :])


def _tile_config(meta: dict, elem: int) -> triton.Config:
    """One config for every ring kernel of a call: the first "acc" tile of the operand class that
    fits (the backward's accumulator is the tightest), so all passes tile the scores alike."""
    for t in _backend.DOT_TILES[_backend.dot_class(meta, elem, "acc")]:
        cfg = _backend.tile_config(*t)
        if _backend.dot_smem_bytes(elem, t[0], t[1], meta["BLOCK_D"], t[3]) <= _backend.SMEM_LIMIT:
            return cfg
    raise RuntimeError(f"ring_nce: no tile fits for {meta}")


class _Launch:
    """The shared arguments of one call's ring kernels."""

    def __init__(self, q, c, exclude, temperature, precision):
        self.q, self.c, self.n, self.nc, self.d = q, c, q.shape[0], c.shape[0], q.shape[1]
        self.meta = _backend.dot_meta(q, precision)
        self.meta["HAS_EXCL"] = exclude is not None
        self.excl = exclude if exclude is not None else torch.empty(1, dtype=torch.long, device=q.device)
        self.scale = 1.0 / temperature
        self.cfg = _tile_config(self.meta, q.element_size())  # CUDA; the interpreter takes _CPU_CONFIG
        self.interpreted = _backend.interpreted(q)
        tile = _CPU_CONFIG if self.interpreted else self.cfg.kwargs
        self.bm, self.bn = tile["BLOCK_M"], tile["BLOCK_N"]

    def __call__(self, kernel, grid, *args, **constexprs):
        head = (self.q, self.c, self.excl)
        kernel(grid, *head, *args, **constexprs, **self.meta, config=self.cfg)

    def rows(self):
        return (triton.cdiv(self.n, self.bm),)


def _radix_step(hist: torch.Tensor, rank: torch.Tensor, prefix: torch.Tensor, bits: int):
    """Per (target, row): the digit of `bits` bits whose cumulative count from the top crosses the
    remaining descending rank; returns (rank within that digit, prefix extended by it)."""
    nb = 1 << bits
    cum = hist[..., :nb].flip(-1).cumsum(-1)  # counts of the top 1, 2, ... digits
    d_desc = (cum <= rank[..., None]).sum(-1)  # digits wholly above the rank
    above = torch.where(d_desc > 0, cum.gather(-1, (d_desc - 1).clamp(min=0)[..., None])[..., 0], 0)
    return rank - above, (prefix << bits) | (nb - 1 - d_desc)


def _float_of_key(key: torch.Tensor) -> torch.Tensor:
    """fp32 scores from their uint32 keys (held in int64)."""
    bits = torch.where(key >= 1 << 31, key - (1 << 31), (1 << 32) - 1 - key)
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def _select_triton(launch: _Launch, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) of every row: the scores of descending ranks hi-1 and lo-1 (+inf at lo = 0)."""
    n, dev = launch.n, launch.q.device
    targets = 2 if lo > 0 else 1
    rank = torch.tensor([hi - 1, lo - 1][:targets], device=dev)[:, None].expand(targets, n).contiguous()
    prefix = torch.zeros(targets, n, dtype=torch.long, device=dev)
    hist = torch.empty(targets, n, NBINS, dtype=torch.int32, device=dev)
    # column splits: enough programs to fill a GPU (2 in the interpreter, to exercise the striding)
    splits = 2 if launch.interpreted else max(1, min(triton.cdiv(launch.nc, launch.bn),
                                                    1024 // launch.rows()[0]))
    tiles = triton.cdiv(triton.cdiv(launch.nc, launch.bn), splits)
    shift = 32
    for p, bits in enumerate(RADIX):
        shift -= bits
        t_here = 1 if p == 0 else targets  # the first pass's histogram serves both targets
        hist.zero_()
        launch(_ring_hist_kernel, (launch.rows()[0], splits), prefix, hist, n, launch.nc, launch.d,
               launch.q.stride(0), launch.c.stride(0), launch.scale, tiles, SHIFT=shift, BITS=bits,
               TARGETS=t_here, NB=NBINS)
        h = hist[:1].expand(targets, n, NBINS) if p == 0 else hist
        rank, prefix = _radix_step(h, rank, prefix, bits)
    vals = _float_of_key(prefix)
    high = vals[1] if lo > 0 else torch.full((n,), float("inf"), device=dev)
    return vals[0].contiguous(), high.contiguous()


def _lse_triton(launch: _Launch, low, high, s_pos):
    lse = torch.empty(launch.n, device=launch.q.device, dtype=torch.float32)
    launch(_ring_lse_kernel, launch.rows(), low, high, s_pos, lse, launch.n, launch.nc, launch.d,
           launch.q.stride(0), launch.c.stride(0), launch.scale)
    return lse


def _softmax_c_triton(launch: _Launch, low, high, lse):
    out = torch.empty(launch.n, launch.d, device=launch.q.device, dtype=torch.float32)
    launch(_ring_softmax_c_kernel, launch.rows(), low, high, lse, out, launch.n, launch.nc, launch.d,
           launch.q.stride(0), launch.c.stride(0), out.stride(0), launch.scale)
    return out


def compiled_scores_t(precision: str, elem: int) -> bool:
    """Whether the compiled column pass takes the transposed score tile (IEEE fp32 operands)."""
    return precision == "ieee" and elem == 4


SCORES_T_INTERPRETED = False  # tests set it to run the compiled IEEE layout in the interpreter


def _softmax_t_q_triton(launch: _Launch, low, high, lse):
    out = torch.empty(launch.nc, launch.d, device=launch.q.device, dtype=torch.float32)
    scores_t = compiled_scores_t(launch.meta["PRECISION"], launch.q.element_size()) and (
        SCORES_T_INTERPRETED or not launch.interpreted)
    launch(_ring_softmax_t_q_kernel, (triton.cdiv(launch.nc, launch.bn),), low, high, lse, out, launch.n,
           launch.nc, launch.d, launch.q.stride(0), launch.c.stride(0), out.stride(0), launch.scale,
           SCORES_T=scores_t)
    return out


class _RingNCE(torch.autograd.Function):
    # Torch path: gradients are formed in forward, chunk by chunk, while each chunk's softmax
    # weights are at hand: a = sum_j p_ij c_j (N x d) and, for in-batch candidates, sum_i p_ij q_i
    # (K x d). The loss is linear in grad_out, so backward only scales them: O((N + K) d) saved, and
    # the N x K scores are computed once per step instead of again in backward (on CPU the matmul
    # is most of the time). Forward-only calls (no grad) skip those sums.
    # Triton path: the radix select, the LSE pass; backward recomputes the tiles (a GPU's matmuls are
    # cheap next to its memory traffic) with the saved thresholds.
    @staticmethod
    def forward(ctx, q, k, c, temperature, lo, hi, dot_dt, exclude, needs, triton_path, precision):
        ctx.in_dtypes = (q.dtype, k.dtype, c.dtype)
        ctx.temperature, ctx.triton_path, ctx.precision, ctx.needs = temperature, triton_path, precision, needs
        with _backend.no_autocast(q.device):
            # operands rounded once per the kernels' precision contract (_backend.dot_dtype), the
            # dots accumulated in fp32: the ranks are those of the rounded operands' scores
            q, k, c = (t.detach().to(dot_dt) for t in (q, k, c))
            if triton_path:
                s_pos = (q.float() * k.float()).sum(1) / temperature
                launch = _Launch(q, c, exclude, temperature, precision)
                low, high = _select_triton(launch, lo, hi)
                lse = _lse_triton(launch, low, high, s_pos)
                ctx.save_for_backward(q, k, c, exclude, lse, s_pos, low, high)
                return (lse - s_pos).mean()
            lse, s_pos, a, dc, qc, kc = _RingNCE._torch_forward(q, k, c, temperature, lo, hi, exclude, needs)
        if any(needs):
            ctx.save_for_backward(qc, kc, a, dc, lse, s_pos)
        return (lse - s_pos).mean()

    @staticmethod
    def _torch_forward(q, k, c, temperature, lo, hi, exclude, needs):
        ct = _backend.compute_dtype(q, k, c)
        qc, kc, cc = q.to(ct), k.to(ct), c.to(ct)
        qs = qc / temperature
        s_pos = (qs * kc).sum(1)
        n, nk = q.shape[0], c.shape[0]
        grad, need_c = any(needs), needs[2]
        lse = torch.empty(n, device=q.device, dtype=ct)
        a = torch.empty_like(qc) if grad else None
        dc = torch.zeros_like(cc) if need_c else None
        buf = torch.empty(min(n, _backend.rows_per_chunk(nk)), nk, device=q.device, dtype=ct)
        for r0, r1 in _chunks(n, nk):
            e = _score_rows(qs, cc, exclude, r0, r1, buf)
            m, z = _window_exp(e, lo, hi, s_pos[r0:r1])
            lse[r0:r1] = m + torch.log(z)
            if grad:
                inv = z.reciprocal_()[:, None]
                a[r0:r1] = (e @ cc).mul_(inv)  # sum_j p_ij c_j, p = e / z
                if need_c:
                    dc.addmm_(e.T, qc[r0:r1] * inv)  # sum_i p_ij q_i
        return lse, s_pos, a, dc, qc, kc

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.triton_path:
            q, k, c, exclude, lse, s_pos, low, high = ctx.saved_tensors
            with _backend.no_autocast(q.device):
                launch = _Launch(q, c, exclude, ctx.temperature, ctx.precision)
                a = _softmax_c_triton(launch, low, high, lse)
                dc = _softmax_t_q_triton(launch, low, high, lse) if ctx.needs[2] else None
            qc, kc = q.float(), k.float()
        else:
            qc, kc, a, dc, lse, s_pos = ctx.saved_tensors
        scale = grad_out.to(lse.dtype) / (qc.shape[0] * ctx.temperature)
        w = (torch.exp(s_pos - lse) - 1.0)[:, None]  # p+ - 1
        dq = scale * (a + w * kc)
        dk = scale * w * qc
        q_dt, k_dt, c_dt = ctx.in_dtypes
        return (dq.to(q_dt), dk.to(k_dt), None if dc is None else (scale * dc).to(c_dt),
                None, None, None, None, None, None, None, None)


def _check(q, k, candidates, temperature, exclude, backend):
    if q.dim() != 2 or (k is not None and k.shape != q.shape):
        raise ValueError(f"q and k must both be (N, d), got {tuple(q.shape)} and {None if k is None else tuple(k.shape)}")
    if candidates.dim() != 2 or candidates.shape[1] != q.shape[1] or candidates.shape[0] < 1:
        raise ValueError(f"candidates must be (K >= 1, {q.shape[1]}), got {tuple(candidates.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if backend not in _backend.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_backend.BACKENDS}")
    if exclude is not None and (exclude.shape != (q.shape[0],) or exclude.dtype != torch.long):
        raise ValueError(f"exclude must be int64 ({q.shape[0]},), got {exclude.dtype} {tuple(exclude.shape)}")


def _window_of(candidates, exclude, lower, upper):
    """[lo, hi) over the candidates each row ranks (one fewer with `exclude`)."""
    k = candidates.shape[0] - (exclude is not None)
    lo, hi = window(k, lower, upper)
    if hi <= lo:
        raise ValueError(f"the window [{lower}, {upper}) of {k} candidates holds no rank (floor gives [{lo}, {hi}))")
    return lo, hi


@torch.no_grad()
def ring_sample(q: torch.Tensor, candidates: torch.Tensor, temperature: float, lower: float, upper: float,
                num: int, *, exclude: torch.Tensor | None = None, generator: torch.Generator | None = None,
                precision: str = "auto") -> torch.Tensor:
    """(N, m) int64: for each row of q, m = min(num, window size) candidate indices drawn uniformly
    without replacement from its rank window [floor(lower K), floor(upper K)) (IR-Ring: 4,095 of
    them). The scores, rounding and thresholds are ring_nce's; the draw gives every window member a
    random key from `generator` and keeps the m largest, chunk by chunk (no N x K matrix), so the
    same generator state gives the same indices."""
    _check(q, None, candidates, temperature, exclude, "torch")
    lo, hi = _window_of(candidates, exclude, lower, upper)
    m = min(int(num), hi - lo)
    if m < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    dot_dt, _ = _backend.dot_dtype(precision, q, candidates)
    with _backend.no_autocast(q.device):
        q, c = (t.detach().to(dot_dt) for t in (q, candidates))
        ct = _backend.compute_dtype(q, c)
        qs, cc = q.to(ct) / temperature, c.to(ct)
        out = torch.empty(q.shape[0], m, dtype=torch.long, device=q.device)
        for r0, r1 in _chunks(q.shape[0], c.shape[0]):
            s = _exclude(qs[r0:r1] @ cc.T, exclude, r0, r1)
            low, high = _thresholds(s, lo, hi)
            keep = (s >= low[:, None]) & (s < high[:, None])
            u = torch.rand(s.shape, generator=generator, device=s.device, dtype=torch.float32)
            out[r0:r1] = u.masked_fill_(~keep, -1.0).topk(m, dim=1, sorted=False).indices
    return out


@_backend.opaque_to_compile
def ring_nce(q: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, temperature: float,
             lower: float = 0.0, upper: float = 1.0, *, exclude: torch.Tensor | None = None,
             num_negatives: int = 0, generator: torch.Generator | None = None, precision: str = "auto",
             backend: str = "auto") -> torch.Tensor:
    """InfoNCE of queries q (N, d) against their keys k (N, d) with, per row, the negatives of
    similarity rank floor(lower K) <= r < floor(upper K) among the K candidates (K, d) (rank 0 the
    most similar): the Ball (lower = 0), the Ring (lower > 0), plain InfoNCE at (0, 1). Returns
    the mean loss, a 0-dim float32 tensor (float64 for float64 inputs). Gradients reach q, k and
    the candidates when they require grad (in-batch candidates); the selection is constant. Inputs
    are used as given (normalise them first for cosine similarity). The window is exact for distinct
    scores; tied scores at a boundary are all kept or all left out together.
    exclude: (N,) int64, a candidate column per row that row never ranks (in-batch use: the anchor
    itself); the window is then over K - 1 candidates.
    num_negatives: > 0 draws that many of each row's window uniformly (ring_sample, from `generator`)
    and scores only them (kernels.bank_nce over the drawn rows); for buffers (a bank, a queue): k and
    the candidates get no gradient there.
    precision: the dot operands' precision, as for the other kernels (kernels._backend.dot_dtype):
    "auto" rounds fp32 inputs to bf16 under torch.autocast.
    backend: "auto" (Triton on CUDA, the chunked torch path on CPU), "triton" (the interpreter on
    CPU; fp32 / bf16 / fp16, d <= 256), "torch" (any device, float64 too).
    """
    _check(q, k, candidates, temperature, exclude, backend)
    lo, hi = _window_of(candidates, exclude, lower, upper)
    if num_negatives:
        if k.requires_grad or candidates.requires_grad:
            raise ValueError("ring_nce(num_negatives=...) scores drawn rows of a buffer: pass k and candidates "
                             "without gradients (detach them), or use every window member (num_negatives=0)")
        from .bank_nce import bank_nce
        idx = ring_sample(q, candidates, temperature, lower, upper, num_negatives, exclude=exclude,
                          generator=generator, precision=precision)
        rows = torch.cat([candidates, k.to(candidates.dtype)])
        pos = candidates.shape[0] + torch.arange(q.shape[0], device=q.device)
        return bank_nce(q, rows, pos, idx, temperature, "softmax").loss
    triton_path = _backend.use_triton(backend, q, k, candidates)
    if triton_path:
        _backend.check_triton_inputs(q.shape[1], q, k, candidates)
        q, k, candidates = (t if t.stride(1) == 1 else t.contiguous() for t in (q, k, candidates))
    dot_dt, prec = _backend.dot_dtype(precision, q, k, candidates)
    needs = tuple(torch.is_grad_enabled() and t.requires_grad for t in (q, k, candidates))
    return _RingNCE.apply(q, k, candidates, float(temperature), lo, hi, dot_dt, exclude, needs,
                          triton_path, prec)


def ring_nce_ref(q: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, temperature: float,
                 lower: float = 0.0, upper: float = 1.0, *, exclude: torch.Tensor | None = None,
                 upcast: bool = False) -> torch.Tensor:
    """Plain torch: the N x K logits, a full sort per row, the window by rank; `upcast`: float64.
    `exclude`: each row's excluded column sorts last (-inf), the window is over K - 1."""
    if upcast:
        q, k, candidates = q.double(), k.double(), candidates.double()
    K = candidates.shape[0]
    lo, hi = window(K - (exclude is not None), lower, upper)
    s = q @ candidates.T / temperature
    if exclude is not None:
        s = s.scatter(1, exclude[:, None], float("-inf"))
    order = torch.argsort(s, dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(K, device=s.device).expand_as(order).contiguous())
    keep = (ranks >= lo) & (ranks < hi)
    s_pos = (q * k).sum(1) / temperature
    logits = torch.cat([s_pos[:, None], s.masked_fill(~keep, float("-inf"))], 1)
    return (torch.logsumexp(logits, 1) - s_pos).mean()

"""Per-sample augmentation parameters as a pure function of (seed, epoch, global index, stream).

Every random number a view uses is `uniform(key, slot)` with `key = hash(seed, epoch, index, stream)`
(a splitmix64 chain) and a fixed slot per decision. So a sample's views do not depend on batch size,
worker scheduling, rank, or where a run was resumed: the same (seed, epoch, index) gives the same views
in every backend. The crop sampler is a numba function because the ffcv backend calls it inside its JIT
decoder (`ffcv_backend`); the DALI backend and the tests call the very same function from Python.

Slots (per key):  0-19 RandomResizedCrop attempts (area, log-ratio) x 10 | 20-21 crop position |
22 flip | 23 jitter on | 24-27 jitter factors b, c, s, h | 28-31 jitter order keys | 32 grayscale |
33 blur on | 34 blur sigma | 35 solarize | 40 + 2k, 41 + 2k RandAugment op k (choice, sign)
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from pipeline.views.spec import RecipeSpec, ViewSpec

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

CROP_RANDOM, CROP_CENTER = 0, 1
S_FLIP, S_JIT_ON, S_JIT, S_JIT_ORDER, S_GRAY, S_BLUR_ON, S_SIGMA, S_SOLAR, S_RA = 22, 23, 24, 28, 32, 33, 34, 35, 40


@njit(cache=True, inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def sample_key(seed, epoch, index, stream):
    """The random key of (seed, epoch, global index, stream); all four are non-negative integers."""
    k = _mix(np.uint64(seed) + _GOLDEN)
    k = _mix(k ^ (np.uint64(epoch) + _GOLDEN))
    k = _mix(k ^ (np.uint64(index) + _GOLDEN))
    return _mix(k ^ (np.uint64(stream) + _GOLDEN))


@njit(cache=True)
def uniform(key, slot):
    """U[0, 1) with 53 random bits, a pure function of (key, slot)."""
    z = _mix(np.uint64(key) ^ ((np.uint64(slot) + np.uint64(1)) * _GOLDEN))
    return float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def crop_box(key, width, height, kind, smin, smax, rmin, rmax, center_fraction):
    """(top, left, h, w) in source pixels. kind 0: torchvision's RandomResizedCrop.get_params (10
    attempts, then a center crop clamped to the ratio range); kind 1: centered square of
    center_fraction x the shorter side."""
    if kind == 1:
        c = max(1, int(round(min(width, height) * center_fraction)))
        return (height - c) // 2, (width - c) // 2, c, c
    area = float(width) * float(height)
    lr0, lr1 = math.log(rmin), math.log(rmax)
    for a in range(10):
        target = area * (smin + (smax - smin) * uniform(key, 2 * a))
        aspect = math.exp(lr0 + (lr1 - lr0) * uniform(key, 2 * a + 1))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = min(int(uniform(key, 20) * (height - h + 1)), height - h)
            j = min(int(uniform(key, 21) * (width - w + 1)), width - w)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < rmin:
        w = width
        h = int(round(w / rmin))
    elif in_ratio > rmax:
        h = height
        w = int(round(h * rmax))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True)
def _batch(seed, epoch, indices, stream, widths, heights, kind, smin, smax, rmin, rmax, cf, nslots):
    n = indices.shape[0]
    boxes = np.empty((n, 4), np.int64)
    u = np.empty((n, nslots), np.float64)
    for b in range(n):
        key = sample_key(seed, epoch, indices[b], stream)
        y, x, h, w = crop_box(key, widths[b], heights[b], kind, smin, smax, rmin, rmax, cf)
        boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3] = y, x, h, w
        for s in range(nslots):
            u[b, s] = uniform(key, s)
    return boxes, u


def crop_args(view: ViewSpec) -> tuple:
    c = view.crop
    return (CROP_CENTER if c.kind == "center" else CROP_RANDOM, float(c.scale[0]), float(c.scale[1]),
            float(c.ratio[0]), float(c.ratio[1]), float(c.center_fraction))


def view_params(view: ViewSpec, seed: int, epoch: int, stream: int, indices, widths, heights) -> dict:
    """The parameter record of one view for a batch of samples: numpy arrays, one row per sample.

    crop (B, 4) int64 top, left, h, w | flip (B,) bool | jitter_on (B,) bool | jitter (B, 4) float64
    brightness, contrast, saturation factors and hue shift (identity 1, 1, 1, 0 when off) |
    jitter_order (B, 4) int64 (0 b, 1 c, 2 s, 3 h) | gray (B,) bool | blur_sigma (B,) float64 (0: no
    blur) | solarize (B,) bool | ra_ops (B, n) int64 into spec.randaugment.ops | ra_mag (B, n) float64
    signed magnitude in [-1, 1] | size (B, 2) int64 source height, width
    """
    indices = np.ascontiguousarray(indices, np.int64)
    widths = np.ascontiguousarray(widths, np.int64)
    heights = np.ascontiguousarray(heights, np.int64)
    if (indices < 0).any():
        raise ValueError("global indices must be >= 0")
    ra = view.randaugment
    nslots = S_RA + (2 * ra.num_ops if ra else 0)
    boxes, u = _batch(int(seed), int(epoch), indices, int(stream), widths, heights, *crop_args(view), nslots)
    n = len(indices)
    rec = {"crop": boxes, "flip": u[:, S_FLIP] < view.flip_p, "size": np.stack([heights, widths], 1)}
    jit = view.jitter
    rec["jitter"] = np.tile(np.array([1.0, 1.0, 1.0, 0.0]), (n, 1))
    rec["jitter_order"] = np.tile(np.arange(4), (n, 1))
    rec["jitter_on"] = np.zeros(n, bool)
    if jit is not None:
        on = u[:, S_JIT_ON] < jit.p
        lo = np.array([max(0.0, 1 - jit.brightness), max(0.0, 1 - jit.contrast), max(0.0, 1 - jit.saturation),
                       -jit.hue])
        hi = np.array([1 + jit.brightness, 1 + jit.contrast, 1 + jit.saturation, jit.hue])
        f = lo + (hi - lo) * u[:, S_JIT:S_JIT + 4]
        rec["jitter"] = np.where(on[:, None], f, rec["jitter"])
        rec["jitter_on"] = on
        if jit.random_order:
            rec["jitter_order"] = np.argsort(u[:, S_JIT_ORDER:S_JIT_ORDER + 4], axis=1, kind="stable")
    rec["gray"] = u[:, S_GRAY] < view.grayscale_p
    rec["blur_sigma"] = np.zeros(n)
    if view.blur is not None:
        s0, s1 = view.blur.sigma
        rec["blur_sigma"] = np.where(u[:, S_BLUR_ON] < view.blur.p, s0 + (s1 - s0) * u[:, S_SIGMA], 0.0)
    rec["solarize"] = u[:, S_SOLAR] < view.solarize_p
    if ra is not None:
        ch = u[:, S_RA::2][:, :ra.num_ops]
        sg = u[:, S_RA + 1::2][:, :ra.num_ops]
        rec["ra_ops"] = np.minimum((ch * len(ra.ops)).astype(np.int64), len(ra.ops) - 1)
        rec["ra_mag"] = np.where(sg < 0.5, -1.0, 1.0) * (ra.magnitude / (ra.num_bins - 1))
    return rec


def sample_params(recipe: RecipeSpec, seed: int, epoch: int, indices, widths, heights) -> list[dict]:
    """One record per view of `recipe` (see `view_params`); shared recipes repeat view 0's record."""
    out, cache = [], {}
    for v, view in enumerate(recipe.views):
        stream = recipe.param_stream(v)
        if stream not in cache:
            cache[stream] = view_params(view, seed, epoch, stream, indices, widths, heights)
        out.append(cache[stream])
    return out

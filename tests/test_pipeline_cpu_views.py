"""pipeline.views.cpu_views (the per-image CPU executor) against pipeline.views.torch_ops (the batched reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.views import torch_ops
from pipeline.loaders.prefetch import streams
from pipeline.views.cpu_views import CpuViews, empty, gaussian_taps, needs_torch, resize
from pipeline.views.params import sample_params
from pipeline.views.recipes import get_recipe


def _images(rng, n, lo=40, hi=400):
    """Smooth random images (a few low-frequency waves + noise), like photographs rather than static."""
    out = []
    for _ in range(n):
        h, w = rng.integers(lo, hi, 2)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        chans = [np.sin(rng.uniform(2, 12) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 12) * yy) for _ in range(3)]
        img = 127.5 + 100 * np.stack(chans, -1) + rng.normal(0, 8, (h, w, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.mark.parametrize("recipe,size,seed", [("simclr", 64, 0), ("byol", 48, 1), ("mocov2", 56, 2),
                                              ("eval", 40, 3), ("simclr", 224, 4)])
def test_views_match_torch_ops(recipe, size, seed):
    """Same records, same uint8 crops: the executor's finished views equal torch_ops' within uint8 rounding
    (colour and blur are rounded to uint8 here, kept in float32 there)."""
    rng = np.random.default_rng(seed)
    spec = get_recipe(recipe, size)
    n = 24
    imgs = _images(rng, n)
    hs, ws = np.array([i.shape[0] for i in imgs]), np.array([i.shape[1] for i in imgs])
    params = sample_params(spec, seed, 0, np.arange(n) + 100 * seed, ws, hs)
    st = streams(spec)
    ex = CpuViews(spec, num_threads=2)
    try:
        views, left = ex.run(imgs, params, st)
        crops = {s: np.stack([resize(imgs[i], params[v]["crop"][i], spec.views[v].size) for i in range(n)])
                 for s, v in st.items()}
    finally:
        ex.close()
    assert not left  # these recipes have no torch-only views
    for v, view in enumerate(spec.views):
        ref = torch_ops.to_output(torch_ops.photometric(torch.from_numpy(crops[spec.param_stream(v)]),
                                                        params[v], view), view.color)
        got = views[v]
        assert got.shape == ref.shape and got.dtype == torch.float32
        err = ((got - ref) * torch.tensor(view.color.std)[None, :, None, None]).abs()  # back to [0, 1] units
        assert err.max() < 4 / 255, (v, err.max() * 255)
        assert err.mean() < 0.6 / 255, (v, err.mean() * 255)
        # the ops did act: nothing changes without an op, and most ops change something (a blur with
        # sigma ~0.1 or a jitter with factors ~1 may not)
        bare = torch_ops.to_output(torch.from_numpy(crops[spec.param_stream(v)]).permute(0, 3, 1, 2) / 255,
                                   view.color)
        changed = (got - bare).abs().flatten(1).amax(1) > 0.05
        p = params[v]
        acted = p["flip"] | p["jitter_on"] | p["gray"] | (p["blur_sigma"] > 0) | p["solarize"]
        acted = torch.from_numpy(acted)
        assert not (changed & ~acted).any() and changed.sum() >= 0.8 * acted.sum(), (changed, acted)


def test_torch_only_views_are_left_to_torch_ops():
    spec = get_recipe("cmc_lab", 32)
    assert all(needs_torch(v) for v in spec.views)
    assert not needs_torch(get_recipe("simclr", 32).views[0])
    rng = np.random.default_rng(5)
    imgs = _images(rng, 6)
    params = sample_params(spec, 0, 0, np.arange(6), np.array([i.shape[1] for i in imgs]),
                           np.array([i.shape[0] for i in imgs]))
    ex = CpuViews(spec)
    try:
        views, crops = ex.run(imgs, params, streams(spec))
    finally:
        ex.close()
    assert views == {} and set(crops) == {0}
    assert crops[0].shape == (6, 32, 32, 3) and crops[0].dtype == np.uint8


@pytest.mark.parametrize("h,w,size", [(30, 20, 64), (64, 64, 64), (100, 90, 32), (480, 400, 224), (7, 300, 32)])
def test_resize_matches_torch_antialias(h, w, size):
    """Bilinear, antialiased when shrinking, half-pixel centres: torch's float computation is the reference."""
    rng = np.random.default_rng(h * w)
    img = _images(rng, 1, lo=max(h, w) + 1, hi=max(h, w) + 2)[0]
    box = (3, 1, h, w)
    got = resize(img, box, size).astype(np.float32)
    src = torch.from_numpy(img[3:3 + h, 1:1 + w].astype(np.float32)).permute(2, 0, 1)[None]
    ref = F.interpolate(src, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    ref = ref[0].permute(1, 2, 0).numpy()
    assert got.shape == (size, size, 3)
    assert np.abs(got - ref).max() <= 1.5, np.abs(got - ref).max()


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.9, 2.0])
def test_truncated_taps_equal_the_full_kernel(sigma):
    k = gaussian_taps(sigma, 23)
    r = 11
    t = np.arange(-r, r + 1)
    full = np.exp(-0.5 * (t / sigma) ** 2)
    full /= full.sum()
    pad = (23 - len(k)) // 2
    assert len(k) % 2 == 1 and len(k) <= 23
    assert np.abs(np.pad(k, pad) - full).max() < 1e-6


def test_empty_is_a_usable_tensor():
    t = empty((8, 3, 224, 224))  # 4.8 MB: huge-page backed
    assert t.shape == (8, 3, 224, 224) and t.dtype == torch.float32 and t.is_contiguous()
    t.fill_(2.0)
    v = t[3]
    del t
    assert float(v.sum()) == 2.0 * 3 * 224 * 224  # the mapping outlives the batch tensor through its views
    small = empty((2, 3), torch.uint8)
    assert small.dtype == torch.uint8 and small.shape == (2, 3)


@pytest.mark.parametrize("keep_as", ["tensor", "view", "numpy", "none"])
def test_empty_reuses_a_region_only_when_nothing_holds_it(keep_as):
    shape = (8, 3, 224, 224)  # 4.8 MB: from the huge-page pool
    a = empty(shape)
    a.fill_(7.0)
    held = {"tensor": a, "view": a[2:5], "numpy": a.numpy()[1], "none": None}[keep_as]
    ptr = a.data_ptr()
    del a
    b = empty(shape)  # while `held` lives, the region must not be handed out again
    if keep_as == "none":
        assert b.data_ptr() == ptr  # reused: already mapped, no page faults
    else:
        assert b.data_ptr() != ptr
        b.fill_(-1.0)
        assert float(torch.as_tensor(held).min()) == 7.0  # the held batch is intact
    del held, b
    assert empty(shape).data_ptr() == ptr

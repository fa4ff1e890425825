"""The view spec, the pure parameter function and the epoch sampler (numpy only, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.views.params import crop_box, sample_key, sample_params, uniform
from pipeline.views.recipes import RECIPES, get_recipe
from pipeline.loaders.sampler import EpochSampler
from pipeline.views.spec import BlurSpec, ColorSpec, CropSpec, JitterSpec, RandAugmentSpec, RecipeSpec, ViewSpec

N = 20000
W, H = 500, 375


def _draw(recipe, n=N, seed=0, epoch=0, w=W, h=H):
    return sample_params(recipe, seed, epoch, np.arange(n), np.full(n, w), np.full(n, h))


def _rate_ok(x: np.ndarray, p: float) -> None:
    """Observed rate within 5 binomial sigma of p."""
    sd = math.sqrt(max(p * (1 - p), 1e-12) / len(x))
    assert abs(x.mean() - p) <= 5 * sd + 1e-12, (x.mean(), p)


@pytest.mark.parametrize("name", list(RECIPES))
def test_rates_match_the_spec(name):
    recipe = get_recipe(name)
    recs = _draw(recipe)
    for view, rec in zip(recipe.views, recs):
        _rate_ok(rec["flip"], view.flip_p)
        _rate_ok(rec["gray"], view.grayscale_p)
        _rate_ok(rec["solarize"], view.solarize_p)
        _rate_ok(rec["jitter_on"], view.jitter.p if view.jitter else 0.0)
        _rate_ok(rec["blur_sigma"] > 0, view.blur.p if view.blur else 0.0)
        if view.blur:
            s = rec["blur_sigma"][rec["blur_sigma"] > 0]
            lo, hi = view.blur.sigma
            assert s.min() >= lo and s.max() <= hi
            assert abs(s.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * len(s))


@pytest.mark.parametrize("name", ["simclr", "mocov2", "byol", "infomin"])
def test_jitter_ranges_and_order(name):
    recipe = get_recipe(name)
    j = recipe.views[0].jitter
    rec = _draw(recipe)[0]
    f = rec["jitter"][rec["jitter_on"]]
    lo = np.array([max(0, 1 - j.brightness), max(0, 1 - j.contrast), max(0, 1 - j.saturation), -j.hue])
    hi = np.array([1 + j.brightness, 1 + j.contrast, 1 + j.saturation, j.hue])
    assert (f >= lo).all() and (f <= hi).all()
    # uniform on [lo, hi]: mean and variance within sampling error, the ends are reached
    sd_mean = (hi - lo) / math.sqrt(12 * len(f))
    assert (np.abs(f.mean(0) - (lo + hi) / 2) < 5 * sd_mean).all()
    assert np.allclose(f.var(0), (hi - lo) ** 2 / 12, rtol=0.05)
    assert (f.min(0) - lo < 0.01 * (hi - lo)).all() and (hi - f.max(0) < 0.01 * (hi - lo)).all()
    off = rec["jitter"][~rec["jitter_on"]]
    assert (off == [1, 1, 1, 0]).all()
    # random order: every op first in about a quarter of the samples
    first = rec["jitter_order"][:, 0]
    for k in range(4):
        _rate_ok(first == k, 0.25)
    assert (np.sort(rec["jitter_order"], 1) == np.arange(4)).all()


def _reference_rrc(rng, width, height, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed with a numpy generator."""
    area = width * height
    log_ratio = np.log(ratio)
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("name,view,size", [("simclr", 0, (500, 375)), ("mocov2", 0, (300, 900)),
                                            ("multicrop", 5, (640, 480)), ("cmc_lab", 0, (200, 200))])
def test_crop_distribution_matches_torchvision(name, view, size):
    v = get_recipe(name).views[view]
    w, h = size
    rec = _draw(get_recipe(name), w=w, h=h)[view]
    box = rec["crop"]
    assert (box[:, 0] >= 0).all() and (box[:, 1] >= 0).all()
    assert (box[:, 0] + box[:, 2] <= h).all() and (box[:, 1] + box[:, 3] <= w).all()
    rng = np.random.default_rng(123)
    ref = np.array([_reference_rrc(rng, w, h, v.crop.scale, v.crop.ratio) for _ in range(N)])
    for name_, f in (("area", lambda b: b[:, 2] * b[:, 3] / (w * h)),
                     ("aspect", lambda b: np.log(b[:, 3] / b[:, 2])),
                     ("centre_x", lambda b: (b[:, 1] + b[:, 3] / 2) / w)):
        a, r = f(box), f(ref)
        sd = math.sqrt(a.var() / N + r.var() / N)
        assert abs(a.mean() - r.mean()) < 5 * sd, (name_, a.mean(), r.mean())
        # two-sample Kolmogorov-Smirnov at a very small alpha
        grid = np.sort(np.concatenate([a, r]))
        ks = np.abs(np.searchsorted(np.sort(a), grid, "right") - np.searchsorted(np.sort(r), grid, "right")).max() / N
        assert ks < 1.95 * math.sqrt(2 / N) * 1.5, (name_, ks)


def test_params_are_a_pure_function():
    r = get_recipe("infomin")
    idx = np.array([5, 17, 3, 99])
    a = sample_params(r, 7, 2, idx, np.full(4, 300), np.full(4, 200))
    b = sample_params(r, 7, 2, idx[::-1], np.full(4, 300), np.full(4, 200))  # order and batching do not matter
    for ra, rb in zip(a, b):
        for k in ra:
            assert np.array_equal(ra[k], rb[k][::-1]), k
    c = sample_params(r, 7, 3, idx, np.full(4, 300), np.full(4, 200))
    assert not np.array_equal(a[0]["crop"], c[0]["crop"])  # the epoch changes the draw
    assert not np.array_equal(a[0]["crop"], a[1]["crop"])  # so does the view
    k = np.uint64(sample_key(7, 2, 5, 0))
    assert crop_box(k, 300, 200, 0, 0.08, 1.0, 0.75, 4 / 3, 0.875) == tuple(a[0]["crop"][0])
    u = np.array([uniform(np.uint64(sample_key(0, 0, i, 0)), 3) for i in range(5000)])
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


def test_shared_params_and_eval_crop():
    cmc = _draw(get_recipe("cmc_lab"), n=100)
    assert cmc[0] is cmc[1]
    ev = _draw(get_recipe("eval"), n=10)[0]
    assert (ev["crop"] == [(375 - 328) // 2, (500 - 328) // 2, 328, 328]).all() and not ev["flip"].any()


def test_byol_views_are_asymmetric():
    v1, v2 = _draw(get_recipe("byol"))
    _rate_ok(v1["blur_sigma"] > 0, 1.0)
    _rate_ok(v2["blur_sigma"] > 0, 0.1)
    _rate_ok(v1["solarize"], 0.0)
    _rate_ok(v2["solarize"], 0.2)


def test_randaugment_draws():
    ra = get_recipe("infomin").views[0].randaugment
    rec = _draw(get_recipe("infomin"))[0]
    assert rec["ra_ops"].shape == (N, ra.num_ops)
    for k in range(len(ra.ops)):
        _rate_ok(rec["ra_ops"][:, 0] == k, 1 / len(ra.ops))
    assert set(np.unique(np.abs(rec["ra_mag"]))) == {ra.magnitude / (ra.num_bins - 1)}
    _rate_ok(rec["ra_mag"][:, 0] > 0, 0.5)


@pytest.mark.parametrize("h,w,const", [(51, 40, False), (7, 39, False), (25, 15, True), (1, 1, False)])
def test_equalize_matches_pil(h, w, const):
    import torch
    from PIL import Image, ImageOps
    from pipeline.views.torch_ops import equalize
    img = (np.random.default_rng(h * w).beta(2, 5, (h, w, 3)) * 255).astype(np.uint8)
    if const:
        img[..., 1] = 7  # a flat channel stays as it is
    ref = np.asarray(ImageOps.equalize(Image.fromarray(img)))
    got = equalize(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0].permute(1, 2, 0)
    assert np.array_equal((got * 255).round().byte().numpy(), ref)


def test_every_randaugment_op_keeps_the_range():
    import torch
    from pipeline.views.spec import RANDAUGMENT_OPS
    from pipeline.views.torch_ops import randaugment_op
    x = torch.rand(6, 3, 20, 24)
    m = torch.linspace(-1, 1, 6)
    for name in RANDAUGMENT_OPS:
        y = randaugment_op(name, x.clone(), m)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, name
        assert (name == "identity") == torch.equal(y, x), name


@pytest.mark.parametrize("bad", [
    lambda: CropSpec(scale=(0.5, 0.2)), lambda: CropSpec(kind="random"), lambda: JitterSpec(hue=0.7),
    lambda: JitterSpec(p=1.5), lambda: BlurSpec(sigma=(2.0, 1.0)), lambda: ViewSpec(flip_p=-0.1),
    lambda: ColorSpec(space="hsv"), lambda: ColorSpec(channels=(0, 3), mean=(0, 0), std=(1, 1)),
    lambda: ColorSpec(channels=(0,)), lambda: RandAugmentSpec(ops=("equalise",)),
    lambda: RecipeSpec(name="x", views=()),
    lambda: RecipeSpec(name="x", views=(ViewSpec(), ViewSpec(flip_p=0.0)), shared_params=True),
    lambda: ViewSpec(bogus=1),
])
def test_spec_fails_loudly(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


def test_unknown_recipe_lists_known():
    with pytest.raises(KeyError, match="simclr"):
        get_recipe("simclr2")


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [72, 73, 341])
def test_partition_covers_each_epoch_once(world, n):
    for epoch in (0, 1):
        orders = [EpochSampler(num_samples=n, batch_size=4, rank=r, world_size=world, seed=3).epoch_order(epoch)
                  for r in range(world)]
        assert len({len(o) for o in orders}) == 1  # equal share: same number of batches on every rank
        allx = np.concatenate(orders)
        assert len(allx) == len(set(allx.tolist())) == (n // world) * world  # disjoint, remainder dropped
        ev = [EpochSampler(num_samples=n, batch_size=4, rank=r, world_size=world, shuffle=False,
                           drop_last=False).epoch_order(epoch) for r in range(world)]
        assert sorted(np.concatenate(ev).tolist()) == list(range(n))  # eval: every sample exactly once
    s = EpochSampler(num_samples=n, batch_size=4, rank=0, world_size=world, seed=3)
    assert not np.array_equal(s.epoch_order(0), s.epoch_order(1))
    assert np.array_equal(s.epoch_order(1), EpochSampler(num_samples=n, batch_size=4, world_size=world,
                                                         seed=3).epoch_order(1))
    assert len(s) == (n // world) // 4
    assert [b.tolist() for b in s.batches(1, 2)] == [b.tolist() for b in s.batches(1)[2:]]

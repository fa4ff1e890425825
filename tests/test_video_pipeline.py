"""Clip loader (pipeline/loaders/clips.py, pipeline/loaders/video_decode.py) on a small converted synthetic video set.

The dataset is made by the project's own tools (tools/make_synthetic_video.py -> tools/convert_video.py,
UCF layout, H.264 MP4 with B-frames, 64 x 64, 32 frames) once per module. The DALI parity test also
writes a VP9 split with pipeline.bench.video_decode.write_video_split: DALI 2.4's CPU video decoder does not
decode H.264.
"""

from __future__ import annotations

import io
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from pipeline.views import torch_ops
from pipeline.loaders.clips import (build_clip_loader, clip_photometric, cvrl, eval_clip, get_clip_recipe, offset_cdf,
                            sample_clip_params, temporal_params)
from pipeline.views.params import view_params
from pipeline.format.errors import ShardError
from pipeline.loaders.video_decode import DaliVideoDecoder, PyAVDecoder, VideoIndex, probe_codec, pyav_decode

FRAMES, STRIDE, SIZE = 4, 3, 24


@pytest.fixture(scope="module")
def vdata(tmp_path_factory):
    """4 motion classes x 8 videos (UCF groups: 24 train, 8 val), converted with shards of 8 videos."""
    from tools import convert_video, make_synthetic_video
    root = tmp_path_factory.mktemp("video")
    src, out = root / "src", root / "out"
    assert make_synthetic_video.main(["--out", str(src), "--classes", "4", "--per-class", "8", "--frames", "32",
                                      "--size", "64", "--container", "mp4", "--no-progress"]) == 0
    for split, lst in (("train", "trainlist01.txt"), ("val", "testlist01.txt")):
        assert convert_video.main(["--src", str(src), "--out", str(out), "--split", split, "--split-file", lst,
                                   "--workers", "2", "--shard-size", "8", "--no-progress"]) == 0
    return out


def loader(data, recipe="cvrl", split="train", **kw):
    kw = {"batch_size": 8, "frames": FRAMES, "stride": STRIDE, "image_size": SIZE, "seed": 3, **kw}
    return build_clip_loader(data, split, recipe, **kw)


def full_decode(data: bytes) -> np.ndarray:
    import av
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


# -- shapes, records, geometry -----------------------------------------------------------------------
def test_clip_batches_shapes_and_dtypes(vdata):
    ld = loader(vdata, return_aug=True)
    n = ld.sampler.num_samples
    assert n == 24 and len(ld) == 3
    batches = list(ld)
    assert len(batches) == 3 and ld.epoch == 1 and ld.stats["skipped"] == 0 and ld.stats["decoder"] == "pyav"
    for b in batches:
        assert len(b.views) == 2
        for v in b.views:
            assert v.shape == (8, 3, FRAMES, SIZE, SIZE) and v.dtype == torch.float32 and torch.isfinite(v).all()
        assert b.index.dtype == torch.int64 and b.label.dtype == torch.int64 and b.label.max() < 4
        for rec in b.aug:
            assert rec["frames"].shape == (8, FRAMES) and rec["crop"].shape == (8, 4)
            assert torch.equal(rec["frames"], (rec["start"][:, None] + torch.arange(FRAMES) * STRIDE)
                               % rec["num_frames"][:, None])
    ev = loader(vdata, "eval", split="val", batch_size=3, mode="eval")
    assert ev.sampler.num_samples == 8 and len(ev) == 3  # eval drops nothing: 3 + 3 + 2
    sizes = [len(b.index) for b in ev]
    assert sizes == [3, 3, 2] and ev.recipe.num_clips == 1
    ld.close()
    ev.close()


def test_records_are_the_image_records_per_clip(vdata):
    """Clip c's spatial record is pipeline.views.params.view_params(stream=c): the image machinery, a pure
    function of (seed, epoch, index, clip); the two clips of a video draw independently."""
    ld = loader(vdata, return_aug=True)
    ld.set_epoch(2)
    b = next(iter(ld))
    ld.close()
    idx = b.index.numpy()
    spec = ld.recipe
    widths, heights = np.full(len(idx), 64), np.full(len(idx), 64)
    for c in range(2):
        want = view_params(spec.views[c], 3, 2, c, idx, widths, heights)
        for k, a in want.items():
            assert np.array_equal(b.aug[c][k].numpy(), a), k
    a0, a1 = b.aug
    assert (a0["crop"] != a1["crop"]).any(1).all()  # independent crops for the two clips of every video
    assert (a0["jitter"] != a1["jitter"]).any(1).sum() >= len(idx) // 2
    assert torch.equal(a0["offset"], a1["offset"])
    assert torch.equal((a0["start"] - a1["start"]).abs(), a0["offset"])


def test_clip_photometric_identical_across_frames():
    """A clip whose T frames are one image gets T identical outputs, each equal to the image pipeline's
    output for that image (flip, jitter, grayscale, blur, solarize all on)."""
    rng = np.random.default_rng(0)
    n, T, S = 6, 5, 20
    frame = torch.from_numpy(rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8))
    clips = frame[:, None].expand(n, T, S, S, 3).contiguous()
    view = cvrl(S, T, 1).views[0]
    import dataclasses
    view = dataclasses.replace(view, solarize_p=0.5, blur=dataclasses.replace(view.blur, p=1.0))
    rec = view_params(view, 0, 0, 0, np.arange(n), np.full(n, S), np.full(n, S))
    rec["flip"][:3], rec["jitter_on"][:] = True, True
    assert rec["gray"].any() and not rec["gray"].all() and rec["solarize"].any()
    out = clip_photometric(clips, rec, view)
    assert out.shape == (n, 3, T, S, S)
    ref = torch_ops.photometric(frame, rec, view)
    for t in range(T):
        assert torch.allclose(out[:, :, t], ref, atol=1e-5), t


def test_eval_clip_pixels_match_a_manual_decode_crop_resize(vdata):
    """Eval view = centred frames, centre crop (0.875 of the side), PIL bilinear resize, ImageNet norm."""
    from PIL import Image
    ld = loader(vdata, "eval", split="val", batch_size=4, mode="eval")
    b = next(iter(ld))
    ld.close()
    ix = VideoIndex(vdata / "val")
    i = int(b.index[1])
    frames = full_decode(ix.read_video(i))
    L = len(frames)
    s = (L - (FRAMES - 1) * STRIDE - 1) // 2
    c = round(64 * 0.875)
    top = (64 - c) // 2
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for t in range(FRAMES):
        im = Image.fromarray(frames[s + t * STRIDE]).resize((SIZE, SIZE), Image.Resampling.BILINEAR,
                                                           box=(top, top, top + c, top + c), reducing_gap=None)
        want = (torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 - mean) / std
        assert torch.allclose(b.views[0][1, :, t], want, atol=1e-5)
    ix.close()


# -- temporal sampling ---------------------------------------------------------------------------------
def _chi2_crit(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df); z = 3.719 is the normal 1 - 1e-4 quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_cvrl_offset_follows_the_decreasing_distribution(power):
    """Offsets d of 60,000 videos (L = 48, T = 8, stride 2: M = 34 valid starts) against the exact law
    P(d = k) = F((k+1)/M) - F(k/M), F(x) = ((p+1) x - x^(p+1)) / p: binned chi-square below its 1 - 1e-4
    quantile, max |ECDF - CDF| within the DKW 1 - 1e-4 band, a decreasing pmf, and the start of the
    earlier clip uniform over the M - d positions that fit."""
    import dataclasses
    spec = cvrl(32, 8, 2)
    spec = dataclasses.replace(spec, temporal=dataclasses.replace(spec.temporal, power=power))
    n, L = 60_000, 48
    M = L - 7 * 2
    tp = temporal_params(spec, 11, 0, np.arange(n), np.full(n, L))
    d = tp["offset"]
    assert d.min() >= 0 and d.max() <= M - 1
    assert np.array_equal(np.abs(tp["start"][:, 0] - tp["start"][:, 1]), d)
    k = np.arange(M)
    pmf = np.array([offset_cdf((j + 1) / M, power) - offset_cdf(j / M, power) for j in k])
    assert abs(pmf.sum() - 1) < 1e-12 and (np.diff(pmf) < 0).all()  # the law itself decreases
    counts = np.bincount(d, minlength=M)
    chi2 = ((counts - n * pmf) ** 2 / (n * pmf)).sum()
    assert chi2 < _chi2_crit(M - 1), (chi2, _chi2_crit(M - 1))
    ecdf, cdf = np.cumsum(counts) / n, np.cumsum(pmf)
    assert np.abs(ecdf - cdf).max() < math.sqrt(math.log(2 / 1e-4) / (2 * n))
    # the earlier start given d: uniform on 0..M-d-1; pooled chi-square over the offsets with >= 5 expected
    # videos per start position
    s = tp["start"].min(1)
    assert (s + d <= M - 1).all()
    chi2_s, df_s = 0.0, 0
    for j in range(M - 1):
        sj = s[d == j]
        e = len(sj) / (M - j)
        if e >= 5:
            chi2_s += ((np.bincount(sj, minlength=M - j) - e) ** 2 / e).sum()
            df_s += M - j - 1
    assert df_s > 100 and chi2_s < _chi2_crit(df_s), (chi2_s, df_s)
    first = tp["start"][:, 0] < tp["start"][:, 1]
    assert abs(first[d > 0].mean() - 0.5) < 4 * 0.5 / math.sqrt((d > 0).sum())  # fair coin for the order


def test_temporal_sampling_is_pure_and_handles_short_videos():
    spec = cvrl(32, 8, 4)  # span 29 frames
    idx = np.arange(500)
    a = temporal_params(spec, 5, 3, idx, np.full(500, 64))
    b = temporal_params(spec, 5, 3, idx[::-1].copy(), np.full(500, 64))
    assert np.array_equal(a["start"], b["start"][::-1]) and np.array_equal(a["offset"], b["offset"][::-1])
    c = temporal_params(spec, 5, 4, idx, np.full(500, 64))
    assert not np.array_equal(a["start"], c["start"])  # a new epoch draws anew
    short = temporal_params(spec, 5, 3, idx, np.full(500, 20))  # shorter than one clip: wrap around
    assert (short["frames"] < 20).all() and (short["start"] < 20).all()
    ev = temporal_params(eval_clip(32, 8, 4), 5, 3, idx[:3], np.array([64, 29, 10]))
    assert ev["start"][:, 0].tolist() == [(64 - 29 - 1) // 2, 0, 0]


# -- partition, resume, faults ------------------------------------------------------------------------------
def test_two_ranks_cover_the_epoch_once(vdata):
    seen = []
    for r in range(2):
        ld = loader(vdata, rank=r, world_size=2, batch_size=4)
        ld.set_epoch(1)
        seen.append(np.concatenate([b.index.numpy() for b in ld]))
        assert len(ld) == 3
        ld.close()
    assert len(set(seen[0]) & set(seen[1])) == 0
    assert sorted(np.concatenate(seen).tolist()) == list(range(24))  # 24 = 2 ranks x 3 batches x 4


def test_resume_yields_exactly_the_next_batches(vdata):
    a = loader(vdata, batch_size=6)
    a.set_epoch(1)
    it = iter(a)
    next(it)
    state = a.state_dict()
    rest_a = list(it)
    b = loader(vdata, batch_size=6)
    b.load_state_dict(state)
    rest_b = list(b)
    assert len(rest_a) == len(rest_b) == 3
    for x, y in zip(rest_a, rest_b):
        assert torch.equal(x.index, y.index)
        for u, v in zip(x.views, y.views):
            assert torch.equal(u, v)
    c = loader(vdata, batch_size=6, frames=FRAMES + 1)
    with pytest.raises(ValueError, match="frames"):
        c.load_state_dict(state)
    for ld in (a, b, c):
        ld.close()


def test_corrupt_member_is_skipped_and_counted(vdata, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(vdata / "val", bad / "val")
    shutil.copytree(vdata / "train", bad / "train")
    ix = VideoIndex(bad / "val")
    victims = {2: "header", 5: "json"}
    for i, what in victims.items():
        k = int(ix.shard[i])
        off, size = (ix.video if what == "header" else ix.meta_at)[i]
        with open(ix.tars[k], "r+b") as f:
            f.seek(int(off))
            f.write(b"\0" * min(64, int(size)))
    ix.close()
    ld = loader(bad, "eval", split="val", batch_size=8, mode="eval")
    got = np.concatenate([b.index.numpy() for b in ld])
    assert sorted(got.tolist()) == [i for i in range(8) if i not in victims]
    assert ld.stats["skipped"] == 2 and {i for i, _ in ld.stats["skipped_samples"]} == set(victims)
    reasons = dict(ld.stats["skipped_samples"])
    assert "decode failed" in reasons[2] and "metadata" in reasons[5]
    ld.close()


def test_missing_shard_names_the_file(vdata, tmp_path):
    d = tmp_path / "missing"
    shutil.copytree(vdata / "train", d / "train")
    (d / "train" / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="train-000001.tar"):
        loader(d)


def test_pyav_seek_matches_a_full_decode(vdata):
    """Seeking to the keyframe before the first wanted frame gives the same frames as decoding all
    (the converted MP4s have B-frames and a keyframe every 16 frames)."""
    ix = VideoIndex(vdata / "train")
    rng = np.random.default_rng(0)
    for i in range(0, 24, 5):
        data = ix.read_video(i)
        ref = full_decode(data)
        for _ in range(4):
            fr = np.unique(rng.integers(0, len(ref), 5))
            assert np.array_equal(pyav_decode(data, fr), ref[fr])
    with pytest.raises(Exception, match="no frame 32"):
        pyav_decode(ix.read_video(0), [31, 32])
    ix.close()


# -- DALI vs PyAV ------------------------------------------------------------------------------------------
def _dali_cpu_decodes(data: bytes) -> str | None:
    """None if DALI's CPU video decoder decodes `data` here, else why not."""
    dec = DaliVideoDecoder("cpu")
    if dec.fallback:
        return dec.fallback
    reason = dec.unsupported_codec([data])
    if reason:
        return reason
    try:
        dec._run([data], [np.array([0])])
    except Exception as e:  # noqa: BLE001
        return f"DALI CPU video decode failed: {str(e).splitlines()[0]}"
    return None


def test_dali_decoder_falls_back_to_pyav_on_h264_cpu(vdata):
    """On CPU, DALI 2.4 cannot decode H.264: decoder='dali' says so once and decodes with PyAV, giving
    the very batches decoder='pyav' gives."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dl = loader(vdata, decoder="dali")
        got = list(dl)
    if dl.stats["decoder"] == "dali":
        pytest.skip("this DALI decodes H.264 on the loader's device: nothing falls back")
    assert dl.stats["decoder"].startswith("pyav (dali fallback:") and "h264" in dl.stats["decoder"]
    assert sum("DALI video decoder not usable" in str(x.message) for x in w) == 1
    pl = loader(vdata, decoder="pyav")
    for x, y in zip(pl, got):
        assert torch.equal(x.index, y.index) and all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    dl.close()
    pl.close()


def test_dali_and_pyav_decode_the_same_frames_h264(vdata):
    """H.264 parity needs DALI's mixed (NVDEC) decoder, i.e. a GPU."""
    ix = VideoIndex(vdata / "train")
    data = ix.read_video(0)
    ix.close()
    if not torch.cuda.is_available():
        reason = _dali_cpu_decodes(data)
        if reason:
            pytest.skip(f"no GPU, and DALI's CPU video decoder cannot decode H.264 here: {reason}")
        dec = DaliVideoDecoder("cpu")
    else:
        dec = DaliVideoDecoder("cuda")
    frames = [np.array([0, 5, 17, 31]), np.array([2, 3, 30])]
    got = dec._run([data, data], frames)
    for g, f in zip(got, frames):
        ref = pyav_decode(data, f).astype(np.int16)
        diff = np.abs(g.astype(np.int16) - ref)
        assert g.shape == ref.shape and diff.mean() < 3 and np.percentile(diff, 99) <= 24


def test_dali_and_pyav_decode_the_same_frames_vp9(tmp_path):
    """Frame-level and loader-level parity on VP9 videos, which DALI's CPU decoder does decode: same
    frame indices, pixels within YUV->RGB conversion differences."""
    from pipeline.synthetic.video_split import encode_video, synth_frames, write_video_split
    rng = np.random.default_rng(0)
    vids, src = [], []
    for k in range(8):
        fr = synth_frames(rng, k % 4, 24, 48, 32)
        src.append(fr.astype(np.int16))
        vids.append((encode_video(fr, "libvpx-vp9", gop=8, fmt="webm"), k % 4,
                     {"fps": 25, "num_frames": 24, "duration": 24 / 25, "width": 48, "height": 32}))
    reason = _dali_cpu_decodes(vids[0][0])
    if reason:
        pytest.skip(reason)
    assert probe_codec(vids[0][0]) == "vp9"
    want = [np.array([0, 3, 9, 23]), np.array([8, 9, 10]), np.array([17])]
    datas = [v[0] for v in vids[:3]]
    dali = DaliVideoDecoder("cpu").decode_batch(datas, want)
    pyav = PyAVDecoder().decode_batch(datas, want)
    for a, b, s, f, d in zip(dali, pyav, src, want, datas):
        # The two YUV -> RGB conversions differ (a ~1.3 level bias, chroma upsampling at colour edges), so
        # the test is: the same frames (a wrong index would differ by the motion), close to each other and
        # about as close to the encoder's input as each other.
        a, b = a.astype(np.int16), b.astype(np.int16)
        diff = np.abs(a - b)
        assert a.shape == b.shape and diff.mean() < 4 and np.percentile(diff, 99) <= 32, (diff.mean(), diff.max())
        err_dali, err_pyav = np.abs(a - s[f]).mean(), np.abs(b - s[f]).mean()
        assert err_dali < 2 * err_pyav + 1 and err_pyav < 8, (err_dali, err_pyav)
        # each DALI frame is closest to PyAV's frame of the same index among all frames of the video
        every = pyav_decode(d, np.arange(24)).astype(np.int16)
        err = np.abs(a[:, None] - every[None]).mean((2, 3, 4))  # (wanted, 24)
        assert np.array_equal(err.argmin(1), f), err.argmin(1)
    write_video_split(tmp_path, "train", vids, shard_size=4, ext="webm")
    out = {}
    for dec in ("pyav", "dali"):
        ld = build_clip_loader(tmp_path, "train", "cvrl", batch_size=4, frames=4, stride=2, image_size=24,
                               decoder=dec, seed=1)
        out[dec] = list(ld)
        assert ld.stats["decoder"] == dec
        ld.close()
    for x, y in zip(out["pyav"], out["dali"]):
        assert torch.equal(x.index, y.index)
        for u, v in zip(x.views, y.views):
            assert (u - v).abs().mean() < 0.05  # normalized units (1/255 in [0, 1] is ~0.017)


def test_clip_recipe_validation():
    from pipeline.views.recipes import infomin
    with pytest.raises(ValueError, match="RandAugment"):
        get_clip_recipe(infomin(32), 32, 4, 2)
    with pytest.raises(ValueError, match="frames"):
        get_clip_recipe("cvrl", 32, 0, 2)
    with pytest.raises(ValueError, match="shared_params"):
        get_clip_recipe("cmc_lab", 32, 4, 2)
    with pytest.raises(KeyError, match="known: cvrl, eval"):
        get_clip_recipe("nope", 32, 4, 2)
    s = get_clip_recipe("simclr", 32, 4, 2, blur=False)  # an image recipe's views as clip views
    assert s.num_clips == 2 and s.temporal.kind == "cvrl" and all(v.blur is None for v in s.views)
    recs = sample_clip_params(s, 0, 0, np.arange(3), np.full(3, 16), np.full(3, 40), np.full(3, 30))
    assert len(recs) == 2 and recs[0]["frames"].shape == (3, 4)


@pytest.mark.parametrize("seed", range(3))
def test_torch_crop_resize_matches_pil(seed):
    """The GPU path's crop + resize (torch, antialiased bilinear, on the frames' device) against the CPU
    path's PIL one, on random frames, boxes and sizes (down and up)."""
    from pipeline.loaders.video_decode import crop_resize, crop_resize_torch
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (3, 60, 80, 3), dtype=np.uint8)
    frames = np.clip(frames.astype(np.int32) // 2 + np.linspace(0, 120, 80, dtype=np.int32)[None, None, :, None],
                     0, 255).astype(np.uint8)  # noise on a ramp: edges and smooth parts
    for _ in range(4):
        h, w = int(rng.integers(10, 60)), int(rng.integers(10, 80))
        top, left = int(rng.integers(0, 60 - h + 1)), int(rng.integers(0, 80 - w + 1))
        size = int(rng.choice([16, 24, 48, 72]))
        want = crop_resize(frames, (top, left, h, w), size).astype(np.int32)
        got = crop_resize_torch(torch.from_numpy(frames), (top, left, h, w), size).numpy().astype(np.int32)
        assert got.shape == want.shape == (3, size, size, 3)
        # PIL's box resize reads pixels just outside the box for its filter; torch crops first. So the
        # borders (the filter's reach, in output pixels) differ and the rest agrees to one level.
        m = int(np.ceil(size / min(h, w))) + 1
        inner = np.abs(got - want)[:, m:-m, m:-m]
        assert inner.max() <= 1 and inner.mean() < 0.3, (h, w, size, inner.mean(), inner.max())
    whole = crop_resize_torch(torch.from_numpy(frames), (0, 0, 60, 80), 24).numpy().astype(np.int32)
    assert np.abs(whole - crop_resize(frames, (0, 0, 60, 80), 24).astype(np.int32)).max() <= 1


def test_clip_crops_from_device_tensors_match_host_arrays(vdata):
    """ClipBackend._crops on frames held as a tensor (what the DALI GPU decoder returns) gives the
    views the host path gives, to a level or so."""
    from pipeline.loaders.clips import ClipBackend
    spec = get_clip_recipe("cvrl", SIZE, FRAMES, STRIDE)
    be = ClipBackend(vdata / "train", spec, batch_size=4)
    ix = be.index
    meta, _ = ix.read_meta(2)
    params = sample_clip_params(spec, 0, 0, np.array([2]), np.array([meta["num_frames"]]),
                                np.array([meta["width"]]), np.array([meta["height"]]))
    needed = np.unique(np.concatenate([p["frames"][0] for p in params]))
    frames = pyav_decode(ix.read_video(2), needed, 1, {})
    host = be._crops(frames, needed, params, 0)
    dev = be._crops(torch.from_numpy(frames), needed, params, 0)
    for h, d in zip(host, dev):
        assert isinstance(d, torch.Tensor) and d.shape == h.shape
        assert np.abs(d.numpy().astype(int) - h.astype(int)).mean() < 3  # borders differ (see above)
    be.close()

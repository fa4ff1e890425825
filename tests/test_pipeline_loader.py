"""End-to-end loaders on the small converted split (CPU): shapes, order, resume, faults, agreement."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from pipeline import build_loader
from pipeline.views.recipes import RECIPES, get_recipe
from pipeline.format.errors import ShardError
from pipeline.format.shard_index import ShardIndex
from pipeline.views.spec import ColorSpec, RecipeSpec, ViewSpec, CropSpec
from pipeline.convert.tar_writer import ShardWriter
from pipeline.format.shard_index import iter_shard

S = 32  # image size in tests
RANGES = {"rgb": [(0, 1)] * 3, "lab": [(0, 100), (-87, 99), (-108, 95)], "ycbcr": [(16, 235), (16, 240), (16, 240)],
          "ydbdr": [(0, 1), (-1.334, 1.334), (-1.334, 1.334)]}


def _split(converted):
    split_dir, manifest, _ = converted
    return split_dir.parent, manifest


@pytest.mark.parametrize("name", list(RECIPES))
def test_shapes_dtypes_normalization(converted, name):
    data, manifest = _split(converted)
    loader = build_loader(data, recipe=name, backend="dali", batch_size=8, image_size=S)
    recipe = get_recipe(name, S)
    batch = next(iter(loader))
    assert len(batch.views) == len(recipe.views)
    for v, view in zip(batch.views, recipe.views):
        assert v.shape == (8, len(view.color.channels), view.size, view.size) and v.dtype == torch.float32
        assert torch.isfinite(v).all()
        # undo the normalization: values lie in the colour space's range
        mean = torch.tensor(view.color.mean)[None, :, None, None]
        std = torch.tensor(view.color.std)[None, :, None, None]
        raw = v * std + mean
        for c, ch in enumerate(view.color.channels):
            lo, hi = RANGES[view.color.space][ch]
            assert raw[:, c].min() >= lo - 1e-3 and raw[:, c].max() <= hi + 1e-3, (c, raw[:, c].aminmax())
    assert batch.index.dtype == torch.int64 and batch.label.dtype == torch.int64
    assert ((batch.label >= 0) & (batch.label < manifest["num_classes"])).all()


def test_views_differ_and_labels_match(converted):
    data, _ = _split(converted)
    idx = ShardIndex(data / "train")
    batch = next(iter(build_loader(data, recipe="simclr", batch_size=8, image_size=S)))
    a, b = batch.views
    assert ((a - b).abs().flatten(1).mean(1) > 0.05).all()
    for i, lab in zip(batch.index.tolist(), batch.label.tolist()):
        assert idx.read(i)[1] == lab


def _epoch(loader):
    return [(b.index.clone(), [v.clone() for v in b.views]) for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and all(torch.equal(p, q) for p, q in zip(x[1], y[1]))
                                    for x, y in zip(a, b))


def test_determinism_epoch_and_resume(converted):
    data, _ = _split(converted)
    mk = lambda seed=0: build_loader(data, recipe="byol", batch_size=8, image_size=S, seed=seed)
    l1 = mk()
    e0 = _epoch(l1)
    assert l1.state_dict()["epoch"] == 1  # finishing an epoch moves to the next one
    assert _same(e0, _epoch(mk()))
    assert not torch.equal(_epoch(mk(seed=1))[0][0], e0[0][0])
    l1.set_epoch(1)
    e1 = _epoch(l1)
    assert not torch.equal(e1[0][0], e0[0][0])
    s0, s1 = (torch.cat([b[0] for b in e]).tolist() for e in (e0, e1))
    assert len(set(s0)) == len(s0) == len(set(s1)) == len(s1)  # each sample at most once per epoch
    # resume after k batches: the remaining batches are exactly those of the uninterrupted run
    l2 = mk()
    l2.set_epoch(1)
    it = iter(l2)
    for _ in range(3):
        next(it)
    state = l2.state_dict()
    assert state["batch"] == 3
    l3 = mk()
    l3.load_state_dict(json.loads(json.dumps(state)))
    assert _same(_epoch(l3), e1[3:])
    with pytest.raises(ValueError, match="seed"):
        mk(seed=5).load_state_dict(state)


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_continuous_reading_across_epochs_gives_the_same_batches(converted, backend):
    """A training loader reads on into the next epoch when one ends; the batches are those of a loader
    that stops at every epoch end, also after an early break, a set_epoch jump and a load_state_dict."""
    data, _ = _split(converted)
    mk = lambda continuous: build_loader(data, recipe="simclr", backend=backend, batch_size=8, image_size=16,
                                         seed=2, num_threads=1, continuous=continuous)
    ref = mk(False)
    want = {e: _epoch((ref.set_epoch(e), ref)[1]) for e in (0, 1, 2, 4)}
    assert ref._stream is None  # a stopping loader holds no producer between epochs
    ld = mk(None)  # the default for a training recipe: continuous
    assert ld.continuous and not build_loader(data, recipe="eval", batch_size=8, image_size=16, mode="eval").continuous
    assert _same(_epoch(ld), want[0])
    assert ld._stream is not None and ld._stream_at == (1, 0)  # already producing epoch 1
    it = iter(ld)
    got = [next(it) for _ in range(2)]
    it.close()  # the consumer stops early: the stream stays at (1, 2)
    assert ld._stream_at == (1, 2)
    assert _same([(b.index, b.views) for b in got] + _epoch(ld), want[1])
    assert _same(_epoch(ld), want[2])
    ld.set_epoch(4)  # a jump: the read-ahead of epoch 3 is dropped
    assert _same(_epoch(ld), want[4])
    ld.load_state_dict({**ld.state_dict(), "epoch": 1, "batch": 3})
    assert _same(_epoch(ld), want[1][3:])
    ld.close()
    assert ld._stream is None


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_cover_the_epoch_once(converted, world):
    data, manifest = _split(converted)
    n = manifest["num_samples"]
    seen = []
    lens = set()
    for r in range(world):
        loader = build_loader(data, recipe="simclr", batch_size=4, image_size=16, rank=r, world_size=world, seed=2)
        loader.set_epoch(1)
        ep = _epoch(loader)
        lens.add(len(ep))
        seen += torch.cat([b[0] for b in ep]).tolist()
    assert len(lens) == 1
    assert len(seen) == len(set(seen))
    per = n // world
    assert len(seen) == world * (per // 4) * 4


def test_eval_covers_everything_in_order(converted):
    data, manifest = _split(converted)
    loader = build_loader(data, recipe="eval", batch_size=16, image_size=S, mode="eval")
    assert torch.cat([b.index for b in loader]).tolist() == list(range(manifest["num_samples"]))


def test_cmc_lab_matches_independent_conversion(converted):
    data, _ = _split(converted)
    lab = get_recipe("cmc_lab", S)
    rgb = RecipeSpec(name="cmc_lab", views=(lab.views[0].augmentation(),))  # same draw, RGB output
    kw = dict(batch_size=8, seed=4)
    b_lab = next(iter(build_loader(data, recipe=lab, **kw)))
    b_rgb = next(iter(build_loader(data, recipe=rgb, **kw)))
    assert torch.equal(b_lab.index, b_rgb.index)
    x = (b_rgb.views[0].double() * torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[None, :, None, None]
         + torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[None, :, None, None]).numpy()
    # sRGB -> XYZ (D65) -> Lab, written out from the CIE definitions
    lin = np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    xyz = np.einsum("ij,njhw->nihw", m, lin) / np.array([0.95047, 1.0, 1.08883])[None, :, None, None]
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    L, a, bb = 116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])
    got_L = b_lab.views[0][:, 0].double() * lab.views[0].color.std[0] + lab.views[0].color.mean[0]
    ab_view = lab.views[1].color
    got_ab = b_lab.views[1].double() * torch.tensor(ab_view.std, dtype=torch.float64)[None, :, None, None] \
        + torch.tensor(ab_view.mean, dtype=torch.float64)[None, :, None, None]
    assert np.abs(got_L.numpy() - L).max() < 0.05
    assert np.abs(got_ab[:, 0].numpy() - a).max() < 0.1 and np.abs(got_ab[:, 1].numpy() - bb).max() < 0.1


def _plain(crop_kind="random_resized", flip_p=0.0, size=S):
    return RecipeSpec(name="plain", views=(ViewSpec(crop=CropSpec(kind=crop_kind, size=size), flip_p=flip_p,
                                                    color=ColorSpec(mean=(0, 0, 0), std=(1, 1, 1))),))


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_applied_crop_and_flip_match_the_record(converted, backend):
    """The output equals an independent PIL crop + resize of the recorded box, flipped as recorded, in the
    first and in a later epoch of the same loader (ffcv reads the epoch at run time: see ffcv_backend)."""
    data, _ = _split(converted)
    idx = ShardIndex(data / "train")
    nt = 1 if backend == "ffcv" else 2
    plain, flipped = (build_loader(data, recipe=r, backend=backend, batch_size=8, return_aug=True, num_threads=nt)
                      for r in (_plain(), _plain(flip_p=1.0)))
    boxes = []
    for epoch in (0, 2):
        plain.set_epoch(epoch)
        flipped.set_epoch(epoch)
        b0, b1 = next(iter(plain)), next(iter(flipped))
        assert torch.equal(b0.aug[0]["crop"], b1.aug[0]["crop"]) and b1.aug[0]["flip"].all()
        assert torch.equal(b1.views[0], b0.views[0].flip(-1))
        for k, i in enumerate(b0.index.tolist()):
            y, x, h, w = b0.aug[0]["crop"][k].tolist()
            im = Image.open(__import__("io").BytesIO(idx.read(i)[0])).convert("RGB")
            ref = np.asarray(im.crop((x, y, x + w, y + h)).resize((S, S), Image.BILINEAR), np.float32) / 255
            got = b0.views[0][k].permute(1, 2, 0).numpy()
            assert np.abs(got - ref).mean() < 0.03, (epoch, k, np.abs(got - ref).mean())
        boxes.append(dict(zip(b0.index.tolist(), b0.aug[0]["crop"].tolist())))
    common = set(boxes[0]) & set(boxes[1])
    assert all(boxes[0][i] != boxes[1][i] for i in common)  # new crops in the new epoch
    plain.close()
    flipped.close()


def test_dali_and_ffcv_agree(converted):
    """Same records (by construction) and, per sample, nearly the same pixels (the resize filters differ:
    DALI linear + antialias, ffcv OpenCV INTER_AREA); per-channel statistics of the full simclr recipe
    over an epoch agree."""
    data, _ = _split(converted)
    kw = dict(batch_size=8, image_size=S, seed=9, return_aug=True)
    d = list(build_loader(data, recipe="simclr", backend="dali", **kw))
    f = list(build_loader(data, recipe="simclr", backend="ffcv", num_threads=1, **kw))
    assert len(d) == len(f)
    for bd, bf in zip(d, f):
        assert torch.equal(bd.index, bf.index) and torch.equal(bd.label, bf.label)
        for rd, rf in zip(bd.aug, bf.aug):
            assert all(torch.equal(rd[k], rf[k]) for k in rd)
        for vd, vf in zip(bd.views, bf.views):
            assert (vd - vf).abs().mean() < 0.15  # normalized units (~0.03 in [0, 1])
    md = torch.stack([torch.cat([b.views[0] for b in d]).mean((0, 2, 3)), torch.cat([b.views[0] for b in d]).std((0, 2, 3))])
    mf = torch.stack([torch.cat([b.views[0] for b in f]).mean((0, 2, 3)), torch.cat([b.views[0] for b in f]).std((0, 2, 3))])
    assert (md - mf).abs().max() < 0.05


def _corrupt(jpeg: bytes, seed=0) -> bytes:
    """Keep the headers (SOI .. SOS), replace the entropy-coded data with random bytes, keep the EOI."""
    b = bytearray(jpeg)
    sos = b.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(b[sos + 2:sos + 4], "big")
    b[start:-2] = np.random.default_rng(seed).integers(0, 256, len(b) - 2 - start, dtype=np.uint8).tobytes()
    return bytes(b)


@pytest.fixture(scope="module")
def corrupt_split(converted, tmp_path_factory):
    """A copy of the split whose sample 5 (in shard 0) has a corrupt .jpg member."""
    split_dir, manifest, _ = converted
    out = tmp_path_factory.mktemp("corrupt") / "train"
    shutil.copytree(split_dir, out)
    sh = manifest["shards"][0]
    assert sh["first_index"] <= 5 < sh["first_index"] + sh["num_samples"]
    samples = list(iter_shard(split_dir / sh["tar"]))
    (out / sh["tar"]).unlink()
    (out / sh["idx"]).unlink()
    w = ShardWriter(out / sh["tar"], out / sh["idx"])
    for key, members in samples:
        if int(key) == 5:
            members = {**members, "jpg": _corrupt(members["jpg"])}
        w.add(key, members)
    w.close()
    return out.parent


def test_corrupt_member_is_skipped_and_counted(corrupt_split, converted):
    _, manifest, _ = converted
    hdr = simplejpeg.decode_jpeg_header(ShardIndex(corrupt_split / "train").read(5)[0])
    assert hdr[0] > 0  # the header is still valid: only the scan data is garbage
    loader = build_loader(corrupt_split, recipe="eval", batch_size=8, image_size=S, mode="eval")
    seen = torch.cat([b.index for b in loader]).tolist()
    assert seen == [i for i in range(manifest["num_samples"]) if i != 5]
    assert loader.stats["skipped"] == 1 and loader.stats["skipped_samples"][0][0] == 5
    assert "entropy" in loader.stats["skipped_samples"][0][1]


def test_ffcv_corrupt_member_is_skipped_and_counted(converted, tmp_path):
    """The same corruption inside the .beton (sample 5's scan data overwritten in place): ffcv's decoder
    flags it, the loader drops and counts it, every other sample arrives once."""
    split_dir, manifest, _ = converted
    out = tmp_path / "train"
    shutil.copytree(split_dir, out)
    jpeg = ShardIndex(split_dir).read(5)[0]
    beton = out / manifest["beton"]["file"]
    raw = bytearray(beton.read_bytes())
    at = raw.find(jpeg)
    assert at >= 0 and raw.find(jpeg, at + 1) < 0
    raw[at:at + len(jpeg)] = _corrupt(jpeg)
    beton.write_bytes(bytes(raw))
    loader = build_loader(tmp_path, recipe="eval", backend="ffcv", batch_size=8, image_size=S, num_threads=1, mode="eval")
    seen = torch.cat([b.index for b in loader]).tolist()
    assert seen == [i for i in range(manifest["num_samples"]) if i != 5]
    assert loader.stats["skipped"] == 1 and loader.stats["skipped_samples"][0][0] == 5


def test_missing_shard_names_it(converted, tmp_path):
    split_dir, manifest, _ = converted
    out = tmp_path / "train"
    shutil.copytree(split_dir, out)
    victim = manifest["shards"][1]["tar"]
    (out / victim).unlink()
    with pytest.raises(ShardError, match=victim):
        build_loader(tmp_path, recipe="simclr", batch_size=4)
    with pytest.raises(ShardError, match="does not exist"):
        build_loader(tmp_path, split="nope", recipe="simclr", batch_size=4)


def test_bad_arguments_fail_loudly(converted):
    data, _ = _split(converted)
    with pytest.raises(KeyError, match="dali"):
        build_loader(data, backend="pil", batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        build_loader(data, batch_size=4, rank=2, world_size=2)
    with pytest.raises(KeyError, match="known"):
        build_loader(data, recipe="simclr++", batch_size=4)


def test_ffcv_resume_and_partition(converted):
    """ffcv: the resumed loader yields exactly the remaining batches; two ranks are disjoint."""
    data, _ = _split(converted)
    mk = lambda rank=0: build_loader(data, recipe="mocov2", backend="ffcv", batch_size=8, image_size=16, seed=3,
                                     rank=rank, world_size=2, num_threads=1)
    full = _epoch(mk())
    resumed = mk()
    resumed.load_state_dict({**resumed.state_dict(), "batch": 2})
    assert _same(_epoch(resumed), full[2:])
    other = torch.cat([b[0] for b in _epoch(mk(rank=1))]).tolist()
    assert not set(other) & set(torch.cat([b[0] for b in full]).tolist())


def test_mode_is_explicit_not_guessed_from_the_recipe_name(converted):
    """A multi-view eval recipe (CMC's centre-cropped L/ab views, named cmc_lab_eval) read with mode="eval"
    is in dataset order, keeps the remainder and reads once; mode="train" on the plain eval recipe
    shuffles; an unknown mode fails."""
    from pipeline.views.recipes import center_crop_views, cmc_lab
    data, _ = _split(converted)
    ev = build_loader(data, recipe=center_crop_views(cmc_lab(S), S), batch_size=8, image_size=S, mode="eval")
    assert not ev.continuous and not ev.sampler.shuffle and not ev.sampler.drop_last
    idx = torch.cat([b.index for b in ev])
    assert idx.tolist() == list(range(ev.sampler.num_samples))
    ev.close()
    tr = build_loader(data, recipe="eval", batch_size=8, image_size=S, mode="train")
    assert tr.continuous and tr.sampler.shuffle and tr.sampler.drop_last
    tr.close()
    with pytest.raises(ValueError, match="mode"):
        build_loader(data, recipe="eval", batch_size=8, image_size=S, mode="val")


# -- the fused (GPU) DALI graph, run with CPU operators; device plumbing; batched reads -------------
def test_fused_graph_matches_the_views_graph(converted):
    """The GPU code path (decode + resize in DALI on its pipelined executor, photometric in torch),
    run with CPU operators: same samples, labels and records as the CPU views path, nearly the same
    pixels (both antialiased bilinear resizes), for train (continuous, two epochs) and eval."""
    data, _ = _split(converted)
    for mode, recipe in (("train", "simclr"), ("eval", "eval")):
        kw = dict(batch_size=8, image_size=S, seed=3, return_aug=True, mode=mode, recipe=recipe)
        views = build_loader(data, **kw)
        fused = build_loader(data, dali_graph="fused", **kw)
        epochs = 2 if mode == "train" else 1
        a = [b for _ in range(epochs) for b in views]
        f = [b for _ in range(epochs) for b in fused]
        assert len(a) == len(f) > 2
        for ba, bf in zip(a, f):
            assert torch.equal(ba.index, bf.index) and torch.equal(ba.label, bf.label)
            for ra, rf in zip(ba.aug, bf.aug):
                assert all(torch.equal(ra[k], rf[k]) for k in ra)
            for va, vf in zip(ba.views, bf.views):
                assert va.shape == vf.shape and (va - vf).abs().mean() < 0.08
        views.close()
        fused.close()


@pytest.mark.parametrize("batch_size", [2, 8, 64])
def test_fused_graph_skips_a_corrupt_member(corrupt_split, converted, batch_size):
    """A member that passes the marker check but fails DALI's decode: the pipelined graph is rebuilt,
    the batches it held run again, the culprit is skipped and counted. batch_size 2 puts it in the
    third batch (others in flight around it), 8 in the first, 64 gives a single batch: fewer than
    PIPELINE_DEPTH, so the graph starts padded."""
    _, manifest, _ = converted
    loader = build_loader(corrupt_split, recipe="eval", batch_size=batch_size, image_size=S, mode="eval",
                          dali_graph="fused")
    seen = torch.cat([b.index for b in loader]).tolist()
    assert seen == [i for i in range(manifest["num_samples"]) if i != 5]
    assert loader.stats["skipped"] == 1 and loader.stats["skipped_samples"][0][0] == 5
    assert "entropy" in loader.stats["skipped_samples"][0][1]
    loader.close()


def test_fused_graph_is_refused_where_it_cannot_run(converted):
    data, _ = _split(converted)
    with pytest.raises(ValueError, match="dali_graph applies"):
        build_loader(data, backend="ffcv", batch_size=8, image_size=S, dali_graph="fused")
    with pytest.raises(ValueError, match="graph='bogus'"):
        build_loader(data, batch_size=8, image_size=S, dali_graph="bogus")


def test_dali_pipeline_gets_the_loaders_own_gpu():
    """DALI's device_id comes from the indexed device (rank r's loader decodes on cuda:r) and the
    fused graph runs on the pipelined executor; the views ring stays synchronous."""
    from types import SimpleNamespace
    from pipeline.loaders.dali import DaliBackend
    fake = SimpleNamespace(device=torch.device("cuda", 1), batch_size=8, num_threads=3, fused=True,
                           PIPELINE_DEPTH=DaliBackend.PIPELINE_DEPTH)
    kw = DaliBackend.pipeline_kwargs(fake)
    assert kw["device_id"] == 1 and kw["exec_pipelined"] and kw["exec_async"]
    assert kw["prefetch_queue_depth"] == DaliBackend.PIPELINE_DEPTH
    fake.device = torch.device("cuda")
    with pytest.raises(ValueError, match="indexed CUDA device"):
        DaliBackend.pipeline_kwargs(fake)
    cpu = SimpleNamespace(device=torch.device("cpu"), batch_size=8, num_threads=2, fused=False)
    kw = DaliBackend.pipeline_kwargs(cpu)
    assert kw["device_id"] is None and not kw["exec_pipelined"]


def test_unindexed_cuda_resolves_to_the_current_device(monkeypatch):
    from pipeline.loaders.prefetch import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")


def test_producer_thread_makes_the_loaders_gpu_current(monkeypatch):
    import threading
    from pipeline.loaders.prefetch import prefetched
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append((threading.current_thread().name, d)))
    assert list(prefetched(iter([1, 2, 3]), 2, "producer-x", torch.device("cuda", 2))) == [1, 2, 3]
    assert seen == [("producer-x", torch.device("cuda", 2))]
    seen.clear()
    assert list(prefetched(iter([1]), 1, "producer-y", torch.device("cpu"))) == [1]
    assert seen == []


def test_read_many_equals_read(converted):
    split_dir, manifest, _ = converted
    idx = ShardIndex(split_dir)
    n = manifest["num_samples"]
    rng = np.random.default_rng(0)
    for indices in (rng.permutation(n)[:20], np.arange(n), np.array([3, 3, n - 1, 0, 3])):
        got = idx.read_many(indices)
        for i, (data, label) in zip(indices.tolist(), got):
            want = idx.read(i)
            assert data.tobytes() == want[0] and label == want[1]
    assert idx.read_many([]) == []
    with pytest.raises(IndexError):
        idx.read_many([n])
    idx.close()


def test_read_many_names_a_short_shard(converted, tmp_path):
    split_dir, manifest, _ = converted
    out = tmp_path / "train"
    shutil.copytree(split_dir, out)
    sh = manifest["shards"][-1]
    tar = out / sh["tar"]
    tar.write_bytes(tar.read_bytes()[:2048])
    idx = ShardIndex(out)
    with pytest.raises(ShardError, match="shorter than its index"):
        idx.read_many(np.arange(sh["first_index"], sh["first_index"] + sh["num_samples"]))
    idx.close()

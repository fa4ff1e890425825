"""Clip views of a video split: spec, CVRL temporal sampling, parameters, and `build_clip_loader`.

    loader = build_clip_loader(data="OUT", split="train", recipe="cvrl", batch_size=64, frames=16, stride=2,
                               image_size=112, rank=rank, world_size=world, seed=0, device="cuda")
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:   # Batch: .views [B x C x T x H x W] x 2, .index, .label int64[B], .times [B x T] x 2
            ...

A clip view is an image view (`pipeline.views.spec.ViewSpec`: crop, flip, jitter, grayscale, blur, solarize,
colour space) applied *identically to every frame* of a clip, plus a temporal window: `frames` frames,
`stride` apart. A `ClipSpec` holds one ViewSpec per clip (a `RecipeSpec`, so any image recipe can be
used for clips) and a `TemporalSpec` saying where the clips start.

Temporal sampling, "cvrl" (Qian et al. 2021, "Spatiotemporally Augmented Contrastive Video
Representation Learning", and its official code, tensorflow/models official/projects/video_ssl):
with L the video's frame count and span = (frames - 1) * stride, the M = L - span valid start frames
are 0..M-1. The distance between the two clips' starts is d = floor(M x), x drawn from the decreasing
density  f(x) = (p + 1) / p * (1 - x^p)  on [0, 1]  (CDF  F(x) = ((p + 1) x - x^(p + 1)) / p;  p = power,
1 by default: the linear density 2 (1 - x), CVRL's default), so near clips are more likely than far ones;
the earlier start is uniform over the M - d positions that fit, and which clip comes first is a fair coin.
A video shorter than one clip (M <= 0) gets two independent uniform starts in [0, L) and frames that
wrap around (CVRL pads by repeating the video). "uniform": independent uniform starts; "center": the
centred window (eval).

Randomness: like `pipeline.views.params` for images, every number is a pure function of (seed, epoch, global
index, stream): clip c's spatial parameters are `pipeline.views.params.view_params(view, seed, epoch,
stream=c, ...)` (the very records the image backends use), the temporal draw uses stream
TEMPORAL_STREAM. So clips do not depend on batch size, workers, rank, or where a run resumed.

Pixels: the decoder (`pipeline.loaders.video_decode`: PyAV, or DALI where it can) decodes only the frames the
sample's clips need; each clip's frames are cropped to the recorded box and resized (PIL) in worker
threads; then `clip_photometric` runs `pipeline.views.torch_ops.photometric` on each clip laid out as one tall
image of its T frames, so flip, the jitter / grayscale matrix (contrast blends towards the *clip's* mean
gray, as CVRL jitters a clip as one image) and solarize are the image implementation applied once per
clip, and the Gaussian blur is applied per frame with the clip's sigma (`torch_ops.gaussian_blur`).

The loader is `pipeline.loaders.loader.ViewLoader` (same contract as `build_loader`: set_epoch, __len__,
state_dict / load_state_dict with exact resume, rank partition by `pipeline.loaders.sampler.EpochSampler`,
`stats`), over a backend that produces clip batches. A member whose metadata or video cannot be read
(corrupt, truncated, fewer frames than its .json says) is skipped and counted in `loader.stats`; a
missing shard raises `ShardError` naming it.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from numba import njit

from pipeline.views import torch_ops
from pipeline.loaders.batch import Batch, aug_records
from pipeline.loaders.prefetch import RawBatch, prefetched, take
from pipeline.loaders.loader import ViewLoader, _on, loader_setup
from pipeline.views.params import sample_key, uniform, view_params
from pipeline.views.recipes import RECIPES, eval_recipe, get_recipe, with_crop_min_scale, without_blur
from pipeline.loaders.sampler import EpochSampler
from pipeline.format.errors import BadSample
from pipeline.views.spec import BlurSpec, CropSpec, JitterSpec, RecipeSpec, ViewSpec
from pipeline.loaders.video_decode import (DaliVideoDecoder, VideoIndex, crop_resize, crop_resize_torch, make_decoder,
                                           pyav_decode)

TEMPORAL_STREAM = 0x7E3A
"""Random stream of the temporal draws (clip c's spatial parameters use stream c)."""
TEMPORAL_KINDS = ("cvrl", "uniform", "center")
_TK = {k: i for i, k in enumerate(TEMPORAL_KINDS)}
# Slots of the temporal key: 0 offset fraction x | 1 position of the earlier clip | 2 order coin |
# 8 + c independent start of clip c ("uniform", and "cvrl" on videos shorter than a clip)


# -- spec ------------------------------------------------------------------------------------------
@dataclass(kw_only=True, slots=True, frozen=True)
class TemporalSpec:
    """Where the clips of a video start (see the module docstring)."""
    kind: Literal["cvrl", "uniform", "center"] = "cvrl"
    power: float = 1.0
    """cvrl: the offset density is proportional to 1 - x^power on [0, 1] (x = offset / valid starts);
    larger powers flatten it towards uniform, power -> 0 concentrates it at 0."""

    def __post_init__(self):
        if self.kind not in TEMPORAL_KINDS:
            raise ValueError(f"TemporalSpec.kind={self.kind!r}: want one of {TEMPORAL_KINDS}")
        if not (self.power > 0 and math.isfinite(self.power)):
            raise ValueError(f"TemporalSpec.power={self.power}: must be > 0")


@dataclass(kw_only=True, slots=True, frozen=True)
class ClipSpec:
    """Clips of `frames` frames, `stride` apart; clip c gets `spatial.views[c]` on every frame."""
    name: str
    spatial: RecipeSpec
    frames: int = 8
    stride: int = 2
    temporal: TemporalSpec = field(default_factory=TemporalSpec)

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"ClipSpec.frames={self.frames}: must be >= 1")
        if self.stride < 1:
            raise ValueError(f"ClipSpec.stride={self.stride}: must be >= 1")
        if self.spatial.shared_params:
            raise ValueError(f"clip recipe {self.name!r}: shared_params (one crop, several colour views) is not "
                             f"supported for clips")
        for i, v in enumerate(self.spatial.views):
            if v.randaugment is not None:
                raise ValueError(f"clip recipe {self.name!r}, view {i}: RandAugment has per-image statistics and "
                                 f"is not supported for clips")
        if self.temporal.kind == "cvrl" and len(self.spatial.views) != 2:
            raise ValueError(f"clip recipe {self.name!r}: cvrl temporal sampling needs exactly 2 clips, "
                             f"got {len(self.spatial.views)}")

    @property
    def views(self) -> tuple[ViewSpec, ...]:
        return self.spatial.views

    @property
    def num_clips(self) -> int:
        return len(self.spatial.views)

    @property
    def span(self) -> int:
        """Frames covered by one clip, first to last: (frames - 1) * stride + 1."""
        return (self.frames - 1) * self.stride + 1

    def param_stream(self, view: int) -> int:
        return view


# -- recipes ---------------------------------------------------------------------------------------
def cvrl(image_size: int = 112, frames: int = 16, stride: int = 2, power: float = 1.0) -> ClipSpec:
    """CVRL's clips: crop area (0.3, 1) aspect (0.5, 2), flip, SimCLR jitter 0.8/0.8/0.8/0.2 p=0.8, gray 0.2,
    blur p=0.5 (kernel 10% of the side), all temporally consistent; cvrl temporal sampling."""
    v = ViewSpec(crop=CropSpec(size=image_size, scale=(0.3, 1.0), ratio=(0.5, 2.0)), flip_p=0.5,
                 jitter=JitterSpec(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, p=0.8),
                 grayscale_p=0.2, blur=BlurSpec(p=0.5, sigma=(0.1, 2.0), kernel_fraction=0.1))
    return ClipSpec(name="cvrl", spatial=RecipeSpec(name="cvrl", views=(v, v)), frames=frames, stride=stride,
                    temporal=TemporalSpec(kind="cvrl", power=power))


def eval_clip(image_size: int = 112, frames: int = 16, stride: int = 2) -> ClipSpec:
    """One centred clip, centre crop (0.875 of the shorter side), no augmentation: kNN / linear eval."""
    return ClipSpec(name="eval", spatial=eval_recipe(image_size), frames=frames, stride=stride,
                    temporal=TemporalSpec(kind="center"))


CLIP_RECIPES = {"cvrl": cvrl, "eval": eval_clip}


def get_clip_recipe(recipe: str | ClipSpec | RecipeSpec, image_size: int = 112, frames: int = 16, stride: int = 2,
                    blur: bool = True, crop_min_scale: float = 0.0) -> ClipSpec:
    """A clip recipe by name (CLIP_RECIPES, or any image recipe of pipeline.RECIPES: its views become
    clip views, with cvrl temporal sampling for two views and uniform starts otherwise), a RecipeSpec
    (likewise), or a ClipSpec passed through. blur=False drops every view's Gaussian blur;
    crop_min_scale sets the lower bound of the spatial crops' area range (every frame of a clip is
    cropped alike, so the same bound holds as for images)."""
    if isinstance(recipe, ClipSpec):
        spec = recipe
    elif isinstance(recipe, str) and recipe in CLIP_RECIPES:
        spec = CLIP_RECIPES[recipe](image_size=image_size, frames=frames, stride=stride)
    elif isinstance(recipe, RecipeSpec) or (isinstance(recipe, str) and recipe in RECIPES):
        sp = get_recipe(recipe, image_size)
        kind = "cvrl" if len(sp.views) == 2 and not sp.shared_params else "uniform"
        spec = ClipSpec(name=f"{sp.name}_clips", spatial=sp, frames=frames, stride=stride,
                        temporal=TemporalSpec(kind=kind))
    else:
        raise KeyError(f"unknown clip recipe {recipe!r}; known: {', '.join(CLIP_RECIPES)} (or an image recipe: "
                       f"{', '.join(RECIPES)})")
    if not blur and any(v.blur is not None for v in spec.views):
        spec = dataclasses.replace(spec, name=f"{spec.name}-noblur", spatial=without_blur(spec.spatial))
    if crop_min_scale:
        spec = dataclasses.replace(spec, name=f"{spec.name}-crop{crop_min_scale:g}",
                                   spatial=with_crop_min_scale(spec.spatial, crop_min_scale))
    return spec


# -- temporal sampling -----------------------------------------------------------------------------
@njit(cache=True)
def offset_cdf(x, power):
    """CDF of the cvrl offset fraction x in [0, 1]: ((p + 1) x - x^(p + 1)) / p."""
    return ((power + 1.0) * x - x ** (power + 1.0)) / power


@njit(cache=True)
def offset_quantile(u, power):
    """Inverse of offset_cdf (closed form for power 1, else 64 bisection steps)."""
    if power == 1.0:
        return 1.0 - math.sqrt(1.0 - u)
    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if offset_cdf(mid, power) < u:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@njit(cache=True)
def _temporal(seed, epoch, indices, num_frames, frames, stride, kind, power, nclips):
    n = indices.shape[0]
    starts = np.zeros((n, nclips), np.int64)
    offset = np.zeros(n, np.int64)
    span = (frames - 1) * stride
    for b in range(n):
        key = sample_key(seed, epoch, indices[b], TEMPORAL_STREAM)
        L = num_frames[b]
        M = L - span
        if kind == 2:  # center
            s = (M - 1) // 2 if M > 0 else 0
            for c in range(nclips):
                starts[b, c] = s
        elif kind == 0 and M > 0:  # cvrl
            d = min(int(offset_quantile(uniform(key, 0), power) * M), M - 1)
            s0 = min(int(uniform(key, 1) * (M - d)), M - d - 1)
            s1 = s0 + d
            if uniform(key, 2) < 0.5:
                s0, s1 = s1, s0
            starts[b, 0], starts[b, 1] = s0, s1
            offset[b] = d
        else:  # uniform, or cvrl on a video shorter than one clip
            mv = M if M > 0 else L
            for c in range(nclips):
                starts[b, c] = min(int(uniform(key, 8 + c) * mv), mv - 1)
            if nclips > 1:
                offset[b] = abs(starts[b, 1] - starts[b, 0])
    return starts, offset


def temporal_params(spec: ClipSpec, seed: int, epoch: int, indices, num_frames) -> dict:
    """start (n, clips) int64, offset (n,) int64 (|start difference| of clips 0 and 1) and frames
    (n, clips, T) int64 frame indices (wrapping around videos shorter than a clip)."""
    indices = np.ascontiguousarray(indices, np.int64)
    num_frames = np.ascontiguousarray(num_frames, np.int64)
    if (indices < 0).any() or (num_frames < 1).any():
        raise ValueError("want indices >= 0 and num_frames >= 1")
    t = spec.temporal
    starts, offset = _temporal(int(seed), int(epoch), indices, num_frames, int(spec.frames), int(spec.stride),
                               _TK[t.kind], float(t.power), spec.num_clips)
    steps = np.arange(spec.frames, dtype=np.int64) * spec.stride
    fr = (starts[:, :, None] + steps[None, None, :]) % num_frames[:, None, None]
    return {"start": starts, "offset": offset, "frames": fr}


def sample_clip_params(spec: ClipSpec, seed: int, epoch: int, indices, num_frames, widths, heights) -> list[dict]:
    """One record per clip: `pipeline.views.params.view_params` of its view (stream = clip number; crop box in
    source pixels, flip, jitter, grayscale, blur sigma, solarize, size) plus start (n,), frames (n, T),
    offset (n,) and num_frames (n,)."""
    tp = temporal_params(spec, seed, epoch, indices, num_frames)
    out = []
    for c, view in enumerate(spec.views):
        rec = view_params(view, seed, epoch, c, indices, widths, heights)
        rec["start"] = tp["start"][:, c].copy()
        rec["frames"] = np.ascontiguousarray(tp["frames"][:, c])
        rec["offset"] = tp["offset"].copy()
        rec["num_frames"] = np.asarray(num_frames, np.int64).copy()
        out.append(rec)
    return out


# -- pixels ----------------------------------------------------------------------------------------
def clip_photometric(clips: torch.Tensor, rec: dict, view: ViewSpec) -> torch.Tensor:
    """uint8 clips (n, T, S, S, 3) -> float (n, 3, T, S, S) in [0, 1], with the record's flip, jitter,
    grayscale, blur and solarize applied identically to every frame of a clip."""
    n, T, S = clips.shape[0], clips.shape[1], clips.shape[2]
    tall = clips.reshape(n, T * S, S, 3)  # frame t = rows t*S..(t+1)*S: per-image stats are per clip
    solar = np.asarray(rec["solarize"], bool)
    x = torch_ops.photometric(tall, {**rec, "solarize": np.zeros_like(solar)},
                              dataclasses.replace(view, blur=None))
    sigma = np.asarray(rec["blur_sigma"], np.float32)  # decisions on the host: no device read
    if view.blur is not None and (sigma > 0).any():
        sel_h = np.flatnonzero(sigma > 0)
        sel = torch_ops._as(sel_h, x.device)
        k = len(sel_h)
        xs = x[sel].view(k, 3, T, S, S).transpose(1, 2).reshape(k * T, 3, S, S)
        xs = torch_ops.gaussian_blur(xs, torch_ops._as(np.repeat(sigma[sel_h], T), x.device),
                                     view.blur.kernel_size(S))
        x[sel] = xs.view(k, T, 3, S, S).transpose(1, 2).reshape(k, 3, T * S, S)
    if solar.any():
        sol = torch_ops._as(solar, x.device)
        x = torch.where(sol[:, None, None, None] & (x >= view.solarize_threshold), 1 - x, x)
    return x.view(n, 3, T, S, S)


# -- backend ---------------------------------------------------------------------------------------
class ClipBackend:
    """Reads, decodes and crops the clips of a batch (see the module docstring); `iterate` runs a
    producer thread up to `prefetch` batches ahead, with `num_workers` decode threads."""

    def __init__(self, split_dir: str | Path, spec: ClipSpec, *, batch_size: int, decoder: str = "pyav",
                 device: str = "cpu", num_workers: int = 2, seed: int = 0, prefetch: int = 2):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: must be >= 1")
        self.index = VideoIndex(split_dir)
        self.spec, self.batch_size, self.seed, self.prefetch = spec, batch_size, seed, prefetch
        self.device = torch.device(device)
        self.decoder = make_decoder(decoder, device, num_threads=num_workers, max_batch=batch_size)
        self.num_workers = num_workers
        self._pool: ThreadPoolExecutor | None = None
        self.decode_stats: dict = {}

    @property
    def decoder_used(self) -> str:
        d = self.decoder
        return d.name if d.fallback is None else f"pyav (dali fallback: {d.fallback})"

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            init = ((lambda: torch.cuda.set_device(self.device)) if self.device.type == "cuda" else None)
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="clip-decode", initializer=init)
        return self._pool

    def _crops(self, decoded, needed: np.ndarray, params: list[dict], j: int) -> list:
        """Each view's frames of clip j, cropped and resized: numpy + PIL for host frames, torch on the
        frames' device for tensors (the DALI GPU decoder's output stays on the GPU)."""
        out = []
        for c, view in enumerate(self.spec.views):
            pos = np.searchsorted(needed, params[c]["frames"][j])
            if isinstance(decoded, torch.Tensor):
                sel = decoded[torch.from_numpy(pos).to(decoded.device, non_blocking=True)]
                out.append(crop_resize_torch(sel, params[c]["crop"][j], view.size))
            else:
                out.append(crop_resize(decoded[pos], params[c]["crop"][j], view.size))
        return out

    def _pyav_task(self, i: int, needed: np.ndarray, params: list[dict], j: int):
        try:
            decoded = pyav_decode(self.index.read_video(i), needed, 1, self.decode_stats)
            self._check_size(decoded, params, j)
            return self._crops(decoded, needed, params, j)
        except BadSample as e:
            return e

    @staticmethod
    def _check_size(decoded: np.ndarray, params: list[dict], j: int) -> None:
        h, w = params[0]["size"][j]
        if decoded.shape[1:3] != (h, w):
            raise BadSample(f"decoded frames are {decoded.shape[2]}x{decoded.shape[1]}, the .json says {w}x{h}")

    def load(self, epoch: int, indices: np.ndarray) -> RawBatch:
        keep, labels, nf, ws, hs, skipped = [], [], [], [], [], []
        for i in indices.tolist():
            try:
                meta, label = self.index.read_meta(i)
            except BadSample as e:
                skipped.append((i, str(e)))
                continue
            keep.append(i)
            labels.append(label)
            nf.append(int(meta["num_frames"]))
            ws.append(int(meta["width"]))
            hs.append(int(meta["height"]))
        keep_a = np.asarray(keep, np.int64)
        params = sample_clip_params(self.spec, self.seed, epoch, keep_a, np.asarray(nf, np.int64),
                                    np.asarray(ws, np.int64), np.asarray(hs, np.int64))
        needed = [np.unique(np.concatenate([p["frames"][j] for p in params])) for j in range(len(keep))]
        pool = self._executor()
        dec = self.decoder
        if isinstance(dec, DaliVideoDecoder) and dec.fallback is None:
            datas = [self.index.read_video(i) for i in keep]
            decoded = dec.decode_batch(datas, needed)

            def finish(j):
                if isinstance(decoded[j], BadSample):
                    return decoded[j]
                try:
                    self._check_size(decoded[j], params, j)
                    return self._crops(decoded[j], needed[j], params, j)
                except BadSample as e:
                    return e
            results = list(pool.map(finish, range(len(keep))))
        else:
            results = list(pool.map(lambda j: self._pyav_task(keep[j], needed[j], params, j), range(len(keep))))
        ok = []
        for j, r in enumerate(results):
            if isinstance(r, BadSample):
                skipped.append((keep[j], str(r)))
            else:
                ok.append(j)
        if len(ok) < len(keep):
            ok_a = np.asarray(ok, np.int64)
            keep_a, labels, params = keep_a[ok_a], [labels[j] for j in ok], take(params, ok_a)
            results = [results[j] for j in ok]
        crops = {}
        if len(results):
            for c in range(self.spec.num_clips):
                parts = [r[c] for r in results]
                crops[c] = (torch.stack(parts) if isinstance(parts[0], torch.Tensor)
                            else torch.from_numpy(np.stack(parts)))
        return RawBatch(crops=crops, index=keep_a, label=np.asarray(labels, np.int64), params=params,
                        skipped=skipped)

    def iterate(self, segments):
        """RawBatches for `segments` ((epoch, index batches) pairs), produced by a thread up to `prefetch`
        ahead."""
        return prefetched((self.load(epoch, b) for epoch, batches in segments for b in batches), self.prefetch,
                          "clip-producer", self.device)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.index.close()


# -- loader ----------------------------------------------------------------------------------------
class ClipLoader(ViewLoader):
    """`pipeline.loaders.loader.ViewLoader` over clip batches: views are (B, C, T, S, S) float tensors."""

    def state_dict(self) -> dict:
        s = super().state_dict()
        s.update(frames=self.recipe.frames, stride=self.recipe.stride)
        return s

    def load_state_dict(self, state: dict) -> None:
        for k in ("frames", "stride"):
            if state.get(k) != getattr(self.recipe, k):
                raise ValueError(f"loader state has {k}={state.get(k)!r}, this loader {getattr(self.recipe, k)!r}: "
                                 f"resuming would not reproduce the original clips")
        super().load_state_dict(state)

    def _finish(self, raw: RawBatch) -> Batch:
        st = self.stats
        st["batches"] += 1
        st["samples"] += len(raw.index)
        st["skipped"] += len(raw.skipped)
        st["skipped_samples"].extend(raw.skipped[: max(0, 1000 - len(st["skipped_samples"]))])
        st["decoder"] = self.backend.decoder_used
        T = self.recipe.frames
        views = []
        for c, view in enumerate(self.recipe.views):
            S, C = view.size, view.num_channels
            n = len(raw.index)
            if n:
                x = clip_photometric(_on(raw.crops[c], self.device), raw.params[c], view)  # (n, 3, T, S, S)
                y = torch_ops.to_output(x.view(n, 3, T * S, S), view.color).view(n, C, T, S, S)
            else:
                y = torch.zeros(0, C, T, S, S, device=self.device)
            views.append(y)
        return Batch(views=views, index=torch.from_numpy(raw.index.astype(np.int64)),
                     label=torch.from_numpy(raw.label.astype(np.int64)),
                     aug=aug_records(raw.params) if self.return_aug else None,
                     times=[torch.from_numpy(np.ascontiguousarray(rec["frames"], np.int64)) for rec in raw.params])


def build_clip_loader(data: str | Path, split: str = "train", recipe: str | ClipSpec | RecipeSpec = "cvrl", *,
                      batch_size: int, frames: int = 16, stride: int = 2, image_size: int = 112, rank: int = 0,
                      world_size: int = 1, seed: int = 0, device: str = "cpu", decoder: str = "pyav",
                      num_workers: int = 2, mode: str = "train", shuffle: bool | None = None,
                      drop_last: bool | None = None,
                      return_aug: bool = False, prefetch: int = 2, blur: bool = True,
                      continuous: bool | None = None) -> ClipLoader:
    """A clip loader over the video split OUT/<split> (see the module docstring).

    recipe: "cvrl" (two clips, CVRL temporal sampling and augmentation), "eval" (one centred clip, centre
    crop, no augmentation), any image recipe name (its views become clip views), or a ClipSpec.
    decoder: "pyav" (CPU) or "dali" (DALI's video decoder, NVDEC when device="cuda"; falls back to PyAV
    where DALI cannot decode, see loader.stats["decoder"]). num_workers: decode threads. shuffle /
    mode, shuffle, drop_last, continuous: as build_loader's ("train" or "eval" sets the defaults).
    """
    spec = get_clip_recipe(recipe, image_size, frames, stride, blur)
    split_dir, dev, order = loader_setup(mode, data, split, device, shuffle, drop_last, continuous)
    be = ClipBackend(split_dir, spec, batch_size=batch_size, decoder=decoder, device=dev,
                     num_workers=num_workers, seed=seed, prefetch=prefetch)
    sampler = EpochSampler(num_samples=be.index.num_samples, batch_size=batch_size, rank=rank,
                           world_size=world_size, seed=seed, shuffle=order["shuffle"], drop_last=order["drop_last"])
    return ClipLoader(be, spec, sampler, dev, return_aug, continuous=order["continuous"])

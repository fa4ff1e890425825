"""Views on the CPU, one image at a time in a thread pool: resize, flip, colour, blur, solarize, normalize.

Why a second executor next to `pipeline.views.torch_ops`: on a CPU-only machine the batched torch ops were
~95% of a batch (`pipeline.bench`, 2 cores): every op makes a float32 copy of the whole batch, the blur
is two dense matrix products, and all of it runs in the consumer thread. Here each image stays uint8
until the last step and every op is one SIMD pass over 224 x 224 x 3 bytes (per-view cost measured on
this 2-core VM, one thread: antialiased resize 0.15-0.35 ms (torch's uint8 AVX2 kernel), flip 0.01,
colour matrix 0.02, 23-tap separable blur 0.3, solarize LUT 0.08, normalize into CHW float 0.09),
spread over `num_threads` threads (OpenCV, numpy and torch release the GIL). On a GPU the batched torch
ops stay the right tool, and the loader uses them there.

The ops are the same as torch_ops', applied from the same parameter records: the colour matrix comes
from `torch_ops.color_affine` (jitter in the recorded order + grayscale as one affine map), the blur
taps are the same Gaussian with the same kernel size and reflect-101 borders, solarize uses the same
threshold. The differences are rounding: colour and blur results are rounded to uint8 (<= 0.5 / 255
each) where torch_ops keeps float32; `tests/test_pipeline_loader.py` checks the two agree.

Views that need RandAugment or a colour space other than RGB (infomin, cmc_*) get only the resize here
and go through torch_ops (`needs_torch`).
"""

from __future__ import annotations

import math
import mmap
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.views.spec import RecipeSpec, ViewSpec
from pipeline.views.torch_ops import color_affine

cv2.setNumThreads(1)  # our threads are the parallelism; OpenCV's own pool would oversubscribe 2 cores


class _HugePages:
    """Large anonymous mappings backed by transparent huge pages, reused once no tensor uses them.

    Why: a fresh 38 MB batch (64 x 3 x 224 x 224 float32) first-touched in 4 KiB pages cost 0.35 ms per
    image on the 2-core VM, as much as resizing it; with MADV_HUGEPAGE 0.09 ms; a region that is reused
    is already mapped and costs nothing (two views a sample: ~0.2 core-ms of ~3 saved, measured). A region
    is free when its only references are the pool's: every tensor made by torch.frombuffer (and every
    view or numpy array of it) holds the buffer, so a region whose batch is still held anywhere is never
    handed out again. At most `keep` regions per size are kept; beyond that they are unmapped when freed."""

    def __init__(self, keep: int = 12):
        self.keep = keep
        self._regions: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> mmap.mmap:
        with self._lock:
            regions = self._regions.setdefault(nbytes, [])
            for mem in regions:
                if sys.getrefcount(mem) == 3:  # the list, `mem`, getrefcount's argument: no tensor
                    return mem
            mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            mem.madvise(mmap.MADV_HUGEPAGE)
            if len(regions) < self.keep:
                regions.append(mem)
            return mem


_POOL = _HugePages()


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.empty for a batch, from a reused huge-page region when large (see _HugePages)."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes < (4 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(_POOL.take(nbytes), dtype=dtype).view(shape)  # the tensor holds the region


def needs_torch(view: ViewSpec) -> bool:
    """True when the view has ops this executor leaves to torch_ops (RandAugment, non-RGB output)."""
    c = view.color
    return view.randaugment is not None or c.space != "rgb" or tuple(c.channels) != (0, 1, 2)


def gaussian_taps(sigma: float, ksize: int) -> np.ndarray:
    """The taps torch_ops.gaussian_blur uses: exp(-t^2 / 2 sigma^2), t = -r..r, normalized -- except that
    taps below 1e-7 of the centre tap (|t| > 5.7 sigma) are left out, which changes no uint8 result
    and makes the common small sigmas 2-3x cheaper than the full kernel_size."""
    r = min(ksize // 2, math.ceil(5.7 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def resize(img: np.ndarray, box, size: int) -> np.ndarray:
    """HWC uint8 window (top, left, h, w) of img -> size x size x 3 uint8, bilinear, antialiased when
    shrinking (the filter of torchvision's antialias=True and of DALI's linear resize).

    Enlarging: OpenCV's INTER_LINEAR (antialiasing does nothing when enlarging; half-pixel centres and
    edge clamping as torch; weights in 11-bit fixed point, so results differ by at most 1). Shrinking:
    torch's uint8 antialiased kernel, which is SIMD only for a contiguous channels-last input (hence the
    copy of the window: 0.25 ms instead of 0.45 ms)."""
    y, x, h, w = (int(v) for v in box)
    window = img[y:y + h, x:x + w]
    if h <= size and w <= size:
        return cv2.resize(window, (size, size), interpolation=cv2.INTER_LINEAR)
    src = torch.from_numpy(np.ascontiguousarray(window))[None].permute(0, 3, 1, 2)
    out = F.interpolate(src, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()  # channels-last in memory: this is a contiguous HWC view


class CpuViews:
    """Finishes the views of a batch from per-sample uint8 images and the batch's parameter records."""

    def __init__(self, recipe: RecipeSpec, num_threads: int = 2):
        self.recipe = recipe
        self.num_threads = max(1, int(num_threads))
        # torch.set_num_threads is per thread under OpenMP: each pool thread runs its torch ops alone
        # (without it every pool thread would start its own OpenMP team and 2 cores would run 4+ threads)
        self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="cpu-views",
                                        initializer=torch.set_num_threads, initargs=(1,))
        self._norm = []
        for view in recipe.views:
            std = np.asarray(view.color.std, np.float64)
            mean = np.asarray(view.color.mean, np.float64)
            self._norm.append([(np.float32(1 / (255 * s)), np.float32(-m / s)) for m, s in zip(mean, std)])
        # solarize: x / 255 >= threshold -> 1 - x / 255, exactly torch_ops' test on uint8 values
        k = np.arange(256)
        self._solarize = [np.where(k >= math.ceil(view.solarize_threshold * 255 - 1e-9), 255 - k, k).astype(np.uint8)
                          for view in recipe.views]

    def _map(self, fn, n: int) -> None:
        """fn(lo, hi) over `num_threads` contiguous chunks of range(n), in the pool."""
        k = min(self.num_threads, n)
        bounds = [round(i * n / k) for i in range(k + 1)]
        for f in [self._pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(k)]:
            f.result()

    def run(self, images: list[np.ndarray], params: list[dict], streams: dict[int, int],
            resized: dict[int, np.ndarray] | None = None, origins: np.ndarray | None = None):
        """images: per sample HWC uint8 source images (None when `resized` holds the crops already),
        or windows of them whose top-left corners in the source are `origins` (n, 2) (y, x);
        resized: stream -> uint8 (n, S, S, 3) crops already cut and resized (the ffcv decoder does that).
        Returns (views, crops): views {view index: float32 (n, 3, S, S) finished tensor} for the views
        this executor completes, crops {stream: uint8 (n, S, S, 3)} of the streams torch_ops must finish."""
        rec = self.recipe
        n = len(params[0]["flip"]) if params else 0
        torch_streams = {rec.param_stream(v) for v, view in enumerate(rec.views) if needs_torch(view)}
        crops = {s: (resized[s] if resized is not None else
                     empty((n, rec.views[v].size, rec.views[v].size, 3), torch.uint8).numpy())
                 for s, v in streams.items()}
        fast = [v for v, view in enumerate(rec.views) if not needs_torch(view)]
        views = {v: empty((n, 3, rec.views[v].size, rec.views[v].size)) for v in fast}

        def chunk(lo, hi):
            # geometry: every stream's crop, and its mean colour (contrast blends towards its gray level)
            means = {}
            for s, v in streams.items():
                size, p, m = rec.views[v].size, params[v], np.empty((hi - lo, 3))
                for i in range(lo, hi):
                    if resized is None:
                        box = p["crop"][i] if origins is None else np.concatenate([p["crop"][i][:2] - origins[i],
                                                                                   p["crop"][i][2:]])
                        crops[s][i] = resize(images[i], box, size)
                    m[i - lo] = cv2.mean(crops[s][i])[:3]
                means[s] = m
            for v in fast:
                self._photometric(v, params[v], crops[rec.param_stream(v)], means[rec.param_stream(v)],
                                  views[v].numpy(), lo, hi)

        self._map(chunk, n)
        return views, {s: c for s, c in crops.items() if s in torch_streams}

    def _photometric(self, v: int, p: dict, crops: np.ndarray, means: np.ndarray, out: np.ndarray,
                     lo: int, hi: int) -> None:
        """Samples lo:hi of view v: flip, colour matrix, blur, solarize, normalize into out (n, 3, S, S)."""
        view = self.recipe.views[v]
        affine = None
        if bool(p["jitter_on"][lo:hi].any()) or bool(p["gray"][lo:hi].any()):
            A, b = color_affine({k: p[k][lo:hi] for k in ("jitter", "jitter_order", "gray")},
                                torch.from_numpy(means / 255))
            affine = np.concatenate([A.numpy(), 255 * b.numpy()[:, :, None]], 2).astype(np.float32)
            on = p["jitter_on"] | p["gray"]
        ks = view.blur.kernel_size(view.size) if view.blur is not None else 0
        norm = self._norm[v]
        for i in range(lo, hi):
            x = crops[i]
            if p["flip"][i]:
                x = cv2.flip(x, 1)
            if affine is not None and on[i]:
                x = cv2.transform(x, affine[i - lo])  # rounds and saturates: the clamp to [0, 1]
            sigma = float(p["blur_sigma"][i])
            if sigma > 0:
                k = gaussian_taps(sigma, ks)
                x = cv2.sepFilter2D(x, -1, k, k, borderType=cv2.BORDER_REFLECT_101)
            if p["solarize"][i]:
                x = cv2.LUT(x, self._solarize[v])
            for c, plane in enumerate(cv2.split(x)):
                o = out[i, c]
                o[...] = plane  # uint8 -> float32, then two in-place passes (faster than a lookup table)
                o *= norm[c][0]
                o += norm[c][1]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

"""Batched photometric ops in torch, applied from parameter records (`pipeline.views.params`).

Both backends hand this module the geometric part already done (a uint8 crop resized to the view size,
N x H x W x 3, channels last, on the target device) and it applies, per sample, what the record says:
flip, colour jitter in the recorded order, grayscale, RandAugment, Gaussian blur, solarize, then the
colour space, channel selection and normalization of the view. This is the one implementation of those
ops in the project; the DALI and ffcv backends differ only in how they decode and crop.

Jitter and grayscale are folded into one 3 x 3 matrix plus offset per sample (all four jitter ops and
grayscale are affine in RGB; contrast's offset is the mean gray level, itself affine in the input's mean
colour), so they cost one pass over the pixels. Two documented departures from torchvision follow:
values are clamped to [0, 1] once after the composite instead of after each op, and hue is a rotation
of the chroma plane in YIQ (as DALI's `hue` / `color_twist`) rather than a shift in HSV.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.views.spec import ColorSpec, ViewSpec

GRAY = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263],
                         [0.211456, -0.522591, 0.311135]], dtype=torch.float64)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _host(t) -> np.ndarray:
    """A record field on the host. Records are numpy (pipeline.views.params), so every decision of
    `photometric` (which samples flip, which RandAugment op, who is blurred) is made here with no
    device read; a record already on the GPU costs one copy back."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _as(t, device, dtype=None):
    """A record field (or host index array) on `device`. Host to GPU copies are non_blocking: from
    pageable memory CUDA stages the bytes at once, so this neither waits for the GPU's queue nor
    reads freed memory later; a blocking copy would synchronise the stream."""
    if isinstance(t, torch.Tensor):
        return t.to(device=device, dtype=dtype or t.dtype, non_blocking=True)
    return torch.from_numpy(np.ascontiguousarray(t)).to(device=device, dtype=dtype, non_blocking=True)


def color_affine(rec: dict, mean_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (A, b), float64 on CPU: out = A @ rgb + b for jitter (recorded order) then grayscale.
    `mean_rgb` (N, 3) is each input image's mean colour (contrast blends towards its gray level)."""
    n = mean_rgb.shape[0]
    m0 = mean_rgb.to(torch.float64)
    f = torch.as_tensor(rec["jitter"], dtype=torch.float64)
    order = torch.as_tensor(rec["jitter_order"])
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    w = torch.tensor(GRAY, dtype=torch.float64)
    ones_w = torch.ones(3, 1, dtype=torch.float64) @ w[None]  # rows all equal to w: gray to 3 channels
    A, b = eye.clone(), torch.zeros(n, 3, dtype=torch.float64)
    for k in range(4):
        op = order[:, k]
        fb, fc, fs, fh = f[:, 0], f[:, 1], f[:, 2], f[:, 3]
        # brightness: x * f
        Ab, bb = fb[:, None, None] * A, fb[:, None] * b
        # contrast: f * x + (1 - f) * mean gray(x)
        g = ((A @ m0[:, :, None]).squeeze(-1) + b) @ w
        Ac, bc = fc[:, None, None] * A, fc[:, None] * b + ((1 - fc) * g)[:, None]
        # saturation: f * x + (1 - f) * gray(x)
        S = fs[:, None, None] * eye + (1 - fs)[:, None, None] * ones_w
        As, bs = S @ A, (S @ b[:, :, None]).squeeze(-1)
        # hue: rotate (I, Q) by 2 pi h
        c, s = torch.cos(2 * math.pi * fh), torch.sin(2 * math.pi * fh)
        R = eye.clone()
        R[:, 1, 1], R[:, 1, 2], R[:, 2, 1], R[:, 2, 2] = c, -s, s, c
        H = _YIQ2RGB @ R @ _RGB2YIQ
        Ah, bh = H @ A, (H @ b[:, :, None]).squeeze(-1)
        sel = [(op == j) for j in range(4)]
        A = sum(torch.where(sel[j][:, None, None], M, 0) for j, M in enumerate((Ab, Ac, As, Ah)))
        b = sum(torch.where(sel[j][:, None], v, 0) for j, v in enumerate((bb, bc, bs, bh)))
    gray = torch.as_tensor(rec["gray"], dtype=torch.bool)
    A = torch.where(gray[:, None, None], ones_w @ A, A)
    b = torch.where(gray[:, None], (ones_w @ b[:, :, None]).squeeze(-1), b)
    return A, b


def color_affine_parts(rec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), float64 on CPU, with color_affine(rec, m) == (A, B @ m) for every mean colour m: the
    offset is linear in the mean (each op maps (b, m) linearly, b starting at 0), so B's columns are
    the offsets for the unit means. Lets the GPU path apply jitter without reading the means back."""
    n = len(_host(rec["gray"]))
    cols = []
    for j in range(3):
        basis = torch.zeros(n, 3, dtype=torch.float64)
        basis[:, j] = 1.0
        A, b = color_affine(rec, basis)
        cols.append(b)
    return A, torch.stack(cols, 2)


def _blur_matrix(sigma: torch.Tensor, size: int, ksize: int, dtype) -> torch.Tensor:
    """(N, size, size): row i holds the Gaussian taps of output pixel i, reflect padding folded in."""
    r = ksize // 2
    t = torch.arange(-r, r + 1, device=sigma.device)
    k = torch.exp(-0.5 * (t[None].to(dtype) / sigma[:, None].to(dtype)) ** 2)
    k = k / k.sum(1, keepdim=True)
    src = torch.arange(size, device=sigma.device)[:, None] + t[None]
    for _ in range(2):  # reflect (edge pixel not repeated), enough for r < 2 * size
        src = torch.where(src < 0, -src, src)
        src = torch.where(src > size - 1, 2 * (size - 1) - src, src)
    n = sigma.shape[0]
    M = torch.zeros(n, size, size, device=sigma.device, dtype=dtype)
    M.scatter_add_(2, src.expand(n, size, ksize), k[:, None, :].expand(n, size, ksize).contiguous())
    return M


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Blur each image of x (N, C, H, W) with its own sigma (N,), separable, reflect padding, as two
    batched matrix products (faster than a grouped convolution with per-sample kernels on CPU and GPU)."""
    h, w = x.shape[2:]
    mh = _blur_matrix(sigma, h, ksize, x.dtype)
    mw = mh if w == h else _blur_matrix(sigma, w, ksize, x.dtype)
    return torch.matmul(torch.matmul(mh[:, None], x), mw.transpose(1, 2)[:, None])


def _gray(x):
    w = torch.tensor(GRAY, device=x.device, dtype=x.dtype)
    return (x * w[None, :, None, None]).sum(1, keepdim=True)


def _blend(a, b, f):
    return (b + f[:, None, None, None] * (a - b)).clamp(0, 1)


def _affine(x, angle, shear_x, shear_y, tx, ty):
    """Rotate (deg) / shear / translate (pixels) about the centre, nearest neighbour, fill 0."""
    n, _, h, w = x.shape
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a), torch.sin(a)
    M = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    # output -> input map in normalized coordinates (aspect handled by scaling x/y by w/h)
    M[:, 0, 0], M[:, 0, 1] = cos, -sin * h / w + shear_x
    M[:, 1, 0], M[:, 1, 1] = sin * w / h + shear_y, cos
    M[:, 0, 2], M[:, 1, 2] = -2 * tx / w, -2 * ty / h
    grid = F.affine_grid(M, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalization of each channel of each image of x (n, C, H, W) in [0, 1] on 256 levels,
    with PIL's / torchvision's lookup table: lut[i] = (cdf[i - 1] + step // 2) // step, where step =
    (pixels - count of the last non-empty bin) // 255; a channel with step 0 is left as it is."""
    n, c, h, w = x.shape
    q = (x * 255).round_().clamp_(0, 255).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    last = 255 - (hist > 0).flip(1).long().argmax(1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    cdf = torch.cumsum(hist, 1) - hist  # pixels below each level
    lut = ((cdf + step // 2) // step.clamp_min(1)).clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return out.reshape(n, c, h, w).to(x.dtype) / 255


def randaugment_op(name: str, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """One RandAugment op on x (n, 3, H, W) in [0, 1] with signed magnitudes m (n,) in [-1, 1], using
    torchvision's magnitude ranges (RandAugment with 31 bins)."""
    a = m.abs()
    if name == "identity":
        return x
    if name == "equalize":
        return equalize(x)
    if name == "autocontrast":
        lo = x.amin((2, 3), keepdim=True)
        hi = x.amax((2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    if name == "posterize":
        bits = (8 - (4 * a).round()).to(x.dtype)
        q = (2 ** (8 - bits))[:, None, None, None]
        return torch.floor(x * 255 / q) * q / 255
    if name == "solarize":
        thr = (1 - a)[:, None, None, None]
        return torch.where(x >= thr, 1 - x, x)
    f = 1 + 0.9 * m
    if name == "color":
        return _blend(x, _gray(x), f)
    if name == "contrast":
        return _blend(x, _gray(x).mean((2, 3), keepdim=True), f)
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), f)
    if name == "sharpness":
        k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device, dtype=x.dtype) / 13
        sm = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        return _blend(x, sm, f)
    z = torch.zeros_like(m)
    h, w = x.shape[2:]
    if name == "rotate":
        return _affine(x, 30 * m, z, z, z, z)
    if name == "shear_x":
        return _affine(x, z, 0.3 * m, z, z, z)
    if name == "shear_y":
        return _affine(x, z, z, 0.3 * m, z, z)
    if name == "translate_x":
        return _affine(x, z, z, z, 150 / 331 * w * m, z)
    if name == "translate_y":
        return _affine(x, z, z, z, z, 150 / 331 * h * m)
    raise KeyError(name)


def photometric(img: torch.Tensor, rec: dict, view: ViewSpec) -> torch.Tensor:
    """uint8 crops (N, H, W, 3) -> float (N, 3, H, W) in [0, 1] with flip, jitter, grayscale,
    RandAugment, blur and solarize applied as recorded. Colour space / normalization: `to_output`."""
    dev = img.device
    x = img.permute(0, 3, 1, 2).to(torch.float32).div_(255)
    flip = _host(rec["flip"]).astype(bool)
    if flip.any():
        x = torch.where(_as(flip, dev)[:, None, None, None], x.flip(-1), x)
    if _host(rec["jitter_on"]).any() or _host(rec["gray"]).any():
        A, B = color_affine_parts(rec)  # out = A x + B mean(x), the mean taken on the device
        n, _, h, w = x.shape
        b = torch.bmm(_as(B, dev), x.mean((2, 3)).to(torch.float64)[:, :, None])
        x = torch.baddbmm(b.to(torch.float32), _as(A, dev, torch.float32),
                          x.reshape(n, 3, h * w)).reshape(n, 3, h, w).clamp_(0, 1)
    if view.randaugment is not None:
        ops, mags = _host(rec["ra_ops"]), _host(rec["ra_mag"]).astype(np.float32)
        for k in range(ops.shape[1]):
            for j, name in enumerate(view.randaugment.ops):
                sel = np.flatnonzero(ops[:, k] == j)
                if len(sel) and name != "identity":
                    idx = _as(sel, dev)
                    x[idx] = randaugment_op(name, x[idx], _as(mags[sel, k], dev))
    sigma = _host(rec["blur_sigma"]).astype(np.float32)
    if view.blur is not None and (sigma > 0).any():
        sel = np.flatnonzero(sigma > 0)
        idx = _as(sel, dev)
        x[idx] = gaussian_blur(x[idx], _as(sigma[sel], dev), view.blur.kernel_size(view.size))
    sol = _host(rec["solarize"]).astype(bool)
    if sol.any():
        x = torch.where(_as(sol, dev)[:, None, None, None] & (x >= view.solarize_threshold), 1 - x, x)
    return x


def _srgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE Lab (D65), as skimage.color.rgb2lab (which CMC uses)."""
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    M = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], device=x.device, dtype=x.dtype)
    xyz = torch.einsum("ij,njhw->nihw", M, lin)
    white = torch.tensor([0.95047, 1.0, 1.08883], device=x.device, dtype=x.dtype)
    t = xyz / white[None, :, None, None]
    f = torch.where(t > 0.008856, t.clamp_min(1e-12) ** (1 / 3), 7.787 * t + 16 / 116)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], 1)


_LINEAR_SPACES = {
    # skimage.color.rgb2ycbcr: RGB in [0, 1] -> Y in [16, 235], Cb/Cr in [16, 240]
    "ycbcr": ([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]],
              [16.0, 128.0, 128.0]),
    # skimage.color.rgb2ydbdr
    "ydbdr": ([[0.299, 0.587, 0.114], [-0.45, -0.883, 1.333], [-1.333, 1.116, 0.217]], [0.0, 0.0, 0.0]),
}


def convert_color(x: torch.Tensor, space: str) -> torch.Tensor:
    if space == "rgb":
        return x
    if space == "lab":
        return _srgb_to_lab(x)
    M, off = _LINEAR_SPACES[space]
    M = torch.tensor(M, device=x.device, dtype=x.dtype)
    off = torch.tensor(off, device=x.device, dtype=x.dtype)
    return torch.einsum("ij,njhw->nihw", M, x) + off[None, :, None, None]


def to_output(x: torch.Tensor, color: ColorSpec) -> torch.Tensor:
    """Colour space, channel selection and normalization of a view: (N, 3, H, W) -> (N, C, H, W)."""
    y = convert_color(x, color.space)
    if tuple(color.channels) != tuple(range(y.shape[1])):
        y = y[:, list(color.channels)]
    scale = 1 / torch.tensor(color.std, device=x.device, dtype=x.dtype)[None, :, None, None]
    shift = -torch.tensor(color.mean, device=x.device, dtype=x.dtype)[None, :, None, None] * scale
    return torch.addcmul(shift, y, scale)

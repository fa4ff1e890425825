"""Synthetic ImageNet-layout datasets of procedurally generated images (CLI: tools/make_synthetic.py).

    python tools/make_synthetic.py --out data/synth --classes 10 --train-per-class 100 --val-per-class 20

Layout: OUT/train/<wnid>/<wnid>_<n>.JPEG and OUT/val/ILSVRC2012_val_<n>.JPEG with OUT/LOC_val_solution.csv
(or OUT/val/<wnid>/ with --val-layout folders), like the ImageNet-1k release.

A class is an object *shape* and a *texture* on it (class c: shape c % 8, texture (c // 8) % 6, texture
frequency (c // 48)). Everything else is a nuisance drawn per image: image size (150-800 px a side,
aspect 3:4 to 4:3), object and background colours, background gradient and blobs, object position,
scale and rotation, a few distractor blobs, blur and sensor noise. Colour carries no class information,
so an encoder has to pick up shape and texture: a self-supervised encoder trained with colour jitter
beats a random one on kNN over these classes. Deterministic for a seed (each image has its own
generator seeded by (seed, split, class, n)).

--easy makes a set that a short self-supervised run can learn (the trainer's CPU learning test and the
demo use it): every class has its own shape *and* its own texture (class c: shape c % 8, texture c % 6,
texture frequency c // 24; 24 distinct pairs), objects are larger (radius 0.28-0.40 of the longer side
instead of 0.18-0.38) and the background has at most one blob (instead of 2-5). Colour, position,
scale, rotation, background gradient and noise stay random. Why: in the default set the first 8 classes
differ by shape alone, and a shape under random rotation at 32 px takes SimCLR far more steps than a CPU
minute gives (measured, 8 classes: runs of 400-600 steps, ResNet-18 width 8 or 16, ended within a few
kNN@20 points of the random-init encoder), whereas a texture is a colour-invariant local pattern that
survives every crop of the object (the same 800-step run on --easy: +23 to +33 points, 5 seeds).
--side-range MIN MAX renders smaller images (default 150 800 px a side): a set converted at --max-side
64 gains nothing from 800 px sources, and rendering them is most of the cost of a small set (measured:
8 x 45 images at the default sizes 32 s; 8 x 80 at 64-96 px 2 s). Neither option changes the default
output (same bytes for a seed).

--with-bad-files adds a zoo of bad inputs (zero-byte, truncated, HTML named .JPEG, PNG/GIF/BMP/WebP named
.JPEG, CMYK and grayscale JPEGs, 16-bit/palette/RGBA PNGs, EXIF-rotated JPEGs, a decompression bomb
header, a non-image file, a sub-folder, a broken symlink, non-ASCII and space names) to the train
split, for demos and tests of the converter.
"""

from __future__ import annotations

import csv
import io
import os
import struct
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image
from tqdm import tqdm

SHAPES = ("disk", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent")
TEXTURES = ("solid", "stripes", "checker", "dots", "waves", "rings")


def wnid(c: int) -> str:
    return f"n{90000000 + c:08d}"


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Soft mask (0..1) of a unit-size shape in object coordinates (u, v), anti-aliased."""
    r = np.hypot(u, v)
    a = np.arctan2(v, u)
    if shape == "disk":
        d = r - 1.0
    elif shape == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - 0.85
    elif shape == "triangle":
        d = np.maximum(np.abs(u) * 1.732 + v - 1.0, -v - 0.8)
    elif shape == "star":
        d = r - (0.65 + 0.35 * np.cos(5 * a))
    elif shape == "ring":
        d = np.abs(r - 0.75) - 0.25
    elif shape == "cross":
        d = np.minimum(np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0), np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3))
    elif shape == "hexagon":
        q = np.abs(u), np.abs(v)
        d = np.maximum(q[0] * 0.866 + q[1] * 0.5, q[1]) - 0.9
    elif shape == "crescent":
        d = np.maximum(r - 1.0, -(np.hypot(u - 0.45, v) - 0.75))
    else:
        raise ValueError(shape)
    return np.clip(0.5 - d * 20, 0, 1)


def texture_pattern(texture: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Texture intensity in [0, 1] in object coordinates."""
    f = freq * np.pi
    if texture == "solid":
        return np.full_like(u, 0.8)
    if texture == "stripes":
        return 0.5 + 0.5 * np.sign(np.sin(f * u))
    if texture == "checker":
        return 0.5 + 0.5 * np.sign(np.sin(f * u) * np.sin(f * v))
    if texture == "dots":
        return (np.hypot((u * freq / 2) % 1 - 0.5, (v * freq / 2) % 1 - 0.5) < 0.3).astype(np.float32)
    if texture == "waves":
        return 0.5 + 0.5 * np.sign(np.sin(f * u + 2 * np.sin(f * v / 2)))
    if texture == "rings":
        return 0.5 + 0.5 * np.sign(np.sin(f * np.hypot(u, v)))
    raise ValueError(texture)


def render(cls: int, rng: np.random.Generator, easy: bool = False,
           side_range: tuple[int, int] = (150, 800)) -> np.ndarray:
    """One H x W x 3 uint8 image of class `cls` (`easy` and `side_range`: see the module docstring)."""
    shape = SHAPES[cls % len(SHAPES)]
    if easy:  # a shape and a texture per class: lcm(8, 6) = 24 distinct pairs, then the frequency changes
        texture = TEXTURES[cls % len(TEXTURES)]
        freq = 4.0 + 2.0 * (cls // 24)
    else:
        texture = TEXTURES[(cls // len(SHAPES)) % len(TEXTURES)]
        freq = 4.0 + 2.0 * (cls // (len(SHAPES) * len(TEXTURES)))
    lo, hi = side_range
    side = rng.integers(lo, hi + 1)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    h, w = int(side), int(np.clip(round(side * aspect), lo, hi))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y /= max(h, w)
    x /= max(h, w)
    # Background: a two-colour gradient in a random direction plus soft blobs.
    c1 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.1, 0.7), rng.uniform(0.25, 0.95))
    c2 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.1, 0.7), rng.uniform(0.25, 0.95))
    th = rng.uniform(0, 2 * np.pi)
    g = np.clip((np.cos(th) * x + np.sin(th) * y) * 1.2 + 0.2, 0, 1)[..., None]
    img = c1 * (1 - g) + c2 * g
    for _ in range(int(rng.integers(0, 2) if easy else rng.integers(2, 6))):
        cy, cx = rng.uniform(0, h / max(h, w)), rng.uniform(0, w / max(h, w))
        rad = rng.uniform(0.03, 0.15)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * rad ** 2))[..., None]
        img = img * (1 - 0.6 * blob) + 0.6 * blob * _hsv_to_rgb(rng.uniform(), rng.uniform(0, 1), rng.uniform(0.2, 1))
    # Object: random scale, position and rotation; colour pair drawn independently of the class.
    scale = rng.uniform(0.28, 0.40) if easy else rng.uniform(0.18, 0.38)
    cy = rng.uniform(scale, h / max(h, w) - scale) if h / max(h, w) > 2 * scale else h / max(h, w) / 2
    cx = rng.uniform(scale, w / max(h, w) - scale) if w / max(h, w) > 2 * scale else w / max(h, w) / 2
    rot = rng.uniform(0, 2 * np.pi)
    du, dv = (x - cx) / scale, (y - cy) / scale
    u = np.cos(rot) * du + np.sin(rot) * dv
    v = -np.sin(rot) * du + np.cos(rot) * dv
    mask = _shape_mask(shape, u, v)[..., None]
    tex = texture_pattern(texture, u, v, freq)[..., None]
    hue = rng.uniform()
    fg1 = _hsv_to_rgb(hue, rng.uniform(0.5, 1), rng.uniform(0.7, 1))
    fg2 = _hsv_to_rgb((hue + rng.uniform(0.3, 0.7)) % 1, rng.uniform(0.3, 1), rng.uniform(0.05, 0.5))
    obj = fg1 * tex + fg2 * (1 - tex)
    shade = 0.75 + 0.25 * np.clip(1 - (u + v) * 0.3, 0, 1)[..., None]  # simple directional lighting
    img = img * (1 - mask) + obj * shade * mask
    img = img + rng.normal(0, rng.uniform(0.005, 0.04), img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _write_jpeg(path: Path, arr: np.ndarray, quality: int) -> None:
    path.write_bytes(simplejpeg.encode_jpeg(arr, quality=quality, colorspace="RGB"))


def make(out: Path, classes: int, train_per_class: int, val_per_class: int, seed: int = 0,
         val_layout: str = "flat", quality: int = 90, with_bad_files: bool = False, progress: bool = True,
         easy: bool = False, side_range: tuple[int, int] = (150, 800)) -> None:
    if not 16 <= side_range[0] <= side_range[1]:
        raise ValueError(f"side_range {side_range}: need 16 <= MIN <= MAX")
    out = Path(out)
    jobs = []
    for c in range(classes):
        for n in range(train_per_class):
            jobs.append(("train", c, n, out / "train" / wnid(c) / f"{wnid(c)}_{n}.JPEG"))
    val_rows = []
    k = 0
    for c in range(classes):
        for n in range(val_per_class):
            k += 1
            if val_layout == "flat":
                name = f"ILSVRC2012_val_{k:08d}"
                jobs.append(("val", c, n, out / "val" / f"{name}.JPEG"))
                val_rows.append((name, wnid(c)))
            else:
                jobs.append(("val", c, n, out / "val" / wnid(c) / f"{wnid(c)}_val_{n}.JPEG"))
    for _, _, _, p in jobs:
        p.parent.mkdir(parents=True, exist_ok=True)
    for split, c, n, path in tqdm(jobs, desc="synthetic images", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, c, n])
        _write_jpeg(path, render(c, rng, easy, tuple(side_range)), quality)
    if val_rows:
        with open(out / "LOC_val_solution.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["ImageId", "PredictionString"])
            for name, w in sorted(val_rows):
                wr.writerow([name, f"{w} 10 10 100 100"])
    if with_bad_files:
        write_bad_files(out / "train", seed)


def write_bad_files(train_dir: Path, seed: int = 0) -> dict[str, str]:
    """Add the bad-input zoo to the first class folders of a train split. Returns {relative path: kind}
    where kind is 'bad' (must be reported), 'converted' (must become a good sample) or 'ignored'."""
    rng = np.random.default_rng([seed, 99])
    dirs = sorted(p for p in Path(train_dir).iterdir() if p.is_dir())
    d = dirs[0]
    e = dirs[1 % len(dirs)]
    img = render(0, rng)
    rgb = Image.fromarray(img)
    good_jpeg = simplejpeg.encode_jpeg(img, quality=90)
    written: dict[str, str] = {}

    def put(folder: Path, name: str, data: bytes, kind: str):
        (folder / name).write_bytes(data)
        written[f"{folder.name}/{name}"] = kind

    def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    put(d, "zero_bytes.JPEG", b"", "bad")
    put(d, "truncated.JPEG", good_jpeg[: len(good_jpeg) // 2], "bad")
    put(d, "random_bytes.JPEG", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "bad")
    put(d, "html_page.JPEG", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "bad")
    put(d, "png_named_jpeg.JPEG", pil_bytes(rgb, "PNG"), "converted")
    put(d, "gif_named_jpeg.JPEG", pil_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"), "converted")
    put(d, "bmp_named_jpeg.JPEG", pil_bytes(rgb, "BMP"), "converted")
    put(d, "webp_named_jpeg.JPEG", pil_bytes(rgb, "WEBP", quality=90), "converted")
    put(d, "cmyk.JPEG", pil_bytes(rgb.convert("CMYK"), "JPEG", quality=90), "converted")
    put(d, "grayscale.JPEG", pil_bytes(rgb.convert("L"), "JPEG", quality=90), "converted")
    put(d, "progressive.JPEG", pil_bytes(rgb, "JPEG", quality=90, progressive=True), "converted")
    g16 = (np.asarray(rgb.convert("L"), np.uint16) * 257)
    put(d, "gray16.png", pil_bytes(Image.fromarray(g16), "PNG"), "converted")
    put(d, "palette.png", pil_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"), "converted")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(rgb.width)[None, :].repeat(rgb.height, 0) % 256).astype(np.uint8)))
    put(d, "rgba.png", pil_bytes(rgba, "PNG"), "converted")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    put(d, "exif_rotated.JPEG", pil_bytes(rgb, "JPEG", quality=90, exif=exif.tobytes()), "converted")
    put(d, "bomb.JPEG", bomb_jpeg(good_jpeg, 60000, 60000), "bad")
    # Damage inside the entropy-coded data, behind an intact header and EOI (PIL opens all of them).
    put(d, "corrupt_middle.JPEG", corrupt_scan(good_jpeg, rng, no_ff=False), "bad")
    put(d, "corrupt_middle_no_ff.JPEG", corrupt_scan(good_jpeg, rng, no_ff=True), "bad")
    rst = pil_bytes(rgb, "JPEG", quality=90, restart_marker_blocks=4)
    put(d, "restart_markers.JPEG", rst, "converted")  # valid: stored as it is
    put(d, "restart_out_of_order.JPEG", swap_restart_markers(rst), "bad")
    start = scan_start(good_jpeg)
    put(d, "truncated_fake_eoi.JPEG", good_jpeg[:start + (len(good_jpeg) - start) // 2] + b"\xff\xd9", "bad")
    put(d, "trailing_data.JPEG", good_jpeg + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(), "converted")
    put(d, "notes.txt", b"not an image", "ignored")
    (d / "sub folder").mkdir(exist_ok=True)
    (d / "sub folder" / "inner.JPEG").write_bytes(good_jpeg)
    written[f"{d.name}/sub folder/"] = "ignored"
    link = d / "broken_link.JPEG"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink("/nonexistent/target.JPEG", link)
    written[f"{d.name}/broken_link.JPEG"] = "bad"
    other = simplejpeg.encode_jpeg(render(1, rng), quality=90)  # folder e is class 1: draw class 1
    put(e, "name with spaces.JPEG", other, "converted")
    put(e, "ñandú_日本.JPEG", other, "converted")
    return written


def scan_start(jpeg: bytes) -> int:
    """Offset of the first byte of entropy-coded data (just past the first SOS segment)."""
    i = jpeg.index(b"\xff\xda")
    return i + 2 + struct.unpack(">H", jpeg[i + 2:i + 4])[0]


def corrupt_scan(jpeg: bytes, rng, no_ff: bool) -> bytes:
    """`jpeg` with random bytes over a third of its entropy-coded data, from the middle on. With no_ff the
    bytes avoid 0xFF, so the byte stuffing stays valid and only an entropy decode can tell."""
    start = scan_start(jpeg)
    k = (len(jpeg) - start) // 3
    mid = start + (len(jpeg) - start) // 2 - k // 2
    junk = rng.integers(0, 255 if no_ff else 256, k, dtype=np.uint8).tobytes()
    return jpeg[:mid] + junk + jpeg[mid + k:]


def swap_restart_markers(jpeg: bytes) -> bytes:
    """A restart-interval JPEG with its second and third restart markers swapped (RST1 <-> RST2)."""
    b = bytearray(jpeg)
    i1, i2 = jpeg.index(b"\xff\xd1"), jpeg.index(b"\xff\xd2")
    b[i1 + 1], b[i2 + 1] = 0xD2, 0xD1
    return bytes(b)


def bomb_jpeg(jpeg: bytes, w: int, h: int) -> bytes:
    """A valid JPEG whose frame header claims w x h pixels."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[:i + 5] + struct.pack(">HH", h, w) + jpeg[i + 9:]

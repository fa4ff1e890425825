"""pipeline/convert/image_codec.py: each kind of input becomes a baseline RGB JPEG or a clear BadImage."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from pipeline.convert.image_codec import BadImage, normalize_image, parse_jpeg, target_size
from pipeline.synthetic.images import bomb_jpeg, render


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    return render(3, np.random.default_rng(5))


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _jpeg_error(pixels: np.ndarray, quality: int = 90) -> float:
    """Mean abs error of one plain JPEG round trip of these pixels: the yardstick for re-encodes."""
    rt = simplejpeg.decode_jpeg(simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality,
                                                      colorsubsampling="420"))
    return float(np.abs(rt.astype(np.float32) - pixels).mean())


def _decode(jpeg: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(jpeg))
    assert im.format == "JPEG" and im.mode == "RGB"
    assert parse_jpeg(jpeg).sof == 0xC0, "output must be baseline"
    return im


def test_baseline_jpeg_passes_through_untouched(img):
    data = simplejpeg.encode_jpeg(img, quality=85)
    enc = normalize_image(data)
    assert enc.jpeg is data and enc.action == "passthrough"
    assert (enc.width, enc.height) == (img.shape[1], img.shape[0])
    # --verify decode accepts it too
    assert normalize_image(data, verify="decode").jpeg is data


@pytest.mark.parametrize("fmt,kw,why", [
    ("PNG", {}, "png"), ("BMP", {}, "bmp"), ("WEBP", {"quality": 95}, "webp"), ("TIFF", {}, "tiff"),
    ("JPEG", {"progressive": True, "quality": 95}, "progressive"),
])
def test_other_containers_are_reencoded(img, fmt, kw, why):
    data = _save(Image.fromarray(img), fmt, **kw)
    enc = normalize_image(data, quality=95)
    assert enc.action == f"reencode:{why}"
    out = np.asarray(_decode(enc.jpeg), np.float32)
    src = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert out.shape == src.shape
    assert np.abs(out - src).mean() <= 1.1 * _jpeg_error(src, 95) + 0.05  # one JPEG generation, no more


def test_gif_palette_first_frame(img):
    frames = [Image.fromarray(img).convert("P"), Image.fromarray(255 - img).convert("P")]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(_decode(normalize_image(b.getvalue()).jpeg), np.float32)
    assert np.abs(out - img).mean() < 25  # palette quantisation, but the first frame, not the inverted one


def test_cmyk_and_grayscale_jpeg_become_rgb(img):
    rgb = Image.fromarray(img)
    cmyk = normalize_image(_save(rgb.convert("CMYK"), "JPEG", quality=95))
    assert cmyk.action == "reencode:cmyk"
    assert np.abs(np.asarray(_decode(cmyk.jpeg), np.float32) - img).mean() < 8
    gray = normalize_image(_save(rgb.convert("L"), "JPEG", quality=95))
    assert gray.action == "reencode:grayscale"
    g = np.asarray(_decode(gray.jpeg), np.int16)
    assert np.abs(g[..., 0] - g[..., 1]).max() <= 3  # R == G == B up to chroma rounding


def test_16bit_png_is_scaled_not_clipped():
    ramp = (np.arange(256 * 64, dtype=np.uint16).reshape(64, 256) * 4)  # 0..65532
    enc = normalize_image(_save(Image.fromarray(ramp), "PNG"))
    g = np.asarray(_decode(enc.jpeg), np.float32)[..., 0]
    expect = (ramp >> 8).astype(np.float32)
    assert np.abs(g - expect).mean() < 2.0 and g.max() > 240  # clipping would saturate nearly everything


def test_rgba_composited_on_white_and_palette_png(img):
    rgba = np.dstack([img, np.zeros(img.shape[:2], np.uint8)])  # fully transparent
    out = np.asarray(_decode(normalize_image(_save(Image.fromarray(rgba, "RGBA"), "PNG")).jpeg))
    assert out.min() >= 250
    pal = Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    out = np.asarray(_decode(normalize_image(_save(pal, "PNG")).jpeg), np.float32)
    ref = np.asarray(pal.convert("RGB"))
    assert np.abs(out - ref).mean() <= 1.1 * _jpeg_error(ref) + 0.05


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("max_side", [None, 200])
def test_exif_orientation_is_applied(img, orientation, max_side):
    from PIL import ImageOps
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(img), "JPEG", quality=95, exif=exif.tobytes())
    enc = normalize_image(data, max_side=max_side)
    assert enc.action.startswith("reencode:exif-orientation")
    out = np.asarray(_decode(enc.jpeg), np.float32)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))  # PIL's reading of the tag
    if max_side:
        upright = upright.resize(target_size(upright.width, upright.height, max_side), Image.Resampling.LANCZOS)
    want = np.asarray(upright.convert("RGB"))
    assert out.shape == want.shape and (enc.width, enc.height) == (want.shape[1], want.shape[0])
    assert np.abs(out - want).mean() <= 1.1 * _jpeg_error(want) + (3.0 if max_side else 0.05)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"<!DOCTYPE html><html></html>", "HTML"),
    (bytes(range(256)) * 20, "unrecognised"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated"),
])
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        normalize_image(data)


def test_truncated_jpeg_and_png(img):
    jpeg = simplejpeg.encode_jpeg(img)
    with pytest.raises(BadImage, match="truncated|corrupt"):
        normalize_image(jpeg[: len(jpeg) * 2 // 3])
    png = _save(Image.fromarray(img), "PNG")
    with pytest.raises(BadImage, match="cannot decode"):
        normalize_image(png[: len(png) // 2])


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_decompression_bomb_refused_without_allocating(img, kind):
    if kind == "jpeg":
        data = bomb_jpeg(simplejpeg.encode_jpeg(img), 50_000, 40_000)
    else:
        small = _save(Image.fromarray(img), "PNG")
        # rewrite the IHDR width/height (CRC is not checked before the size is)
        import struct
        import zlib
        ihdr = struct.pack(">II", 50_000, 40_000) + small[24:29]
        data = small[:16] + ihdr[:8] + small[24:29] + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + small[33:]
    tracemalloc.start()
    with pytest.raises(BadImage, match="decompression bomb"):
        normalize_image(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20e6  # a 50000x40000 RGB buffer would be 6 GB


@pytest.mark.parametrize("w,h,max_side", [(800, 600, 200), (777, 333, 256), (300, 640, 320), (200, 100, 256)])
def test_max_side_resize(w, h, max_side):
    rng = np.random.default_rng(0)
    a = render(2, rng)
    a = np.asarray(Image.fromarray(a).resize((w, h)))
    enc = normalize_image(simplejpeg.encode_jpeg(a, quality=95), max_side=max_side)
    tw, th = target_size(w, h, max_side)
    assert (enc.width, enc.height) == (tw, th) and max(tw, th) == min(max(w, h), max_side)
    im = _decode(enc.jpeg)
    assert im.size == (tw, th)
    if max(w, h) > max_side:
        # DCT-domain draft + Lanczos ~ a direct high-quality resize of the full image
        ref = np.asarray(Image.fromarray(a).resize((tw, th), Image.Resampling.LANCZOS), np.float32)
        assert np.abs(np.asarray(im, np.float32) - ref).mean() < 6
    else:
        assert enc.action == "passthrough"


# -- damage inside the entropy-coded data ---------------------------------------------------------
def _damaged(kind: str, img: np.ndarray, seed: int) -> bytes:
    """One JPEG of each damage class the converter must report (PIL opens most of them silently)."""
    from pipeline.synthetic.images import corrupt_scan, scan_start, swap_restart_markers
    rng = np.random.default_rng(seed)
    jpeg = simplejpeg.encode_jpeg(img, quality=90)
    if kind == "garbage":
        return corrupt_scan(jpeg, rng, no_ff=False)
    if kind == "garbage_no_ff":
        return corrupt_scan(jpeg, rng, no_ff=True)
    if kind == "restart_order":
        return swap_restart_markers(_save(Image.fromarray(img), "JPEG", quality=90, restart_marker_blocks=2))
    if kind == "fake_eoi":
        start = scan_start(jpeg)
        return jpeg[:start + int((len(jpeg) - start) * rng.uniform(0.2, 0.9))] + b"\xff\xd9"
    if kind == "zeroed":  # a run of zero bytes (a lost disk block) inside the scan
        start = scan_start(jpeg)
        mid = start + (len(jpeg) - start) // 2
        return jpeg[:mid] + bytes(4096) + jpeg[mid + 4096:]
    raise ValueError(kind)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["garbage", "garbage_no_ff", "restart_order", "fake_eoi", "zeroed"])
@pytest.mark.parametrize("verify", ["entropy", "decode"])
def test_damaged_entropy_data_is_rejected(kind, seed, verify):
    img = render(seed, np.random.default_rng(seed + 10))
    data = _damaged(kind, img, seed)
    assert parse_jpeg(data).sof == 0xC0  # the header is intact: only the scan is damaged
    with pytest.raises(BadImage, match="corrupt or truncated JPEG"):
        normalize_image(data, verify=verify)


def test_header_verify_catches_what_the_walk_sees_only(img):
    """--verify header (the fast opt-out) runs the loaders' structural walk: garbage holding 0xFF bytes
    and restart markers out of order fail it; garbage without 0xFF passes (documented)."""
    for kind in ("garbage", "restart_order"):
        with pytest.raises(BadImage):
            normalize_image(_damaged(kind, img, 0), verify="header")
    assert normalize_image(_damaged("garbage_no_ff", img, 0), verify="header").action == "passthrough"


def test_trailing_bytes_after_eoi_are_trimmed(img):
    from pipeline.format.jpeg import jpeg_walk
    jpeg = simplejpeg.encode_jpeg(img, quality=90)
    enc = normalize_image(jpeg + b"\x00" * 7 + bytes(range(256)) * 4)
    assert enc.jpeg == jpeg and enc.action == "trimmed"
    assert jpeg_walk(np.frombuffer(jpeg, np.uint8))[3] == len(jpeg)


def test_walk_accepts_valid_structures(img):
    """Restart intervals, fill bytes before a marker and multi-scan (progressive) files pass the walk."""
    from pipeline.format.jpeg import jpeg_check
    rgb = Image.fromarray(img)
    rst = _save(rgb, "JPEG", quality=90, restart_marker_blocks=3)
    assert b"\xff\xd7" in rst and jpeg_check(np.frombuffer(rst, np.uint8))[0] == 0
    assert normalize_image(rst).jpeg is rst
    prog = _save(rgb, "JPEG", quality=90, progressive=True)
    assert jpeg_check(np.frombuffer(prog, np.uint8))[0] == 0
    jpeg = simplejpeg.encode_jpeg(img, quality=90)
    filled = jpeg[:-2] + b"\xff\xff\xff\xd9"
    assert jpeg_check(np.frombuffer(filled, np.uint8))[0] == 0
    simplejpeg.decode_jpeg(filled, strict=True)  # libjpeg-turbo agrees

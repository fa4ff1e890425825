"""Turn any image file the converter meets into the one thing the readers expect: a baseline RGB JPEG.

`normalize_image(data, max_side, quality, max_pixels, verify)` returns an `Encoded` (JPEG bytes, width,
height, what was done) or raises `BadImage` with a reason a person can act on.

Policy (documented in the README):
- A baseline (SOF0) 3-component JPEG with no EXIF rotation, no larger than `max_side`, is passed
  through byte for byte (bytes after its end-of-image marker are trimmed). What it must pass first,
  by `verify`:
    "header":  the structural walk the loaders run (`pipeline.format.shard_index.jpeg_walk`: markers, segment
               lengths, restart-marker sequence, stuffing in the entropy-coded data, EOI; ~30 us);
    "entropy": (default) that, plus a strict libjpeg-turbo decode at 1/8 scale in the DCT domain: it
               still decodes every Huffman code of every block, so corrupt entropy-coded data, a scan
               cut short behind a fake EOI or a broken restart interval fails (libjpeg-turbo's
               "Corrupt JPEG data" warnings are errors), at ~60% of a full decode's cost;
    "decode":  the walk plus a strict full-size decode.
  A JPEG that fails the walk but decodes strictly (a structure the walk does not know) is re-encoded,
  so every stored sample passes the loaders' check.
- Anything else is decoded and re-encoded as baseline RGB JPEG at `quality`: progressive and
  arithmetic JPEGs, CMYK/YCCK and grayscale JPEGs, PNG (8/16-bit, palette, RGBA), GIF (first frame),
  BMP, WebP, TIFF.
- EXIF orientation is applied (the stored image is upright; `width`/`height` are the stored ones).
- Transparency is composited onto white (a premultiplied-free, deterministic choice; `convert("RGB")`
  would leak whatever colour the transparent pixels happen to hold).
- 16-bit images are scaled to 8 bits (value >> 8), not clipped.
- Downscaling to `max_side` decodes JPEGs in the DCT domain first (libjpeg's 1/2, 1/4, 1/8 scaling via
  `Image.draft`) when the source is at least twice the target, then finishes with a Lanczos resize.
- A header announcing more than `max_pixels` pixels is refused before any pixel buffer is allocated.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from pipeline.format.jpeg import JPEG_REASONS, jpeg_walk

# We do our own bomb check from the header (see _check_size); PIL's check would fire later and with a
# less useful message, and its warning band between 1x and 2x the limit is noise for a converter.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own hard limit (2x its warning threshold)
VERIFY_MODES = ("header", "entropy", "decode")
DEFAULT_VERIFY = "entropy"

SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
STANDALONE_MARKERS = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7}


class BadImage(Exception):
    """The file cannot become a sample. The message is the reason written to bad_files.jsonl."""


@dataclass(frozen=True, slots=True)
class Encoded:
    jpeg: bytes
    width: int
    height: int
    action: str  # "passthrough" or "reencode:<why>"


@dataclass(frozen=True, slots=True)
class JpegInfo:
    width: int
    height: int
    components: int
    sof: int
    orientation: int
    adobe_transform: int | None


def sniff(data: bytes) -> str:
    """Name the container from magic bytes; the file extension is not trusted."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "html"
    return "unknown"


def parse_jpeg(data: bytes) -> JpegInfo:
    """Walk the JPEG markers up to the first scan. Raises BadImage on a malformed header."""
    n = len(data)
    pos = 2
    frame = None
    orientation = 1
    adobe = None
    while True:
        # Markers may be preceded by any number of 0xFF fill bytes.
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise BadImage("truncated JPEG header (no image data)")
        marker = data[pos]
        pos += 1
        if marker in STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            raise BadImage("JPEG ends before any image data")
        if pos + 2 > n:
            raise BadImage("truncated JPEG header")
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2 or pos + length > n:
            raise BadImage("truncated JPEG header")
        seg = data[pos + 2:pos + length]
        if marker in SOF_MARKERS:
            if len(seg) < 6:
                raise BadImage("malformed JPEG frame header")
            _precision, h, w, comps = struct.unpack(">BHHB", seg[:6])
            frame = (marker, w, h, comps)
        elif marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(seg[6:])
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif marker == 0xDA:  # start of scan: the header is over
            break
        pos += length
    if frame is None:
        raise BadImage("JPEG without a frame header")
    sof, w, h, comps = frame
    if w == 0 or h == 0:
        raise BadImage(f"JPEG header declares an empty image ({w}x{h})")
    return JpegInfo(w, h, comps, sof, orientation, adobe)


def _exif_orientation(tiff: bytes) -> int:
    """Orientation tag (0x0112) of IFD0, 1 when absent or unreadable."""
    if len(tiff) < 8:
        return 1
    endian = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if endian is None:
        return 1
    (ifd,) = struct.unpack(endian + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(endian + "H", tiff[ifd:ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        tag, typ, _cnt = struct.unpack(endian + "HHI", tiff[entry:entry + 8])
        if tag == 0x0112 and typ == 3:
            (value,) = struct.unpack(endian + "H", tiff[entry + 8:entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: header claims {w}x{h} = {w * h} pixels (> --max-pixels {max_pixels})")


def target_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    """Size after the `--max-side` rule: shrink (never enlarge) so that the longer side is max_side."""
    if not max_side or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _image_kind(data: bytes) -> str:
    """sniff(), raising BadImage for content that is no image at all."""
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    kind = sniff(data)
    if kind == "html":
        raise BadImage("not an image: HTML/XML document")
    if kind == "unknown":
        raise BadImage("not an image: unrecognised content")
    return kind


def try_passthrough(data: bytes, *, max_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                    verify: str = DEFAULT_VERIFY) -> Encoded | None:
    """The cheap part of normalize_image (magic bytes, JPEG header and, with verify="header", the
    structural walk; ~30 us): the Encoded result when the file is kept byte for byte as it is, None
    when it must be decoded (re-encoded, or checked by a decode). Raises BadImage for what the header
    already condemns (empty, HTML, unknown, malformed, bomb)."""
    if _image_kind(data) != "jpeg":
        return None
    info = parse_jpeg(data)
    _check_size(info.width, info.height, max_pixels)
    if verify == "header" and _reencode_reason(info, max_side) is None:
        code, _h, _w, end = jpeg_walk(np.frombuffer(data, np.uint8))
        if code == 0 and end == len(data):
            return Encoded(data, info.width, info.height, "passthrough")
    return None


def normalize_image(data: bytes, *, max_side: int | None = None, quality: int = 90,
                    max_pixels: int = DEFAULT_MAX_PIXELS, verify: str = DEFAULT_VERIFY) -> Encoded:
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    kind = _image_kind(data)
    if kind == "jpeg":
        info = parse_jpeg(data)
        _check_size(info.width, info.height, max_pixels)
        why = _reencode_reason(info, max_side)
        if why is None:
            code, _h, _w, end = jpeg_walk(np.frombuffer(data, np.uint8))
            if code != 0:
                # The walk rejects it: a file libjpeg-turbo decodes strictly (a structure the walk does
                # not know) is re-encoded so that the loaders' check accepts the stored sample; any
                # other is reported with the decoder's words, or the walk's.
                _decode_check(data, JPEG_REASONS.get(code, "malformed JPEG"))
                return _reencode_jpeg(data, info, max_side, quality, "structure")
            action = "passthrough"
            if end < len(data):  # data after the end-of-image marker is no part of the image
                data, action = data[:end], "trimmed"
            if verify != "header":
                _decode_check(data, scale=verify == "entropy")
            return Encoded(data, info.width, info.height, action)
        if info.components in (1, 3) and info.adobe_transform != 0:
            return _reencode_jpeg(data, info, max_side, quality, why)
        _decode_check(data, scale=True)  # CMYK / YCCK / RGB-transform JPEGs: PIL decodes corrupt data silently
        return _reencode(data, max_side, quality, max_pixels, why)
    return _reencode(data, max_side, quality, max_pixels, kind)


def _reencode_reason(info: JpegInfo, max_side: int | None) -> str | None:
    if info.components == 4:
        return "cmyk"
    if info.components == 1:
        return "grayscale"
    if info.components != 3 or info.adobe_transform == 0:
        return "colorspace"
    if info.sof != 0xC0:
        return "progressive" if info.sof in (0xC2, 0xC6, 0xCA, 0xCE) else "non-baseline"
    if info.orientation != 1:
        return "exif-orientation"
    if max_side and max(info.width, info.height) > max_side:
        return "resize"
    return None


def _decode_check(data: bytes, walk_reason: str | None = None, scale: bool = False) -> None:
    """Strict libjpeg-turbo decode (its warnings are errors). scale=True decodes at 1/8 scale, luma only:
    the entropy decoder still reads every Huffman code of every component, the IDCT computes only DC
    terms and colour conversion is skipped. Why not PIL: its decoder ignores libjpeg's corrupt-data
    warnings and returns grey blocks for an image with garbage in its entropy-coded data."""
    kw = dict(min_width=1, min_height=1, colorspace="GRAY") if scale else {}
    try:
        simplejpeg.decode_jpeg(data, strict=True, **kw)
    except Exception as e:  # libjpeg-turbo reports corrupt data as ValueError/RuntimeError
        why = f"{walk_reason}; decoder: {e}" if walk_reason else str(e)
        raise BadImage(f"corrupt or truncated JPEG: {why}") from None


# EXIF orientation -> the array operation that makes the image upright (PIL's exif_transpose table).
_ORIENT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1),
}


def _reencode_jpeg(data: bytes, info: JpegInfo, max_side: int | None, quality: int, why: str) -> Encoded:
    """YCbCr/grayscale JPEG -> baseline RGB JPEG through libjpeg-turbo directly.

    With --max-side, libjpeg-turbo decodes in the DCT domain at the smallest of its M/8 scale factors
    (7/8, 3/4, 5/8, 1/2, ... 1/8) that still covers the target, so a 500 px source for a 256 px target
    is decoded at 5/8 (313 px) with a reduced IDCT, and Lanczos only finishes the last step. PIL's
    draft() offers only 1/2, 1/4, 1/8 and so does nothing for the common 1x-2x case."""
    tw, th = target_size(info.width, info.height, max_side)  # stored orientation
    try:
        if (tw, th) != (info.width, info.height):
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=tw, min_height=th, strict=True)
        else:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except Exception as e:
        raise BadImage(f"corrupt or truncated JPEG: {e}") from None
    if info.orientation in _ORIENT:
        arr = _ORIENT[info.orientation](arr)
        tw, th = (th, tw) if info.orientation >= 5 else (tw, th)
    if arr.shape[:2] != (th, tw):
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((tw, th), Image.Resampling.LANCZOS))
        why = f"{why}+resize" if why != "resize" else why
    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")
    return Encoded(jpeg, tw, th, f"reencode:{why}")


def _reencode(data: bytes, max_side: int | None, quality: int, max_pixels: int, why: str) -> Encoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette/transparency chatter; errors still raise
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            _check_size(w, h, max_pixels)
            if im.format == "JPEG" and max_side:
                # DCT-domain downscale: libjpeg decodes directly at 1/2, 1/4 or 1/8 scale, never below
                # twice the target (draft picks the largest reduction that keeps the requested size).
                tw, th = target_size(w, h, max_side)
                if w >= 2 * tw:
                    im.draft("RGB" if im.mode != "CMYK" else "CMYK", (tw, th))
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"cannot decode {why} image: {type(e).__name__}: {e}") from None
    tw, th = target_size(rgb.width, rgb.height, max_side)
    if (tw, th) != rgb.size:
        rgb = rgb.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=None)
        why = f"{why}+resize" if why != "resize" else why
    arr = np.asarray(rgb, dtype=np.uint8)
    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")
    return Encoded(jpeg, tw, th, f"reencode:{why}")


def _to_rgb(im: Image.Image) -> Image.Image:
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        # 16-bit greyscale: keep the top 8 bits (PIL's own convert would clip at 255).
        a8 = (a.astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8) if a.max(initial=0) > 255 else a.astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if mode == "RGB":
        return im
    if mode == "CMYK":
        # Adobe writes inverted CMYK JPEGs; PIL's JPEG plugin already undoes that on decode.
        return im.convert("RGB")
    return im.convert("RGB")

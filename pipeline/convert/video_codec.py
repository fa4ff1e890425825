"""Turn any video file the converter meets into what the clip loaders expect: constant-frame-rate H.264
(yuv420p) in MP4. `normalize_video(path, VideoOptions)` returns an `EncodedVideo` or raises `BadVideo`
with a reason a person can act on.

What is stored for each input:
  * an MP4 (ISO base media file, not QuickTime) holding constant-frame-rate H.264 yuv420p whose keyframe
    interval is at most --max-gop frames and that fits --max-side: its bytes, untouched (--reencode auto);
  * anything else that decodes: re-encoded with libx264 (CRF --crf, preset --preset, one thread, no
    B-frames, an IDR frame exactly every --keyint frames), downscaled to --max-side when asked, to even
    dimensions, at a constant frame rate. Audio is dropped when re-encoding (kept in pass-through);
  * a variable-frame-rate source is re-encoded at a constant rate (FFmpeg's fps filter rule: each source
    frame goes to the output slot nearest its timestamp; empty slots repeat the previous frame, a frame
    whose slot is taken by a later one is dropped);
  * a source larger than --max-pixels is refused unless --max-side brings it under the limit.
Every video is demuxed and fully decoded; `num_frames` is what decodes (pass-through) or what was
encoded (re-encode). Re-encoding is deterministic: libx264 and the scaler run single-threaded.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

REENCODE = ("auto", "always", "never")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
DEFAULT_MAX_PIXELS = 4096 * 2160  # DCI 4K
HARD_MAX_SIDE = 16384  # refused whatever the arguments (libavcodec's own limit for most codecs)
MOV_FAMILY = "mov,mp4,m4a,3gp,3g2,mj2"


class BadVideo(Exception):
    """An input that cannot become a sample; the message is the reason written to bad_files.jsonl."""


@dataclass(frozen=True)
class VideoOptions:
    max_side: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    reencode: str = "auto"
    keyint: int = 16
    max_gop: int = 64
    crf: int = 23
    preset: str = "veryfast"


@dataclass
class EncodedVideo:
    mp4: bytes
    fps: Fraction
    num_frames: int
    width: int
    height: int
    keyint: int
    action: str  # "passthrough" or "reencode:<first reason>"


_SIGNATURES = (b"RIFF", b"\x1aE\xdf\xa3", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"FLV", b"OggS",
               b"0&\xb2u\x8ef\xcf\x11")


def _looks_like_container(head: bytes) -> bool:
    return (head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
            or any(head.startswith(s) for s in _SIGNATURES) or (len(head) > 0 and head[0] == 0x47))


def _err(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _open(path: str, head: bytes):
    import av
    try:
        return av.open(path, "r")
    except av.error.FFmpegError as e:
        if _looks_like_container(head):
            raise BadVideo(f"truncated or corrupt container: {_err(e)}") from None
        raise BadVideo(f"not a video: unrecognised content ({_err(e)})") from None


def _video_stream(container):
    import av
    videos = [s for s in container.streams.video
              if not (s.disposition & av.stream.Disposition.attached_pic)]
    if not videos:
        kinds = sorted({s.type for s in container.streams})
        if "audio" in kinds:
            raise BadVideo("no video stream (audio only)")
        raise BadVideo("no video stream" + (f" (streams: {', '.join(kinds)})" if kinds else ""))
    return videos[0]


def _rate(x) -> Fraction | None:
    try:
        f = Fraction(x) if x is not None else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if f is not None and 0 < f <= 1000 else None


def _frame_rate(stream, pts: list[int], vfr: bool) -> Fraction:
    """The constant rate the output runs at. CFR: the container's declared rate that matches the
    timestamps (exact fractions such as 30000/1001), else the measured one. VFR: FFmpeg's r_frame_rate
    (the rate every timestamp fits on) unless implausible, else the average rate."""
    tb = Fraction(stream.time_base) if stream.time_base else None
    declared = [r for r in (_rate(stream.guessed_rate), _rate(stream.average_rate), _rate(stream.base_rate)) if r]
    measured = None
    if tb and len(pts) > 1:
        if vfr:
            avg = _rate((len(pts) - 1) / (Fraction(int(pts[-1] - pts[0])) * tb)) if pts[-1] > pts[0] else None
            nominal = _rate(stream.guessed_rate)
            if nominal and avg and avg * Fraction(9, 10) <= nominal <= min(avg * 4, Fraction(240)):
                return nominal
            if avg:
                return avg.limit_denominator(1001)
        elif pts[-1] > pts[0]:
            measured = _rate((len(pts) - 1) / (Fraction(int(pts[-1] - pts[0])) * tb))  # mean spacing
    if measured is None:
        return declared[0] if declared else Fraction(25)
    for r in declared:
        if abs(r - measured) <= measured / 100:
            return r
    return measured.limit_denominator(1001)


def _is_vfr(pts: list[int]) -> bool:
    """Timestamps (sorted, in stream ticks) that are not evenly spaced: a spacing more than 10% (+1 tick)
    off the median one (a dropped frame, a rate change), or a timestamp more than half a frame period
    off the uniform grid (slow drift). Rounding to a coarse time base (e.g. milliseconds re-expressed in
    1/16000 s) stays within both."""
    if len(pts) < 3:
        return False
    p = np.asarray(pts, np.float64)
    d = np.diff(p)
    med = float(np.median(d))
    if med <= 0:
        return True
    mean = (p[-1] - p[0]) / (len(p) - 1)
    grid = p[0] + mean * np.arange(len(p))
    return bool(np.any(np.abs(d - med) > 0.1 * med + 1) or np.any(np.abs(p - grid) > 0.5 * mean))


def _out_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        w, h = max(1, round(w * s)), max(1, round(h * s))
    return max(2, w - w % 2), max(2, h - h % 2)


def _is_iso_mp4(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] != b"qt  "


_X264_AVX512_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what x264 requires for AVX512


@functools.lru_cache(maxsize=None)
def x264_asm_param() -> str:
    """':asm=AVX2' on CPUs where x264 would use its AVX-512 code, else ''.

    Why: with AVX-512, x264's macroblock-tree lookahead reads uninitialised memory at some frame sizes
    (320x240, 160x120, 32x32 seen): the same input encoded twice in one process gave different bytes
    (tests/test_convert_video.py finds it with glibc's MALLOC_PERTURB_). Up to AVX2 the output does not
    depend on the heap's contents, and on the AMD EPYC (Zen 4) tested it is also faster. 'AVX2' implies
    SSE..SSE4.2, AVX, FMA3, LZCNT, BMI1/2, which every CPU with these AVX-512 subsets has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return ":asm=AVX2" if _X264_AVX512_FLAGS <= flags and {"avx2", "fma", "bmi2"} <= flags else ""
    return ""


class _H264Writer:
    """Constant-frame-rate H.264 (yuv420p) in MP4, deterministic: one encoder thread, no AVX-512 code
    (x264_asm_param), fixed GOP (IDR every `keyint` frames, no scene-cut keyframes, no B-frames)."""

    def __init__(self, width: int, height: int, fps: Fraction, opts: VideoOptions, downscale: bool):
        import av
        self.width, self.height, self.fps = width, height, fps
        self._interp = "AREA" if downscale else "BICUBIC"
        self._buf = io.BytesIO()
        self._oc = av.open(self._buf, "w", format="mp4")
        k = opts.keyint
        self._s = self._oc.add_stream("libx264", rate=fps, options={
            "preset": opts.preset, "crf": str(opts.crf),
            "x264-params": f"keyint={k}:min-keyint={k}:scenecut=0:bframes=0:threads=1" + x264_asm_param()})
        self._s.width, self._s.height, self._s.pix_fmt = width, height, "yuv420p"
        self._s.codec_context.thread_count = 1
        self._s.codec_context.time_base = 1 / fps
        self._none = av.video.frame.PictureType.NONE
        self.n = 0

    def prepare(self, frame):
        return frame.reformat(width=self.width, height=self.height, format="yuv420p", interpolation=self._interp)

    def write(self, f) -> None:
        f.pts = self.n
        f.time_base = 1 / self.fps
        f.pict_type = self._none  # the source's I-frames must not force keyframes: the GOP stays fixed
        for p in self._s.encode(f):
            self._oc.mux(p)
        self.n += 1

    def close(self) -> bytes:
        for p in self._s.encode():
            self._oc.mux(p)
        self._oc.close()
        return self._buf.getvalue()

    def abort(self) -> None:
        try:
            self._oc.close()
        except Exception:
            pass


class _CfrResampler:
    """Variable -> constant frame rate: each frame takes the output slot round((t - t0) * fps); empty slots
    repeat the previous frame; when a later frame claims the same slot the earlier one is dropped."""

    def __init__(self, writer: _H264Writer):
        self.w = writer
        self.t0 = None
        self.prev = None
        self.last_slot = -1
        self.next_slot = 0

    def push(self, frame, t: Fraction | None) -> None:
        f = self.w.prepare(frame)
        if t is None:  # no timestamp: the next slot
            slot = self.last_slot + 1
        else:
            if self.t0 is None:
                self.t0 = t
            slot = round((t - self.t0) * self.w.fps)
        if self.prev is not None:
            while self.next_slot < slot:
                self.w.write(self.prev)
                self.next_slot += 1
        self.prev, self.last_slot = f, slot

    def finish(self) -> None:
        if self.prev is not None:
            self.w.write(self.prev)
            self.next_slot += 1
            self.prev = None


def normalize_video(path: str, opts: VideoOptions) -> EncodedVideo:
    """Validate one video by demuxing and decoding all of it; return what to store. Raises BadVideo."""
    import av
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise BadVideo("broken symlink" if os.path.islink(path) else "file disappeared during conversion") from None
    except OSError as e:
        raise BadVideo(f"unreadable: {e.strerror or e}") from None
    if size == 0:
        raise BadVideo("empty file (0 bytes)")

    # Pass 1: demux only (no decoding): stream properties, keyframe spacing, timestamps.
    with _open(path, head) as c:
        vs = _video_stream(c)
        cc = vs.codec_context
        codec, pix_fmt, w, h = cc.name, cc.pix_fmt, cc.width, cc.height
        if max(w, h) > HARD_MAX_SIDE:
            raise BadVideo(f"too large: {w}x{h} (more than {HARD_MAX_SIDE} pixels a side)")
        if w * h > opts.max_pixels:
            ow, oh = _out_size(w, h, opts.max_side if opts.reencode != "never" else None)
            if ow * oh > opts.max_pixels:
                raise BadVideo(f"too large: {w}x{h} is more than --max-pixels {opts.max_pixels} "
                               + ("(pass --max-side to downscale)" if opts.max_side is None else
                                  "(--reencode never)" if opts.reencode == "never" else
                                  f"even at --max-side {opts.max_side}"))
        container_name = c.format.name
        announced = vs.frames
        keys, pts, npk = [], [], 0
        try:
            for pkt in c.demux(vs):
                if pkt.size == 0:
                    continue
                if pkt.is_keyframe:
                    keys.append(npk)
                if pkt.pts is not None:
                    pts.append(pkt.pts)
                npk += 1
        except av.error.FFmpegError as e:
            raise BadVideo(f"corrupt: demuxing failed after {npk} packets ({_err(e)})") from None
        stream_index = vs.index
        if npk == 0:
            raise BadVideo("no decodable frames (the video stream holds no packets)")
        pts.sort()
        vfr = len(pts) == npk and _is_vfr(pts)
        fps = _frame_rate(vs, pts if len(pts) == npk else [], vfr)
    gop = max(np.diff(keys + [npk]).max() if keys else npk, keys[0] if keys else 0)
    reasons = []
    if opts.reencode == "always":
        reasons.append("always")
    if container_name != MOV_FAMILY or not _is_iso_mp4(head):
        reasons.append("container")
    elif codec != "h264":
        reasons.append("codec")
    elif pix_fmt != "yuv420p":
        reasons.append("pix_fmt")
    if vfr:
        reasons.append("vfr")
    if not w or not h or (opts.max_side and max(w, h) > opts.max_side) or w * h > opts.max_pixels:
        reasons.append("size")
    if gop > opts.max_gop:
        reasons.append("gop")
    if reasons and opts.reencode == "never":
        raise BadVideo(f"needs re-encoding ({', '.join(reasons)}) but --reencode never")

    # Pass 2: decode every frame (and re-encode when needed).
    writer = resampler = None
    n = 0
    try:
        with av.open(path, "r") as c:
            vs = c.streams[stream_index]
            vs.codec_context.thread_count = 1
            for frame in c.decode(vs):
                if reasons:
                    if writer is None:
                        ow, oh = _out_size(frame.width, frame.height, opts.max_side)
                        writer = _H264Writer(ow, oh, fps, opts, downscale=ow < frame.width or oh < frame.height)
                        resampler = _CfrResampler(writer) if vfr else None
                    if resampler is not None:
                        t = frame.pts * frame.time_base if frame.pts is not None and frame.time_base else None
                        resampler.push(frame, t)
                    else:
                        writer.write(writer.prepare(frame))
                n += 1
            if resampler is not None:
                resampler.finish()
            data = writer.close() if writer is not None else None
    except av.error.FFmpegError as e:
        if writer is not None:
            writer.abort()
        raise BadVideo(f"corrupt: decoding failed after {n} frames ({_err(e)})") from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if n == 0:
        raise BadVideo("no decodable frames")
    if announced > 0 and announced - n > max(1, announced // 50):
        raise BadVideo(f"truncated: the header announces {announced} frames, {n} decode")
    if not reasons:
        with open(path, "rb") as f:
            data = f.read()
        return EncodedVideo(data, fps, n, w, h, int(gop), "passthrough")
    return EncodedVideo(data, fps, writer.n, writer.width, writer.height, opts.keyint, f"reencode:{reasons[0]}")

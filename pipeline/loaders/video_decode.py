"""Read a video split's shards and decode the frames a clip needs.

`VideoIndex` is `pipeline.format.shard_index.ShardIndex` for video splits (manifest "kind": "video"): it reads every
shard's DALI index once and then reads a sample's encoded video, its `.json` metadata (num_frames,
width, height, fps) and its label with `os.pread` at their offsets. A missing or unreadable shard
raises `ShardError` naming the file.

Decoders (`make_decoder(name, device)`), all with one contract: `decode_batch(datas, frames)` takes the
encoded bytes of n videos and, per video, the sorted unique frame indices wanted (frame i = the i-th
frame in presentation order), and returns per video a uint8 (K, H, W, 3) RGB array of those frames,
or a `BadSample` when the video cannot give them (corrupt, truncated, shorter than its metadata).

- `pyav` (CPU): opens the bytes with libavformat, seeks to the keyframe at or before the first wanted
  frame, decodes forward and stops at the last wanted frame; only the wanted frames are converted to
  RGB. Frames are identified by their timestamps (index = round((pts - start) * time_base * fps));
  a stream without timestamps, or a seek that lands after the wanted frame, is decoded from the start
  and counted. libavcodec runs single-threaded per video; the loader decodes videos in parallel
  threads (PyAV releases the GIL while decoding).
- `dali`: `fn.decoders.video` over the batch's bytes fed through `fn.external_source`, with the
  wanted indices as a per-sample `frames` argument input; device "cpu" (libavcodec inside DALI) or
  "mixed" (NVDEC) when the loader's device is CUDA. DALI 2.4's CPU variant decodes VP8, VP9 and MJPEG
  only; H.264 / H.265 / MPEG-4 / AV1 need "mixed" (NVDEC). When DALI cannot be used at all (not
  installed, no GPU for "mixed", codec not supported by the variant) the decoder says so once
  (`fallback` holds the reason, a warning is issued) and every batch goes through PyAV from then on.
  A batch that fails inside DALI for another reason (e.g. one corrupt member) is decoded by PyAV,
  which decides which members are bad, so a DALI error never costs a good sample.

`crop_resize` cuts the recorded crop box out of each frame and resizes it to the view size (PIL,
antialiased bilinear, releases the GIL).
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.format import layout as fmt
from pipeline.format.errors import BadSample, ShardError
from pipeline.format.shard_index import shard_entries

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
DECODERS = ("pyav", "dali")


class VideoIndex:
    """Where every sample of a video split lives: shard number, offsets and sizes of its video, .json
    and .label.i64 members. Built from the .idx files (read once); bytes are read with os.pread."""

    def __init__(self, split_dir: str | Path):
        self.dir = Path(split_dir)
        self.manifest = fmt.load_manifest(self.dir)
        kind = self.manifest.get("kind", "image")
        if kind != "video":
            raise ShardError(f"{self.dir / fmt.MANIFEST} has kind {kind!r}: not a video split (use "
                             f"pipeline.build_loader for images)")
        shards = self.manifest.get("shards") or []
        if not shards:
            raise ShardError(f"{self.dir}: the manifest lists no WebDataset shards")
        self.num_samples = n = int(self.manifest["num_samples"])
        self.shard = np.full(n, -1, np.int64)
        self.video = np.zeros((n, 2), np.int64)
        self.meta_at = np.zeros((n, 2), np.int64)
        self.label_at = np.zeros((n, 2), np.int64)
        self.ext: list[str] = [""] * n
        self.tars: list[Path] = []
        for k, sh in enumerate(shards):
            tar, entries = shard_entries(self.dir, sh)
            for j, (s, members) in enumerate(entries):
                ext = next((e for e in VIDEO_EXTS if e in members), None)
                if ext is None or "json" not in members or "label.i64" not in members:
                    raise ShardError(f"{self.dir / sh['idx']} line {j + 2}: no video ({'/'.join(VIDEO_EXTS)}) / "
                                     f"json / label.i64 member")
                self.shard[s] = k
                self.video[s] = members[ext]
                self.meta_at[s] = members["json"]
                self.label_at[s] = members["label.i64"]
                self.ext[s] = ext
            self.tars.append(tar)
        if (self.shard < 0).any():
            raise ShardError(f"{self.dir}: shards do not cover indices {np.flatnonzero(self.shard < 0)[:10]}...")
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _fd(self, k: int) -> int:
        with self._lock:
            fd = self._fds.get(k)
            if fd is None:
                try:
                    fd = os.open(self.tars[k], os.O_RDONLY)
                except OSError as e:
                    raise ShardError(f"cannot open shard {self.tars[k]}: {e}") from e
                self._fds[k] = fd
            return fd

    def _pread(self, index: int, at: np.ndarray) -> bytes:
        k = int(self.shard[index])
        off, size = at[index]
        try:
            data = os.pread(self._fd(k), int(size), int(off))
        except OSError as e:
            raise ShardError(f"cannot read sample {index} from shard {self.tars[k]}: {e}") from e
        if len(data) != size:
            raise ShardError(f"shard {self.tars[k]} is shorter than its index says (sample {index})")
        return data

    def read_meta(self, index: int) -> tuple[dict, int]:
        """(metadata, label) of a global index; BadSample when the .json lacks what clips need."""
        raw = self._pread(index, self.meta_at)
        lab = self._pread(index, self.label_at)
        try:
            meta = json.loads(raw)
            for key in ("num_frames", "width", "height"):
                if int(meta[key]) < 1:
                    raise ValueError(f"{key}={meta[key]}")
        except (ValueError, KeyError, TypeError) as e:
            raise BadSample(f"bad video metadata (.json): {e}") from None
        return meta, int(np.frombuffer(lab, "<i8")[0])

    def read_video(self, index: int) -> bytes:
        return self._pread(index, self.video)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# -- PyAV ------------------------------------------------------------------------------------------
def pyav_decode(data: bytes, frames, threads: int = 1, stats: dict | None = None) -> np.ndarray:
    """uint8 (K, H, W, 3): the frames `frames` (sorted unique indices) of an encoded video. Seeks to the
    keyframe before frames[0] and decodes no further than frames[-1]. BadSample when it cannot."""
    import av
    want = sorted({int(i) for i in frames})
    if not want or want[0] < 0:
        raise ValueError(f"frames={frames}: want non-negative indices")
    try:
        return _pyav_decode(av, data, want, threads, seek=want[0] > 0, stats=stats)
    except _SeekMissed:
        if stats is not None:
            stats["pyav_reseek"] = stats.get("pyav_reseek", 0) + 1
        return _pyav_decode(av, data, want, threads, seek=False, stats=stats)


class _SeekMissed(Exception):
    pass


def _pyav_decode(av, data, want, threads, seek, stats):
    wantset, last = set(want), want[-1]
    out: dict[int, np.ndarray] = {}
    seen = -1
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            if not c.streams.video:
                raise BadSample("no video stream")
            s = c.streams.video[0]
            s.thread_type = "NONE" if threads <= 1 else "AUTO"
            if threads > 1:
                s.codec_context.thread_count = threads
            rate = s.average_rate or s.guessed_rate or s.base_rate
            tb = s.time_base
            start = s.start_time if s.start_time is not None else 0
            timed = rate is not None and tb is not None and rate > 0
            if timed:
                per_tick = float(Fraction(tb) * Fraction(rate))  # frames per timestamp tick
            if seek and timed:
                target = start + int(round(Fraction(want[0]) / (Fraction(rate) * Fraction(tb))))
                c.seek(target, stream=s, backward=True, any_frame=False)
            count = -1
            for fr in c.decode(s):
                count += 1
                if timed and fr.pts is not None:
                    i = int(round((fr.pts - start) * per_tick))
                elif seek:
                    raise _SeekMissed  # no timestamps after a seek: count from the start instead
                else:
                    i = count
                if seek and seen < 0 and i > want[0]:
                    raise _SeekMissed  # landed after the first wanted frame
                seen = max(seen, i)
                if i in wantset and i not in out:
                    out[i] = fr.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except (BadSample, _SeekMissed):
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...), or anything the demuxer chokes on
        raise BadSample(f"video decode failed: {type(e).__name__}: {e}") from None
    missing = [i for i in want if i not in out]
    if missing:
        raise BadSample(f"video has no frame {missing[0]} (decoded up to frame {seen})")
    shapes = {a.shape for a in out.values()}
    if len(shapes) != 1:
        raise BadSample(f"frames of different sizes {sorted(shapes)}")
    return np.stack([out[i] for i in want])


class PyAVDecoder:
    name = "pyav"
    fallback = None

    def __init__(self, threads_per_video: int = 1):
        self.threads = threads_per_video
        self.stats: dict = {}

    def decode_one(self, data: bytes, frames) -> np.ndarray:
        return pyav_decode(data, frames, self.threads, self.stats)

    def decode_batch(self, datas, frames) -> list:
        out = []
        for d, f in zip(datas, frames):
            try:
                out.append(self.decode_one(d, f))
            except BadSample as e:
                out.append(e)
        return out


# -- DALI ------------------------------------------------------------------------------------------
# Codecs of DALI 2.4's fn.decoders.video per variant (its documentation): the CPU variant decodes VP8,
# VP9 and MJPEG only; the mixed (NVDEC) variant also H.264, H.265, MPEG-4 and AV1.
DALI_CODECS = {"cpu": frozenset({"vp8", "vp9", "mjpeg"}),
               "mixed": frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "mpeg4", "av1"})}


def probe_codec(data: bytes) -> str | None:
    """The codec name of the first video stream (libavformat header parse), None if unreadable."""
    import av
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            return c.streams.video[0].codec_context.name if c.streams.video else None
    except Exception:
        return None


class DaliVideoDecoder:
    """fn.decoders.video on a batch of encoded videos (see the module docstring). The loader calls
    decode_batch once per batch from its producer thread."""

    name = "dali"

    def __init__(self, device: str = "cpu", num_threads: int = 2, max_batch: int = 64, device_id: int = 0):
        self.gpu = str(device).startswith("cuda")
        self.variant = "mixed" if self.gpu else "cpu"
        self.num_threads, self.max_batch, self.device_id = num_threads, max_batch, device_id
        self.fallback: str | None = None
        self.pyav = PyAVDecoder()
        self.stats = {"dali_batches": 0, "dali_failed_batches": 0}
        self._pipe = None
        self._verified = False
        try:
            import nvidia.dali as dali
            self.version = dali.__version__
        except Exception as e:  # not installed / broken install
            self.version = None
            self._disable(f"nvidia.dali does not import: {e}")
        if self.gpu and self.fallback is None:
            import torch
            if not torch.cuda.is_available():
                self._disable("device='cuda' but no CUDA device for DALI's mixed video decoder")

    def _disable(self, reason: str) -> None:
        self.fallback = reason
        self._pipe = None
        warnings.warn(f"DALI video decoder not usable, decoding with PyAV instead: {reason}", RuntimeWarning,
                      stacklevel=3)

    def unsupported_codec(self, datas) -> str | None:
        """A reason string when some video's codec is not one this DALI variant decodes, else None."""
        ok = DALI_CODECS[self.variant]
        for d in datas:
            codec = probe_codec(d)
            if codec is not None and codec not in ok:
                return (f"DALI {self.version} fn.decoders.video ({self.variant}) does not decode {codec} "
                        f"(it decodes {', '.join(sorted(ok))})")
        return None

    def _build(self, batch: int):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        pipe = Pipeline(batch_size=batch, num_threads=self.num_threads,
                        device_id=self.device_id if self.gpu else None, exec_async=False, exec_pipelined=False,
                        prefetch_queue_depth=1)
        with pipe:
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            fr = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            pipe.set_outputs(fn.decoders.video(enc, device=self.variant, frames=fr))
        pipe.build()
        return pipe

    def _run(self, datas, frames) -> list[np.ndarray]:
        n = len(datas)
        if self._pipe is None or self._pipe.max_batch_size < n:
            self._pipe = self._build(max(n, self.max_batch))
        pipe = self._pipe
        pipe.feed_input("enc", [np.frombuffer(d, np.uint8) for d in datas])
        pipe.feed_input("frames", [np.asarray(f, np.int32) for f in frames])
        (out,) = pipe.run()
        if self.gpu:
            return self._to_torch(out, n)
        return [np.array(out[i]) for i in range(n)]

    def _to_torch(self, out, n: int) -> list:
        """NVDEC's frames stay on the GPU: each clip copied into a torch uint8 (T, H, W, 3) tensor on
        a side stream (synchronised before DALI reuses its buffers); the loader crops and resizes them
        there (crop_resize_torch). Copying them to the host and resizing with PIL cost a PCIe round
        trip and a CPU resize per frame."""
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dev = torch.device("cuda", self.device_id)
        if getattr(self, "_stream", None) is None:
            self._stream = torch.cuda.Stream(dev)
        clips = []
        with torch.cuda.stream(self._stream):
            for i in range(n):
                t = out[i]
                dst = torch.empty(t.shape(), dtype=torch.uint8, device=dev)
                feed_ndarray(t, dst, cuda_stream=self._stream)
                clips.append(dst)
        self._stream.synchronize()
        return clips

    def decode_batch(self, datas, frames) -> list:
        if not datas:
            return []
        if self.fallback is None and not self._verified:
            reason = self.unsupported_codec(datas)
            if reason:
                self._disable(reason)
        if self.fallback is None:
            try:
                res = self._run(datas, frames)
                self.stats["dali_batches"] += 1
                self._verified = True
                return res
            except Exception:
                self._pipe = None  # its state after an error is not to be trusted
                reason = self.unsupported_codec(datas)
                if reason:
                    self._disable(reason)
                else:
                    self.stats["dali_failed_batches"] += 1
        return self.pyav.decode_batch(datas, frames)


def make_decoder(name: str, device: str = "cpu", num_threads: int = 2, max_batch: int = 64):
    if name == "pyav":
        return PyAVDecoder()
    if name == "dali":
        import torch
        from pipeline.loaders.prefetch import resolve_device
        dev = resolve_device(device) if torch.device(device).type == "cuda" and torch.cuda.is_available() \
            else torch.device(device)
        return DaliVideoDecoder(device=str(dev), num_threads=num_threads, max_batch=max_batch,
                                device_id=dev.index if dev.index is not None else 0)
    raise KeyError(f"unknown video decoder {name!r}; known: {', '.join(DECODERS)}")


# -- crop + resize ---------------------------------------------------------------------------------
def crop_resize_torch(frames, box, size: int):
    """torch uint8 (T, H, W, 3) frames on any device -> uint8 (T, size, size, 3): the box (top, left,
    h, w) of every frame, antialiased bilinear (torch's antialias follows PIL's filter, so this
    matches crop_resize to a level or so). The GPU path's resize: frames never leave the device."""
    import torch
    import torch.nn.functional as F
    top, left, h, w = (int(v) for v in box)
    x = frames[:, top:top + h, left:left + w].permute(0, 3, 1, 2).to(torch.float32)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def crop_resize(frames: np.ndarray, box, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) frames -> uint8 (T, size, size, 3): the box (top, left, h, w) of every frame,
    resized with PIL's antialiased bilinear filter."""
    from PIL import Image
    top, left, h, w = (int(v) for v in box)
    out = np.empty((frames.shape[0], size, size, 3), np.uint8)
    for t in range(frames.shape[0]):
        im = Image.fromarray(frames[t])
        out[t] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h),
                                      reducing_gap=None))
    return out

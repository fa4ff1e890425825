"""Video decode benchmark: decoded frames/s of PyAV vs DALI (CPU; GPU when CUDA is available).

    python -m pipeline.bench_video                      # 64x64 and 320x240 H.264 (+ VP9 for DALI CPU)
    python -m pipeline.bench_video --sizes 320x240 --videos 32 --frames 64 --repeats 3

Synthetic videos are made on the fly (`synth_frames`: moving shapes over a textured background, encoded
with PyAV, H.264 by default with a keyframe every `--gop` frames). Each decoder decodes every frame of
every video (`full`) and, separately, one 16-frame clip at stride 2 from a random start (`clip`: seek
to the keyframe before it, decode up to its last frame), as the clip loader does; frames/s counts
frames returned. PyAV runs with 1 and `--threads` threads over videos (a thread pool, PyAV releases
the GIL); DALI with `--threads` threads inside one pipeline. DALI 2.4's CPU video decoder does not
decode H.264 (VP8 / VP9 / MJPEG only), so its CPU rows use VP9 copies of the same videos, and the
PyAV rows on those VP9 copies are the like-for-like comparison. Rows are printed and appended to
pipeline/results/bench_video.csv with device, versions and date. No assertions: numbers only.

Also here: `synth_frames` / `encode_video` / `write_video_split` (a minimal writer of the video dataset
layout: WebDataset shards + DALI index + manifest "kind": "video"), used by this benchmark and by the
tests for what tools/convert_video.py does not write (VP9 splits, which DALI's CPU decoder can read).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_video.csv"


# -- synthetic videos ------------------------------------------------------------------------------
DIRECTIONS = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)]


def synth_frames(rng: np.random.Generator, label: int, num_frames: int = 32, width: int = 64, height: int = 64,
                 num_classes: int = 4) -> np.ndarray:
    """uint8 (F, H, W, 3): a shape moving in the direction of its class (8 directions at most) with a random
    speed, over a static textured background; colour, shape, size and position are nuisances."""
    dx, dy = DIRECTIONS[label % len(DIRECTIONS)]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = rng.uniform(40, 215, 3).astype(np.float32)
    tex = rng.normal(0, 1, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    tex = np.kron(tex, np.ones((8, 8, 1), np.float32))[:height, :width] * 18
    base = np.clip(bg + tex, 0, 255)
    r = rng.uniform(0.12, 0.2) * min(width, height)
    speed = rng.uniform(1.0, 2.0) * min(width, height) / 64
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    col = rng.uniform(0, 255, 3).astype(np.float32)
    kind = rng.integers(3)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        cx, cy = (x0 + dx * speed * t) % width, (y0 + dy * speed * t) % height
        ddx = (xx - cx + width / 2) % width - width / 2  # toroidal distance: the shape wraps around
        ddy = (yy - cy + height / 2) % height - height / 2
        if kind == 0:
            m = ddx ** 2 + ddy ** 2 <= r ** 2
        elif kind == 1:
            m = (np.abs(ddx) <= r * 0.85) & (np.abs(ddy) <= r * 0.85)
        else:
            m = (ddy >= -r) & (ddy <= r) & (np.abs(ddx) <= (ddy + r) / 2)
        f = base.copy()
        f[m] = col
        out[t] = f.astype(np.uint8)
    return out


def encode_video(frames: np.ndarray, codec: str = "libx264", fps: int = 25, gop: int = 16, fmt: str = "mp4",
                 crf: int = 18) -> bytes:
    """Encode uint8 (F, H, W, 3) RGB frames with PyAV (even sizes for yuv420p)."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "libx264":
            s.options = {"preset": "ultrafast", "crf": str(crf), "keyint": str(gop), "min-keyint": str(gop),
                         "scenecut": "0", "bframes": "0"}
        elif codec.startswith("libvpx"):
            s.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def write_video_split(out: str | Path, split: str, videos: list[tuple[bytes, int, dict]], shard_size: int = 16,
                      classes: list[str] | None = None, ext: str = "mp4") -> Path:
    """Write `videos` [(encoded bytes, label, json fields)] as OUT/<split> in the video dataset layout:
    shards `<split>-NNNNNN.tar` + `.idx`, members KEY.<ext>, .cls, .json, .label.i64, .index.i64, and a
    manifest with "kind": "video". Sample i gets global index i."""
    from . import dataset_format as fmt
    from .wds_writer import ShardWriter
    d = Path(out) / split
    d.mkdir(parents=True, exist_ok=True)
    shards = []
    labels = [lab for _, lab, _ in videos]
    classes = classes or [f"class{k}" for k in range(max(labels) + 1)]
    for k, first in enumerate(range(0, len(videos), shard_size)):
        tar, idx = fmt.shard_name(split, k, "tar"), fmt.shard_name(split, k, "idx")
        w = ShardWriter(d / tar, d / idx)
        chunk = videos[first:first + shard_size]
        for j, (data, label, meta) in enumerate(chunk):
            i = first + j
            info = {"index": i, "label": label, "class": classes[label], "source": f"synthetic/{i}", **meta}
            w.add(fmt.sample_key(i), {ext: data, "cls": str(label).encode(), "json": json.dumps(info).encode(),
                                      "label.i64": np.int64(label).tobytes(), "index.i64": np.int64(i).tobytes()})
        tar_sha, idx_sha, size = w.close()
        shards.append({"tar": tar, "idx": idx, "first_index": first, "num_samples": len(chunk),
                       "sha256": tar_sha, "idx_sha256": idx_sha, "bytes": size})
    manifest = {"format_version": fmt.FORMAT_VERSION, "kind": "video", "split": split, "num_samples": len(videos),
                "classes": classes, "class_counts": [labels.count(c) for c in range(len(classes))],
                "shards": shards}
    (d / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return d


def make_synthetic_split(out: str | Path, split: str = "train", classes: int = 4, per_class: int = 8,
                         num_frames: int = 32, width: int = 64, height: int = 64, seed: int = 0, gop: int = 16,
                         shard_size: int = 16, codec: str = "libx264") -> Path:
    """A class-mixed synthetic video split (class = motion direction), deterministic in `seed`."""
    rng = np.random.default_rng([seed, 0xC11])
    labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    fmt_ = "webm" if codec.startswith("libvpx") else "mp4"
    videos = []
    for lab in labels.tolist():
        fr = synth_frames(rng, lab, num_frames, width, height, classes)
        data = encode_video(fr, codec=codec, gop=gop, fmt=fmt_)
        videos.append((data, lab, {"fps": 25, "num_frames": num_frames, "duration": num_frames / 25,
                                   "width": width, "height": height}))
    return write_video_split(out, split, videos, shard_size, ext="mp4" if fmt_ == "mp4" else "webm")


# -- benchmark -------------------------------------------------------------------------------------
def _versions() -> dict:
    import av
    v = {"python": platform.python_version(), "av": av.__version__,
         "ffmpeg": ".".join(map(str, av.library_versions.get("libavcodec", ())))}
    try:
        import nvidia.dali as dali
        v["dali"] = dali.__version__
    except Exception:
        v["dali"] = "n/a"
    try:
        import torch
        v["torch"] = torch.__version__
        v["cuda"] = torch.cuda.is_available()
        v["device_name"] = torch.cuda.get_device_name() if v["cuda"] else platform.processor() or "cpu"
    except Exception:
        v["cuda"] = False
        v["device_name"] = "cpu"
    return v


def _clip_frames(rng, num_frames: int, T: int = 16, stride: int = 2) -> np.ndarray:
    span = (T - 1) * stride
    s = int(rng.integers(0, max(1, num_frames - span)))
    return (s + np.arange(T) * stride) % num_frames


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(sizes=("64x64", "320x240"), videos: int = 16, frames: int = 48, gop: int = 16, threads: int = 2,
        repeats: int = 2, out: Path | None = RESULTS, seed: int = 0) -> list[dict]:
    from .video_decode import DaliVideoDecoder, pyav_decode
    ver = _versions()
    rows = []
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    for size in sizes:
        w, h = (int(x) for x in size.lower().split("x"))
        rng = np.random.default_rng(seed)
        raw = [synth_frames(rng, k % 4, frames, w, h) for k in range(videos)]
        enc = {"h264": [encode_video(f, "libx264", gop=gop) for f in raw],
               "vp9": [encode_video(f, "libvpx-vp9", gop=gop, fmt="webm") for f in raw]}
        all_frames = [np.arange(frames)] * videos
        clip_frames = [_clip_frames(np.random.default_rng([seed, k]), frames) for k in range(videos)]
        for codec, datas in enc.items():
            for mode, want in (("full", all_frames), ("clip", clip_frames)):
                n_out = sum(len(x) for x in want)
                for nt in sorted({1, threads}):
                    def pyav_run():
                        with ThreadPoolExecutor(nt) as ex:
                            list(ex.map(lambda a: pyav_decode(a[0], a[1]), zip(datas, want)))
                    t = _time(pyav_run, repeats)
                    rows.append(dict(decoder="pyav", device="cpu", codec=codec, size=size, mode=mode, threads=nt,
                                     videos=videos, frames_per_video=frames, frames_out=n_out, seconds=t,
                                     frames_per_s=n_out / t, note=""))
                for dev in (["cpu", "cuda"] if ver.get("cuda") else ["cpu"]):
                    dec = DaliVideoDecoder(device=dev, num_threads=threads, max_batch=videos)
                    note = ""
                    try:
                        if dec.fallback is not None:
                            raise RuntimeError(dec.fallback)
                        reason = dec.unsupported_codec(datas[:1])
                        if reason:
                            raise RuntimeError(reason)
                        dec._run(datas, want)  # warm-up (pipeline build); raises if DALI cannot decode
                        t = _time(lambda: dec._run(datas, want), repeats)
                        fps = n_out / t
                    except Exception as e:
                        msg = str(e)
                        line = next((x for x in msg.splitlines() if "not supported" in x), msg.splitlines()[0])
                        t, fps, note = float("nan"), float("nan"), line.strip()[:160]
                    rows.append(dict(decoder="dali", device=dev, codec=codec, size=size, mode=mode, threads=threads,
                                     videos=videos, frames_per_video=frames, frames_out=n_out, seconds=t,
                                     frames_per_s=fps, note=note))
    for r in rows:
        r.update(date=date, host_cpus=os.cpu_count(), **{k: ver[k] for k in ("av", "ffmpeg", "dali", "torch", "python",
                                                                            "device_name")})
    _print(rows)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists()
        with open(out, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                wr.writeheader()
            wr.writerows(rows)
        print(f"appended {len(rows)} rows to {out}")
    return rows


def _print(rows: list[dict]) -> None:
    hdr = f"{'decoder':7} {'device':6} {'codec':5} {'size':8} {'mode':5} {'thr':>3} {'frames/s':>10}  note"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        fps = "n/a" if r["frames_per_s"] != r["frames_per_s"] else f"{r['frames_per_s']:,.0f}"
        print(f"{r['decoder']:7} {r['device']:6} {r['codec']:5} {r['size']:8} {r['mode']:5} {r['threads']:>3} "
              f"{fps:>10}  {r['note']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64x64,320x240", help="comma-separated WxH of the synthetic videos")
    p.add_argument("--videos", type=int, default=16, help="videos per size")
    p.add_argument("--frames", type=int, default=48, help="frames per video")
    p.add_argument("--gop", type=int, default=16, help="keyframe interval of the encoded videos")
    p.add_argument("--threads", type=int, default=2, help="decode threads (PyAV thread pool / DALI num_threads)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is kept")
    p.add_argument("--out", default=str(RESULTS), help="CSV to append to ('' for none)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run(tuple(s for s in a.sizes.split(",") if s), a.videos, a.frames, a.gop, a.threads, a.repeats,
        Path(a.out) if a.out else None, a.seed)


if __name__ == "__main__":
    sys.exit(main())

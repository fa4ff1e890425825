"""Video decode benchmark: decoded frames/s of PyAV vs DALI (CPU; GPU when CUDA is available).

    python -m pipeline.bench.video_decode                      # 64x64 and 320x240 H.264 (+ VP9 for DALI CPU)
    python -m pipeline.bench.video_decode --sizes 320x240 --videos 32 --frames 64 --repeats 3

Synthetic videos are made on the fly (`synth_frames`: moving shapes over a textured background, encoded
with PyAV, H.264 by default with a keyframe every `--gop` frames). Each decoder decodes every frame of
every video (`full`) and, separately, one 16-frame clip at stride 2 from a random start (`clip`: seek
to the keyframe before it, decode up to its last frame), as the clip loader does; frames/s counts
frames returned. PyAV runs with 1 and `--threads` threads over videos (a thread pool, PyAV releases
the GIL); DALI with `--threads` threads inside one pipeline. DALI 2.4's CPU video decoder does not
decode H.264 (VP8 / VP9 / MJPEG only), so its CPU rows use VP9 copies of the same videos, and the
PyAV rows on those VP9 copies are the like-for-like comparison. Rows are printed and appended to
pipeline/bench/results/video_decode.csv with device, versions and date. No assertions: numbers only.

The videos come from pipeline/synthetic/video_split.py (`synth_frames`, `encode_video`).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.bench import RESULTS as RESULTS_DIR
from pipeline.synthetic.video_split import encode_video, synth_frames
from pipeline.versions import versions

RESULTS = RESULTS_DIR / "video_decode.csv"


# -- benchmark -------------------------------------------------------------------------------------
def _versions() -> dict:
    import av
    import torch
    v = versions("av", "dali", "torch")
    v["ffmpeg"] = ".".join(map(str, av.library_versions.get("libavcodec", ())))
    v["cuda"] = torch.cuda.is_available()
    v["device_name"] = torch.cuda.get_device_name() if v["cuda"] else platform.processor() or "cpu"
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
    from pipeline.loaders.video_decode import DaliVideoDecoder, pyav_decode
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

"""Synthetic video splits written straight into the converted layout, for what tools/convert_video.py does
not write: VP9 / MJPEG splits (DALI's CPU decoder reads those, not H.264) and splits of any codec for the
decode benchmark (pipeline/bench/video_decode.py) and the clip-loader tests.

`synth_frames` (a shape moving in its class's direction over a textured background), `encode_video`
(PyAV, any codec), `write_video_split` (WebDataset shards + DALI index + a manifest with "kind": "video").
The converter's own synthetic sources (UCF101 / Kinetics trees) are in pipeline/synthetic/video.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from pipeline.convert.tar_writer import ShardWriter
from pipeline.format import layout as fmt

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

"""Synthetic class-structured video datasets (UCF101 or Kinetics layout) for demos, tests and benchmarks.

A class is a MOTION of the main object: class c moves it with motion c % 8 (right, left, down, up,
clockwise circle, counter-clockwise circle, grow, shrink) at speed tier c // 8. Everything else is
drawn per video and carries no class information: the object's shape (disc, square, triangle, ring)
and colour, its start position and size, the background (two-colour gradient, soft blobs, per-frame
sensor noise and brightness flicker) and 1-2 static distractor shapes. A single frame therefore does
not reveal the class (except that "grow" / "shrink" frames show the object at some size, which every
class also does); the motion over a clip does.

`class_cues` (make_ucf / make_kinetics / render_video; tools/make_synthetic_video.py --class-cues) picks
what identifies a class:
  "motion" (default): only the motion, as above.
  "shape+motion": class c also fixes the object's shape, CLASS_SHAPES[c % 8] (8 shapes, one per motion),
      and the object is drawn 1.5x larger so that the shape survives 32-pixel crops; colours, position,
      size, background, distractors and noise stay per-video nuisance. Like real video sets (UCF101 is
      largely solvable from appearance), a class then has a consistent structure that survives CVRL's
      crops, flips and colour jitter, whereas with "motion" alone a horizontal flip maps MoveRight <->
      MoveLeft and clockwise <-> counter-clockwise. Every video's random draws are unchanged (the
      per-video shape is still drawn, then replaced), so only the object's shape and size differ.
      Note: short CVRL runs on this option were NOT found to beat a random-init encoder on kNN (the
      per-video background layout still solves instance discrimination); see tests/test_video_train.py.
  "easy": a set that a short CVRL run on a CPU learns (tests/test_video_train.py's learning test: 1000
      steps with mocov2's weaker colour jitter; CVRL's own 0.8 jitter did not learn it in CPU minutes).
      Class c fixes the object's shape, CLASS_SHAPES[c % 8], AND a texture on it (EASY_TEXTURES[c % 5],
      pipeline/synthetic/images.py's `texture_pattern`, in object coordinates, frequency EASY_TEXTURE_FREQ + speed
      tier: a colour-invariant pattern that survives crops, as in that tool's --easy image set); the
      object is EASY_SCALE x larger (radius at most EASY_MAX_R of the side) and moves with motion c % 8 as
      above; the background is ONE plain colour per video: no gradient, blobs, distractors or flicker, so
      no background layout identifies a video across its clips. Object colours (a texture colour pair),
      position, size, motion phase and noise stay per-video nuisance. Different random draws from the
      other options (its own renderer); "motion" and "shape+motion" are unchanged.

Deterministic for a seed: every video has its own generator seeded by (seed, split, class, n), and the
encoders run single-threaded.

Encoding uses PyAV (the `av` wheel bundles FFmpeg with libx264): `.mp4` files are H.264 (yuv420p,
keyframe every 16 frames, B-frames on), `.avi` files MPEG-4 Part 2 like the UCF101 release (Xvid).

UCF101 layout:      SRC/<Class>/v_<Class>_gXX_cYY.avi  + SRC/ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt
Kinetics layout:    SRC/{train,val}.csv (label,youtube_id,time_start,time_end,split)
                    + SRC/{train,val}/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4

`with_bad_files` adds a zoo of inputs the converter must report or repair (see BAD_ZOO).
"""

from __future__ import annotations

import csv
import io
import re
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.synthetic.images import TEXTURES, texture_pattern  # the image set's --easy textures

MOTIONS = ("MoveRight", "MoveLeft", "MoveDown", "MoveUp", "CircleClockwise", "CircleCounterclockwise",
           "Grow", "Shrink")
SHAPES = ("disc", "square", "triangle", "ring")
CLASS_SHAPES = ("disc", "square", "triangle", "ring", "cross", "hbar", "vbar", "frame")  # class_cues "shape+motion"
CLASS_CUES = ("motion", "shape+motion", "easy")
EASY_TEXTURES = ("stripes", "checker", "dots", "waves", "rings")  # class_cues "easy": texture c % 5
EASY_TEXTURE_FREQ = 2.0  # class_cues "easy": texture frequency (pipeline/synthetic/images.py's units), +1 per speed tier
EASY_SCALE, EASY_MAX_R = 3.2, 0.45  # class_cues "easy": object radius x EASY_SCALE, at most EASY_MAX_R of the side
LIST_DIR = "ucfTrainTestlist"
CLIPS_PER_GROUP = 2  # UCF101: clips cYY of one group gXX come from the same long video
TEST_GROUP_EVERY = 4  # group g is in testlist01 when g % 4 == 1 (about a quarter of the videos)

# The bad-input zoo: (name, extension, expected outcome with default converter arguments).
#   bad       -> bad_files.jsonl
#   converted -> becomes a good sample (re-encoded)
#   huge      -> bad without --max-side ("too large"), a downscaled good sample with it
BAD_ZOO = (
    ("zero_bytes", "avi", "bad"),
    ("truncated", "mp4", "bad"),          # first half of an MP4 whose moov atom is at the end
    ("truncated_tail", "avi", "bad"),     # last 10% cut: the header announces more frames than decode
    ("not_a_video", "mp4", "bad"),        # a text file named .mp4
    ("header_only", "avi", "bad"),        # a video stream with zero frames
    ("audio_only", "mp4", "bad"),         # AAC, no video stream
    ("variable_fps", "mp4", "converted"),  # H.264 with irregular frame durations: re-encoded at constant fps
    ("yuv444", "mp4", "converted"),       # H.264 High 4:4:4: re-encoded to yuv420p
    ("odd_size", "avi", "converted"),     # 65 x 49: re-encoded to even dimensions
    ("huge", "mp4", "huge"),              # 4000 x 3000
)
HUGE_SIZE = (4000, 3000)


def class_name(c: int) -> str:
    """UCF-style CamelCase class name of class c."""
    tier = c // len(MOTIONS)
    return MOTIONS[c % len(MOTIONS)] + (f"Fast{tier}" if tier else "")


def kinetics_label(c: int) -> str:
    """Kinetics-style label (lower case words with spaces) of class c."""
    return re.sub(r"(?<!^)(?=[A-Z0-9])", " ", class_name(c)).lower()


# ---------------------------------------------------------------------------------------- rendering

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


def _mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float, px: float) -> np.ndarray:
    """Anti-aliased mask (0..1) of a shape of radius r centred at (cx, cy); px = one pixel in these units."""
    u, v = x - cx, y - cy
    if shape == "disc":
        d = np.hypot(u, v) - r
    elif shape == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - 0.85 * r
    elif shape == "triangle":
        d = np.maximum(np.abs(u) * 1.732 + v - r, -v - 0.8 * r) * 0.5
    elif shape == "ring":
        d = np.abs(np.hypot(u, v) - 0.75 * r) - 0.3 * r
    elif shape == "cross":
        au, av = np.abs(u), np.abs(v)
        d = np.minimum(np.maximum(au - r, av - 0.3 * r), np.maximum(au - 0.3 * r, av - r))
    elif shape == "hbar":
        d = np.maximum(np.abs(u) - r, np.abs(v) - 0.4 * r)
    elif shape == "vbar":
        d = np.maximum(np.abs(u) - 0.4 * r, np.abs(v) - r)
    elif shape == "frame":
        d = np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.7 * r) - 0.22 * r
    else:
        raise ValueError(shape)
    return np.clip(0.5 - d / px, 0, 1)


def trajectory(cls: int, rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cx, cy, r) of the main object for each frame, in units of the frame side, for class `cls`."""
    motion = MOTIONS[cls % len(MOTIONS)]
    speed = 1.0 + 0.5 * (cls // len(MOTIONS))
    p = np.linspace(0, 1, frames, dtype=np.float64)
    r = np.full(frames, rng.uniform(0.08, 0.13))
    wobble = 0.02 * np.sin(2 * np.pi * (p * rng.uniform(0.5, 1.5) + rng.uniform()))
    if motion.startswith("Move"):
        dist = min(0.75, 0.4 * speed) * rng.uniform(0.85, 1.0)
        a = rng.uniform(0.12, 0.88 - dist)  # start along the motion axis
        b = rng.uniform(0.2, 0.8)  # position across it
        along = a + dist * p
        if motion in ("MoveLeft", "MoveUp"):
            along = 1 - along
        cross = b + wobble
        cx, cy = (along, cross) if motion in ("MoveRight", "MoveLeft") else (cross, along)
    elif motion.startswith("Circle"):
        sign = 1 if motion == "CircleClockwise" else -1  # image y points down: +angle is clockwise on screen
        rad = rng.uniform(0.18, 0.26)
        c0x, c0y = rng.uniform(0.4, 0.6, size=2)
        th = rng.uniform(0, 2 * np.pi) + sign * 2 * np.pi * 0.8 * speed * p
        cx, cy = c0x + rad * np.cos(th), c0y + rad * np.sin(th)
    else:  # Grow / Shrink
        r0, r1 = rng.uniform(0.05, 0.08), min(0.4, rng.uniform(0.2, 0.28) * speed)
        r = r0 + (r1 - r0) * p if motion == "Grow" else r1 + (r0 - r1) * p
        cx, cy = rng.uniform(0.35, 0.65, size=2)
        cx, cy = cx + wobble, cy + wobble[::-1]
    return np.asarray(cx, np.float64), np.asarray(cy, np.float64), np.asarray(r, np.float64)


def _trajectory_at(cls: int, rng: np.random.Generator, frames: int, times: np.ndarray | None):
    """trajectory() at `frames` even instants, or at `times` (0..1) interpolated from a dense one."""
    if times is None:
        return trajectory(cls, rng, frames)
    dense = 1024
    grid = np.linspace(0, 1, dense)
    return tuple(np.interp(times, grid, a) for a in trajectory(cls, rng, dense))


def render_video(cls: int, rng: np.random.Generator, frames: int = 32, size: int | tuple[int, int] = 64,
                 times: np.ndarray | None = None, class_cues: str = "motion") -> np.ndarray:
    """frames x H x W x 3 uint8 of class `cls`. `times` (0..1 per frame) samples the motion at irregular
    instants (for variable-frame-rate videos); default: evenly. `class_cues`: see the module docstring."""
    if class_cues not in CLASS_CUES:
        raise ValueError(f"class_cues {class_cues!r}: choose from {CLASS_CUES}")
    if class_cues == "easy":
        return _render_easy(cls, rng, frames, size, times)
    w, h = (size, size) if isinstance(size, int) else size
    side = max(w, h)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = (x + 0.5) / side, (y + 0.5) / side
    px = 1.0 / side
    c1 = _hsv(rng.uniform(), rng.uniform(0.1, 0.7), rng.uniform(0.25, 0.9))
    c2 = _hsv(rng.uniform(), rng.uniform(0.1, 0.7), rng.uniform(0.25, 0.9))
    th = rng.uniform(0, 2 * np.pi)
    g = np.clip((np.cos(th) * x + np.sin(th) * y) * 1.2 + 0.2, 0, 1)[..., None]
    bg = c1 * (1 - g) + c2 * g
    for _ in range(int(rng.integers(2, 5))):
        bx, by, br = rng.uniform(0, w / side), rng.uniform(0, h / side), rng.uniform(0.05, 0.2)
        blob = np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * br ** 2))[..., None]
        bg = bg * (1 - 0.5 * blob) + 0.5 * blob * _hsv(rng.uniform(), rng.uniform(), rng.uniform(0.2, 1))
    for _ in range(int(rng.integers(1, 3))):  # static distractors
        m = _mask(SHAPES[rng.integers(len(SHAPES))], x, y, rng.uniform(0.1, 0.9) * w / side,
                  rng.uniform(0.1, 0.9) * h / side, rng.uniform(0.05, 0.1), px)[..., None]
        bg = bg * (1 - m) + m * _hsv(rng.uniform(), rng.uniform(0.3, 1), rng.uniform(0.3, 1))
    shape = SHAPES[rng.integers(len(SHAPES))]
    if class_cues == "shape+motion":
        shape = CLASS_SHAPES[cls % len(CLASS_SHAPES)]
    hue = rng.uniform()
    fg, fg2 = _hsv(hue, rng.uniform(0.5, 1), rng.uniform(0.7, 1)), _hsv((hue + 0.5) % 1, 0.6, 0.4)
    cx, cy, r = _trajectory_at(cls, rng, frames, times)
    if class_cues == "shape+motion":
        r = r * 1.5
    cx, cy = cx * w / side, cy * h / side
    noise = rng.uniform(0.01, 0.04)
    flicker = 1 + rng.uniform(0, 0.06) * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * np.arange(frames))
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        m = _mask(shape, x, y, cx[t], cy[t], r[t], px)[..., None]
        shade = 0.8 + 0.2 * np.clip(1 - ((x - cx[t]) + (y - cy[t])) / max(r[t], 1e-3), 0, 2)[..., None] / 2
        img = (bg * (1 - m) + m * (fg * shade * 0.85 + fg2 * 0.15)) * flicker[t]
        img = img + rng.normal(0, noise, img.shape).astype(np.float32)
        out[t] = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out


def _render_easy(cls: int, rng: np.random.Generator, frames: int, size: int | tuple[int, int],
                 times: np.ndarray | None) -> np.ndarray:
    """render_video for class_cues "easy" (see the module docstring)."""
    w, h = (size, size) if isinstance(size, int) else size
    side = max(w, h)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = (x + 0.5) / side, (y + 0.5) / side
    px = 1.0 / side
    shape = CLASS_SHAPES[cls % len(CLASS_SHAPES)]
    texture = EASY_TEXTURES[cls % len(EASY_TEXTURES)]
    assert texture in TEXTURES
    freq = EASY_TEXTURE_FREQ + 1.0 * (cls // len(CLASS_SHAPES))
    bg = _hsv(rng.uniform(), rng.uniform(0.1, 0.8), rng.uniform(0.2, 0.9))  # one plain colour per video
    hue = rng.uniform()
    fg1 = _hsv(hue, rng.uniform(0.5, 1), rng.uniform(0.7, 1))
    fg2 = _hsv((hue + rng.uniform(0.3, 0.7)) % 1, rng.uniform(0.3, 1), rng.uniform(0.05, 0.5))
    cx, cy, r = _trajectory_at(cls, rng, frames, times)
    r = np.minimum(r * EASY_SCALE, EASY_MAX_R)
    cx, cy = cx * w / side, cy * h / side
    noise = rng.uniform(0.005, 0.03)
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        u, v = (x - cx[t]) / r[t], (y - cy[t]) / r[t]
        m = _mask(shape, x, y, cx[t], cy[t], r[t], px)[..., None]
        tex = texture_pattern(texture, u, v, freq)[..., None]
        shade = 0.75 + 0.25 * np.clip(1 - (u + v) * 0.3, 0, 1)[..., None]
        img = bg * (1 - m) + m * (fg1 * tex + fg2 * (1 - tex)) * shade
        img = img + rng.normal(0, noise, img.shape).astype(np.float32)
        out[t] = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------- encoding

def encode_video(frames: np.ndarray, fps: int, container: str, pts: list[int] | None = None,
                 pix_fmt: str = "yuv420p", gop: int = 16) -> bytes:
    """Encode uint8 frames (T x H x W x 3) with PyAV: container 'mp4' -> H.264, 'avi' -> MPEG-4 Part 2.
    Single-threaded encoders: the same frames give the same bytes. `pts` gives each frame its own
    timestamp in frame periods (1/fps), with gaps for a variable frame rate."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as oc:
        if container == "mp4":
            from pipeline.convert.video_codec import x264_asm_param  # no AVX-512 code: see there
            s = oc.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "20", "g": str(gop),
                                                            "x264-params": "threads=1" + x264_asm_param()})
        elif container == "avi":
            s = oc.add_stream("mpeg4", rate=fps, options={"g": str(gop), "qscale": "4"})
            s.codec_context.qscale = 4
        else:
            raise ValueError(container)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = pix_fmt
        s.codec_context.thread_count = 1
        s.codec_context.thread_type = "SLICE"
        for i, arr in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            if pts is not None:
                f.pts = int(pts[i])
                f.time_base = Fraction(1, fps)
            for p in s.encode(f):
                oc.mux(p)
        for p in s.encode():
            oc.mux(p)
    return buf.getvalue()


def _header_only_avi(size: int, fps: int) -> bytes:
    """An AVI with a video stream and no frames."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as oc:
        s = oc.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        oc.start_encoding()
    return buf.getvalue()


def _audio_only_mp4() -> bytes:
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as oc:
        s = oc.add_stream("aac", rate=16000)
        s.codec_context.layout = "mono"
        t = np.arange(16000, dtype=np.float32) / 16000
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for i in range(0, 16000 - 1023, 1024):
            fr = av.AudioFrame.from_ndarray(wave[None, i:i + 1024], format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, i
            for p in s.encode(fr):
                oc.mux(p)
        for p in s.encode():
            oc.mux(p)
    return buf.getvalue()


def bad_zoo_bytes(seed: int, frames: int, size: int, fps: int) -> dict[str, bytes]:
    """{name: file bytes} for every entry of BAD_ZOO (class 0 content where there is content)."""
    rng = np.random.default_rng([seed, 99])
    good = render_video(0, rng, frames, size)
    mp4 = encode_video(good, fps, "mp4")
    avi = encode_video(good, fps, "avi")
    n = max(frames, 24)
    gaps = np.where(np.arange(n - 1) % 4 == 3, 3, 1)  # every 4th interval three frame periods long
    pts = np.concatenate([[0], np.cumsum(gaps)])
    vfr = render_video(0, rng, n, size, times=pts / pts[-1])
    out = {
        "zero_bytes": b"",
        "truncated": mp4[: len(mp4) // 2],
        "truncated_tail": avi[: int(len(avi) * 0.9)],
        "not_a_video": b"This is a text file, not a video.\n" * 20,
        "header_only": _header_only_avi(size, fps),
        "audio_only": _audio_only_mp4(),
        "variable_fps": encode_video(vfr, fps, "mp4", pts=pts.tolist()),
        "yuv444": encode_video(render_video(0, rng, frames, size), fps, "mp4", pix_fmt="yuv444p"),
        "odd_size": encode_video(render_video(0, rng, frames, (size + 1, size * 3 // 4 + 1)), fps, "avi"),
        "huge": encode_video(render_video(0, rng, 2, (64, 48))[:, np.arange(HUGE_SIZE[1]) * 48 // HUGE_SIZE[1]][
            :, :, np.arange(HUGE_SIZE[0]) * 64 // HUGE_SIZE[0]], fps, "mp4"),
    }
    assert set(out) == {z[0] for z in BAD_ZOO}
    return out


# ------------------------------------------------------------------------------------------ layouts

def _container_for(container: str, n: int) -> str:
    if container == "mix":
        return "avi" if n % 2 == 0 else "mp4"
    return container


def make_ucf(out: Path, classes: int, per_class: int, frames: int = 32, size: int = 64, fps: int = 16,
             seed: int = 0, container: str = "avi", with_bad_files: bool = False,
             progress: bool = False, class_cues: str = "motion") -> dict[str, str]:
    """Write a UCF101-layout tree. Returns {relative path: kind} of the bad-file zoo (empty without it)."""
    from tqdm import tqdm
    out = Path(out)
    (out / LIST_DIR).mkdir(parents=True, exist_ok=True)
    train, test = [], []
    jobs = []
    for c in range(classes):
        name = class_name(c)
        (out / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            g, k = n // CLIPS_PER_GROUP + 1, n % CLIPS_PER_GROUP + 1
            cont = _container_for(container, n)
            rel = f"{name}/v_{name}_g{g:02d}_c{k:02d}.{cont}"
            jobs.append((c, n, cont, rel))
            (test.append(rel) if g % TEST_GROUP_EVERY == 1 else train.append(f"{rel} {c + 1}"))
    for c, n, cont, rel in tqdm(jobs, desc="synthetic videos", unit="video", disable=not progress):
        rng = np.random.default_rng([seed, 0, c, n])
        (out / rel).write_bytes(encode_video(render_video(c, rng, frames, size, class_cues=class_cues), fps, cont))
    zoo: dict[str, str] = {}
    if with_bad_files:
        data = bad_zoo_bytes(seed, frames, size, fps)
        for i, (zname, ext, kind) in enumerate(BAD_ZOO):
            c = 0 if classes == 1 else i % 2  # spread over the first two classes
            cname = class_name(c)
            rel = f"{cname}/v_{cname}_{zname}.{ext}"
            (out / rel).write_bytes(data[zname])
            zoo[rel] = kind
            train.append(f"{rel} {c + 1}")
        (out / class_name(0) / "README.txt").write_text("not a video: ignored when no split file is given\n")
        zoo[f"{class_name(0)}/README.txt"] = "ignored"
    (out / LIST_DIR / "classInd.txt").write_text("".join(f"{c + 1} {class_name(c)}\r\n" for c in range(classes)))
    (out / LIST_DIR / "trainlist01.txt").write_text("".join(f"{line}\r\n" for line in train))
    (out / LIST_DIR / "testlist01.txt").write_text("".join(f"{line}\r\n" for line in test))
    return zoo


def _youtube_id(rng: np.random.Generator) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), 11))


def make_kinetics(out: Path, classes: int, per_class: int, val_per_class: int | None = None, frames: int = 32,
                  size: int = 64, fps: int = 16, seed: int = 0, with_bad_files: bool = False,
                  progress: bool = False, class_cues: str = "motion") -> dict[str, str]:
    """Write a Kinetics-layout tree (train.csv, val.csv, train/<label>/, val/<label>/; H.264 MP4s).
    Returns {relative path: kind} of the bad-file zoo; a row whose file is missing has kind 'missing'."""
    from tqdm import tqdm
    out = Path(out)
    if val_per_class is None:
        val_per_class = max(1, per_class // 4)
    zoo: dict[str, str] = {}
    jobs, rows = [], {"train": [], "val": []}
    for split, count, sid in (("train", per_class, 0), ("val", val_per_class, 1)):
        for c in range(classes):
            label = kinetics_label(c)
            (out / split / label).mkdir(parents=True, exist_ok=True)
            for n in range(count):
                rng = np.random.default_rng([seed, sid, c, n])
                yid, start = _youtube_id(rng), int(rng.integers(0, 300))
                rows[split].append((label, yid, start, start + 10, split))
                jobs.append((rng, c, f"{split}/{label}/{yid}_{start:06d}_{start + 10:06d}.mp4"))
    for rng, c, rel in tqdm(jobs, desc="synthetic videos", unit="video", disable=not progress):
        (out / rel).write_bytes(encode_video(render_video(c, rng, frames, size, class_cues=class_cues), fps, "mp4"))
    if with_bad_files:
        data = bad_zoo_bytes(seed, frames, size, fps)
        label = kinetics_label(0)
        for i, (zname, ext, kind) in enumerate(BAD_ZOO):
            yid = f"z{i:02d}{zname}"[:11].ljust(11, "_")
            rel = f"train/{label}/{yid}_{i:06d}_{i + 10:06d}.{ext}"
            (out / rel).write_bytes(data[zname])
            rows["train"].append((label, yid, i, i + 10, "train"))
            zoo[rel] = kind
        rows["train"].append((label, "missingfile", 0, 10, "train"))
        zoo[f"train/{label}/missingfile_000000_000010.mp4"] = "missing"
    for split, rs in rows.items():
        with open(out / f"{split}.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            wr.writerows(sorted(rs))
    return zoo

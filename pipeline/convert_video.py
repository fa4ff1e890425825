"""Video dataset conversion engine behind tools/convert_video.py.

scan (UCF101 or Kinetics layout) -> order -> probe / validate / re-encode (parallel) -> shards (+ DALI index)
-> manifest. The output has the image format's shape (pipeline/dataset_format.py): `<split>-NNNNNN.tar`
+ `.idx`, sample key = zero-padded global index, `manifest.json`, `bad_files.jsonl`; a sample's members
are VIDEO_MEMBER_EXTS: `.mp4` (H.264 in MP4), `.cls`, `.json`, `.label.i64`, `.index.i64`.

What is stored for each input (normalize_video):
  * an MP4 (ISO base media file, not QuickTime) holding constant-frame-rate H.264 yuv420p whose keyframe
    interval is at most --max-gop frames and that fits --max-side: its bytes, untouched (--reencode auto);
  * anything else that decodes: re-encoded with libx264 (CRF --crf, preset --preset, one thread, no
    B-frames, an IDR frame exactly every --keyint frames), downscaled to --max-side when asked, to even
    dimensions, at a constant frame rate. Audio is dropped when re-encoding (kept in pass-through);
  * a variable-frame-rate source is re-encoded at a constant rate (FFmpeg's fps filter rule: each source
    frame goes to the output slot nearest its timestamp; empty slots repeat the previous frame, a frame
    whose slot is taken by a later one is dropped);
  * a source larger than --max-pixels is refused unless --max-side brings it under the limit.
Every video is demuxed and fully decoded in the worker; `num_frames` is what decodes (pass-through) or
what was encoded (re-encode).

Order, global index, resume, refusal of a changed argument set: as in pipeline/convert.py (candidates
in (class, path) order permuted once by --seed; `.progress.json` after every shard; byte-identical
after a kill -9 and a rerun; independent of --workers). Re-encoding is deterministic: libx264 and the
scaler run single-threaded.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import shutil
import sys
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import dataset_format as fmt
from .atomic import atomic_open, atomic_write_json, remove_partials
from .convert import PROGRESS, ConversionError, _check_same_run, _load_progress, _pool_context, _reason_kind
from .wds_writer import ShardWriter

VIDEO_EXTS = {".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".flv", ".3gp", ".ogv", ".wmv"}
LAYOUTS = ("ucf", "kinetics")
REENCODE = ("auto", "always", "never")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
DEFAULT_MAX_PIXELS = 4096 * 2160  # DCI 4K
HARD_MAX_SIDE = 16384  # refused whatever the arguments (libavcodec's own limit for most codecs)
UCF_LIST_DIR = "ucfTrainTestlist"
MOV_FAMILY = "mov,mp4,m4a,3gp,3g2,mj2"


@dataclass(kw_only=True)
class VideoConvertConfig:
    src: str
    out: str
    split: str = "train"
    split_file: str | None = None
    layout: str = "auto"
    workers: int = 0
    shard_size: int = 128
    max_side: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    reencode: str = "auto"
    keyint: int = 16
    max_gop: int = 64
    crf: int = 23
    preset: str = "veryfast"
    seed: int = 0
    strict: bool = False
    limit: int | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.layout not in ("auto",) + LAYOUTS:
            raise ConversionError(f"--layout must be auto, ucf or kinetics; got {self.layout}")
        if self.reencode not in REENCODE:
            raise ConversionError(f"--reencode must be auto, always or never; got {self.reencode}")
        if self.shard_size < 1:
            raise ConversionError("--shard-size must be >= 1")
        if self.max_side is not None and self.max_side < 16:
            raise ConversionError("--max-side must be >= 16 (or omitted to keep sizes)")
        if self.max_pixels < 256:
            raise ConversionError("--max-pixels must be >= 256")
        if self.keyint < 1 or self.max_gop < 1:
            raise ConversionError("--keyint and --max-gop must be >= 1")
        if not 0 <= self.crf <= 51:
            raise ConversionError("--crf must be in 0..51")
        if self.preset not in X264_PRESETS:
            raise ConversionError(f"--preset must be one of {', '.join(X264_PRESETS)}")
        if self.limit is not None and self.limit < 1:
            raise ConversionError("--limit must be >= 1")
        if not self.split or "/" in self.split:
            raise ConversionError("--split must be a plain name such as train or val")
        if self.workers <= 0:
            self.workers = os.cpu_count() or 1

    def output_args(self) -> dict:
        """The arguments that decide the output bytes (not workers, progress, overwrite)."""
        return {"src": str(Path(self.src).resolve()), "split": self.split,
                "split_file": str(Path(self.split_file).resolve()) if self.split_file else None,
                "layout": self.layout, "shard_size": self.shard_size, "max_side": self.max_side,
                "max_pixels": self.max_pixels, "reencode": self.reencode, "keyint": self.keyint,
                "max_gop": self.max_gop, "crf": self.crf, "preset": self.preset, "seed": self.seed,
                "strict": self.strict, "limit": self.limit}


@dataclass
class VideoScan:
    layout: str
    classes: list[str]
    candidates: list[tuple[str, int]]  # (path relative to src, label), in processing order
    bad: list[dict] = field(default_factory=list)  # found at scan time: listed but missing, unknown class
    ignored: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    fingerprint: str = ""


# ------------------------------------------------------------------------------------------ layouts

def _is_video_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTS


def _kinetics_csvs(src: Path, split: str) -> list[Path]:
    names = [split]
    if split in ("val", "valid", "validate", "validation"):
        names += ["val", "validate", "validation"]
    return [src / f"{n}.csv" for n in dict.fromkeys(names)]


def resolve_split_file(cfg: VideoConvertConfig) -> Path | None:
    if not cfg.split_file:
        return None
    p = Path(cfg.split_file)
    for cand in (p, Path(cfg.src) / UCF_LIST_DIR / p, Path(cfg.src) / p):
        if cand.is_file():
            return cand.resolve()
    raise ConversionError(f"--split-file {cfg.split_file} not found (looked as given, in "
                          f"{Path(cfg.src) / UCF_LIST_DIR} and in {cfg.src})")


def detect_layout(cfg: VideoConvertConfig) -> str:
    src = Path(cfg.src)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory: --src must be the dataset root (UCF101: "
                              f"SRC/<Class>/*.avi + SRC/{UCF_LIST_DIR}/; Kinetics: SRC/train.csv + SRC/train/<label>/)")
    if cfg.layout != "auto":
        return cfg.layout
    if cfg.split_file:
        return "kinetics" if str(cfg.split_file).lower().endswith(".csv") else "ucf"
    if any(p.is_file() for p in _kinetics_csvs(src, cfg.split)):
        return "kinetics"
    if (src / UCF_LIST_DIR).is_dir() or any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(src)):
        return "ucf"
    raise ConversionError(f"cannot tell the layout of {src}: no {cfg.split}.csv (Kinetics) and no class "
                          f"folders (UCF101); pass --layout")


class _DirIndex:
    """Case-insensitive lookup of names in folders (UCF101's lists spell some classes differently from
    their folders, e.g. HandstandPushups / HandStandPushups), cached per folder."""

    def __init__(self):
        self._cache: dict[Path, dict[str, str]] = {}

    def names(self, d: Path) -> dict[str, str]:
        if d not in self._cache:
            try:
                self._cache[d] = {n.lower(): n for n in sorted(os.listdir(d))}
            except OSError:
                self._cache[d] = {}
        return self._cache[d]

    def find(self, d: Path, name: str) -> str | None:
        if os.path.lexists(d / name):
            return name
        return self.names(d).get(name.lower())


def _read_class_ind(path: Path) -> list[str]:
    rows = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            rows.append((int(parts[0]), " ".join(parts[1:])))
    if not rows:
        raise ConversionError(f"{path} holds no '<number> <ClassName>' lines")
    return [name for _, name in sorted(rows)]


def _scan_ucf(cfg: VideoConvertConfig, split_file: Path | None):
    src = Path(cfg.src)
    folders = sorted(e.name for e in os.scandir(src)
                     if e.is_dir(follow_symlinks=True) and not e.name.startswith(".") and e.name != UCF_LIST_DIR)
    class_ind = None
    for p in ([split_file.parent / "classInd.txt"] if split_file else []) + [src / UCF_LIST_DIR / "classInd.txt",
                                                                            src / "classInd.txt"]:
        if p.is_file():
            class_ind = p
            break
    classes = _read_class_ind(class_ind) if class_ind else folders
    if not classes:
        raise ConversionError(f"{src} has no class folders")
    label_of = {c.lower(): i for i, c in enumerate(classes)}
    folder_of = {f.lower(): f for f in folders}
    per_class: list[list[str]] = [[] for _ in classes]
    bad, ignored = [], []
    dirs = _DirIndex()
    if split_file is not None:
        seen = set()
        for raw in split_file.read_text(encoding="utf-8-sig").splitlines():
            line = raw.strip().replace("\\", "/")
            if not line:
                continue
            parts = line.rsplit(None, 1)
            rel = parts[0] if len(parts) == 2 and parts[1].lstrip("-").isdigit() else line
            if rel in seen:
                continue
            seen.add(rel)
            cls, _, name = rel.partition("/")
            if not name:
                bad.append({"path": rel, "reason": f"no class folder in the {split_file.name} entry"})
                continue
            label = label_of.get(cls.lower())
            if label is None:
                where = class_ind.name if class_ind else "the class folders"
                bad.append({"path": rel, "reason": f"unknown class {cls!r} (not in {where})"})
                continue
            folder = folder_of.get(cls.lower(), cls)
            found = dirs.find(src / folder, name)
            if found is None:
                bad.append({"path": rel, "reason": "missing"})
                continue
            per_class[label].append(f"{folder}/{found}")
    else:
        for label, c in enumerate(classes):
            folder = folder_of.get(c.lower())
            if folder is None:
                continue
            for e in sorted(os.scandir(src / folder), key=lambda e: e.name):
                rel = f"{folder}/{e.name}"
                if e.name.startswith("."):
                    ignored.append(rel)
                elif e.is_dir(follow_symlinks=False):
                    ignored.append(rel + "/")
                elif _is_video_name(e.name):
                    per_class[label].append(rel)  # broken symlinks included: processing reports them
                else:
                    ignored.append(rel)
        ignored += [f + "/" for f in folders if f.lower() not in label_of]
    return classes, per_class, bad, ignored


def _scan_kinetics(cfg: VideoConvertConfig, split_file: Path | None):
    src = Path(cfg.src)
    csv_path = split_file
    if csv_path is None:
        found = [p for p in _kinetics_csvs(src, cfg.split) if p.is_file()]
        if not found:
            raise ConversionError(f"no {' / '.join(p.name for p in _kinetics_csvs(src, cfg.split))} in {src} "
                                  f"(Kinetics layout); pass --split-file")
        csv_path = found[0]

    def rows_of(p: Path) -> list[dict]:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        need = {"label", "youtube_id", "time_start", "time_end"}
        if rows and not need <= set(rows[0]):
            raise ConversionError(f"{p} lacks the columns {', '.join(sorted(need - set(rows[0])))} "
                                  f"(Kinetics CSV: label,youtube_id,time_start,time_end,split)")
        return rows

    rows = rows_of(csv_path)
    train_csv = src / "train.csv"
    class_rows = rows_of(train_csv) if train_csv.is_file() else rows
    classes = sorted({r["label"] for r in class_rows})
    if not classes:
        raise ConversionError(f"{csv_path} has no rows")
    label_of = {c: i for i, c in enumerate(classes)}
    bases = [d for d in dict.fromkeys([cfg.split, csv_path.stem, ""]) if (src / d).is_dir()]
    per_class: list[list[str]] = [[] for _ in classes]
    bad, seen = [], set()
    dirs = _DirIndex()
    for r in rows:
        label, yid = r["label"], r["youtube_id"]
        try:
            stem = f"{yid}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        except ValueError:
            stem = yid
        if stem in seen:
            continue
        seen.add(stem)
        rel = None
        for base in bases:
            for folder in dict.fromkeys([label, label.replace(" ", "_")]):
                d = src / base / folder
                names = dirs.names(d)
                for s in (stem, yid):
                    for ext in sorted(VIDEO_EXTS):
                        hit = names.get((s + ext).lower())
                        if hit is not None:
                            rel = str(Path(base) / folder / hit)
                            break
                    if rel:
                        break
                if rel:
                    break
            if rel:
                break
        expected = rel or str(Path(bases[0] if bases else cfg.split) / label / f"{stem}.mp4")
        if label not in label_of:
            bad.append({"path": expected, "reason": f"unknown class {label!r} (not in {train_csv.name})"})
        elif rel is None:
            bad.append({"path": expected, "reason": "missing"})
        else:
            per_class[label_of[label]].append(rel)
    return classes, [sorted(p) for p in per_class], bad, []


def scan(cfg: VideoConvertConfig) -> VideoScan:
    """List the samples of cfg.split (cfg.layout must be resolved)."""
    split_file = resolve_split_file(cfg)
    if cfg.layout == "ucf":
        classes, per_class, bad, ignored = _scan_ucf(cfg, split_file)
    else:
        classes, per_class, bad, ignored = _scan_kinetics(cfg, split_file)
    empty = [c for c, files in zip(classes, per_class) if not files]
    if cfg.limit:
        per_class = [files[:cfg.limit] for files in per_class]
    ordered = [(rel, label) for label, files in enumerate(per_class) for rel in sorted(files)]
    perm = np.random.default_rng(cfg.seed).permutation(len(ordered))
    candidates = [ordered[i] for i in perm]
    src = Path(cfg.src)
    h = hashlib.sha256()
    h.update(json.dumps([cfg.layout, classes, bad]).encode())
    if split_file is not None:
        h.update(hashlib.sha256(split_file.read_bytes()).digest())
    for rel, label in candidates:
        try:
            st = os.stat(src / rel)
            sig = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            sig = "missing"
        h.update(f"{rel}\t{label}\t{sig}\n".encode("utf-8", "surrogateescape"))
    return VideoScan(cfg.layout, classes, candidates, bad, sorted(ignored), empty, h.hexdigest())


# ------------------------------------------------------------------------------------ video handling

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


def _process(job):
    """Worker entry: (ok, payload) and never raises."""
    path, opts = job
    try:
        v = normalize_video(path, opts)
        return True, (v.mp4, str(v.fps), v.num_frames, v.width, v.height, v.keyint, v.action)
    except BadVideo as e:
        return False, str(e)
    except Exception as e:  # a decoder / encoder bug must not cost the rest of the dataset
        return False, f"unexpected {type(e).__name__}: {e}"


def _results(jobs, pool, window: int):
    """Results in job order, at most `window` in flight."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(_process, job) if pool is not None else _process(job))
        while pending and (len(pending) > window or not isinstance(pending[0], Future) or pending[0].done()):
            head = pending.popleft()
            yield head.result() if isinstance(head, Future) else head
    while pending:
        head = pending.popleft()
        yield head.result() if isinstance(head, Future) else head


# -------------------------------------------------------------------------------------------- state

@dataclass
class VideoProgress:
    args: dict
    fingerprint: str
    next_candidate: int = 0
    next_index: int = 0
    shards: list = field(default_factory=list)  # [{tar, idx, first_index, num_samples, sha256, idx_sha256, bytes}]
    bad: list = field(default_factory=list)  # [{path, reason}]
    actions: dict = field(default_factory=dict)
    class_counts: list = field(default_factory=list)
    total_frames: int = 0


def _source(cfg: VideoConvertConfig) -> str:
    return f"the source videos of split {cfg.split} under {cfg.src}"


# --------------------------------------------------------------------------------------------- main

def convert_video(cfg: VideoConvertConfig) -> dict:
    """Run (or resume) a video conversion; returns the manifest."""
    cfg = replace(cfg, layout=detect_layout(cfg))
    if cfg.split_file:  # recorded as the file found, so a rerun from another directory still matches
        cfg = replace(cfg, split_file=str(resolve_split_file(cfg)))
    out_split = Path(cfg.out) / cfg.split
    if cfg.overwrite and out_split.exists():
        shutil.rmtree(out_split)
    out_split.mkdir(parents=True, exist_ok=True)
    remove_partials(out_split)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if cfg.progress else (lambda *a: None)

    sc = scan(cfg)
    manifest_path = out_split / fmt.MANIFEST
    if manifest_path.is_file():
        with open(manifest_path) as f:
            manifest = json.load(f)
        _check_same_run(cfg, manifest["arguments"], manifest.get("source_fingerprint"), sc.fingerprint, out_split,
                        _source(cfg))
        log(f"[convert_video] {out_split} is already complete ({manifest['num_samples']} samples); nothing to do")
        return manifest

    prog = _load_progress(out_split, VideoProgress)
    if prog is None:
        if any(out_split.iterdir()):
            raise ConversionError(f"{out_split} is not empty and holds no conversion state; choose an empty "
                                  f"--out or pass --overwrite")
        prog = VideoProgress(args=cfg.output_args(), fingerprint=sc.fingerprint, bad=list(sc.bad),
                             class_counts=[0] * len(sc.classes))
        if cfg.strict and sc.bad:
            raise ConversionError(f"--strict: {sc.bad[0]['path']}: {sc.bad[0]['reason']}")
        atomic_write_json(out_split / PROGRESS, asdict(prog), indent=None)
    else:
        _check_same_run(cfg, prog.args, prog.fingerprint, sc.fingerprint, out_split, _source(cfg))
        if prog.next_candidate:
            log(f"[convert_video] resuming {out_split}: {len(prog.shards)} shards, {prog.next_index} samples done")
    _write_shards(cfg, sc, prog, out_split)
    return _finish(cfg, sc, prog, out_split)


def _write_shards(cfg: VideoConvertConfig, sc: VideoScan, prog: VideoProgress, out_split: Path) -> None:
    src = Path(cfg.src)
    start = prog.next_candidate
    opts = VideoOptions(max_side=cfg.max_side, max_pixels=cfg.max_pixels, reencode=cfg.reencode,
                        keyint=cfg.keyint, max_gop=cfg.max_gop, crf=cfg.crf, preset=cfg.preset)
    jobs = ((str(src / rel), opts) for rel, _ in sc.candidates[start:])
    pool = None
    if cfg.workers > 1 and start < len(sc.candidates):
        pool = ProcessPoolExecutor(cfg.workers, mp_context=_pool_context())
        pool.submit(int).result()  # start the workers now, before our own threads exist (fork safety)
    bar = tqdm(total=len(sc.candidates), initial=start, unit="video", desc=f"convert {cfg.split}",
               disable=not cfg.progress, dynamic_ncols=True, smoothing=0.05)
    writer = None
    pos = start
    pending_bad: list[dict] = []
    pending_actions: Counter = Counter()
    pending_counts: Counter = Counter()
    pending_frames = 0
    results = _results(jobs, pool, window=max(4, 2 * cfg.workers + 2))
    try:
        for ok, payload in results:
            rel, label = sc.candidates[pos]
            pos += 1
            bar.update(1)
            if not ok:
                if cfg.strict:
                    raise ConversionError(f"--strict: {rel}: {payload}")
                pending_bad.append({"path": rel, "reason": payload})
                bar.set_postfix(bad=len(prog.bad) + len(pending_bad), refresh=False)
            else:
                mp4, fps, num_frames, w, h, keyint, action = payload
                if writer is None:
                    k = len(prog.shards)
                    writer = ShardWriter(out_split / fmt.shard_name(cfg.split, k, "tar"),
                                         out_split / fmt.shard_name(cfg.split, k, "idx"))
                index = prog.next_index + writer.num_samples
                fps_f = Fraction(fps)
                meta = {"index": index, "label": label, "class": sc.classes[label], "source": rel,
                        "fps": round(float(fps_f), 6), "num_frames": num_frames,
                        "duration": round(num_frames / float(fps_f), 6), "width": w, "height": h,
                        "keyint": keyint}
                writer.add(fmt.sample_key(index), {
                    "mp4": mp4,
                    "cls": str(label).encode(),
                    "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode(),
                    "label.i64": np.int64(label).tobytes(),
                    "index.i64": np.int64(index).tobytes(),
                })
                pending_actions[action] += 1
                pending_counts[label] += 1
                pending_frames += num_frames
            if writer is not None and (writer.num_samples == cfg.shard_size or pos == len(sc.candidates)):
                # Commit point: shard files first, then the progress record that points past them.
                first = prog.next_index
                n = writer.num_samples
                tar_sha, idx_sha, size = writer.close()
                writer = None
                prog.shards.append({"tar": fmt.shard_name(cfg.split, len(prog.shards), "tar"),
                                    "idx": fmt.shard_name(cfg.split, len(prog.shards), "idx"),
                                    "first_index": first, "num_samples": n, "sha256": tar_sha,
                                    "idx_sha256": idx_sha, "bytes": size})
                prog.next_index += n
                _absorb(prog, pos, pending_bad, pending_actions, pending_counts, pending_frames)
                pending_bad, pending_actions, pending_counts, pending_frames = [], Counter(), Counter(), 0
                atomic_write_json(out_split / PROGRESS, asdict(prog), indent=None)
        if writer is None and pos == len(sc.candidates) and prog.next_candidate != pos:
            _absorb(prog, pos, pending_bad, pending_actions, pending_counts, pending_frames)
            atomic_write_json(out_split / PROGRESS, asdict(prog), indent=None)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        results.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _absorb(prog: VideoProgress, pos, bad, actions, counts, frames) -> None:
    prog.next_candidate = pos
    prog.bad.extend(bad)
    for k, v in actions.items():
        prog.actions[k] = prog.actions.get(k, 0) + v
    for label, v in counts.items():
        prog.class_counts[label] += v
    prog.total_frames += frames


def _finish(cfg: VideoConvertConfig, sc: VideoScan, prog: VideoProgress, out_split: Path) -> dict:
    n = prog.next_index
    if n == 0:
        raise ConversionError(f"no usable video for split {cfg.split} in {cfg.src} ({len(prog.bad)} bad files, "
                              f"see {out_split / fmt.BAD_FILES})" if prog.bad else
                              f"no video found for split {cfg.split} in {cfg.src}")
    with atomic_open(out_split / fmt.BAD_FILES, "w") as f:
        for b in prog.bad:
            f.write(json.dumps(b, ensure_ascii=False) + "\n")
    checksum = hashlib.sha256()
    for sh in prog.shards:
        checksum.update(f"{sh['tar']} {sh['sha256']} {sh['idx']} {sh['idx_sha256']}\n".encode())
    reasons = Counter(_reason_kind(b["reason"]) for b in prog.bad)
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "kind": fmt.VIDEO_KIND,
        "layout": sc.layout,
        "split": cfg.split,
        "num_samples": n,
        "num_classes": len(sc.classes),
        "classes": sc.classes,
        "class_counts": prog.class_counts,
        "empty_classes": sc.empty_classes,
        "total_frames": prog.total_frames,
        "num_bad": len(prog.bad),
        "bad_reasons": dict(sorted(reasons.items())),
        "num_ignored": len(sc.ignored),
        "ignored": sc.ignored[:1000],
        "actions": dict(sorted(prog.actions.items())),
        "members": list(fmt.VIDEO_MEMBER_EXTS),
        "video": {"container": "mp4", "codec": "h264", "pix_fmt": "yuv420p", "keyint": cfg.keyint,
                  "max_gop": cfg.max_gop},
        "shards": prog.shards,
        "beton": None,
        "arguments": cfg.output_args(),
        "source_fingerprint": sc.fingerprint,
        "checksum": checksum.hexdigest(),
    }
    atomic_write_json(out_split / fmt.MANIFEST, manifest)
    (out_split / PROGRESS).unlink(missing_ok=True)
    return manifest


def summary(manifest: dict) -> str:
    lines = [f"{manifest['num_samples']} videos ({manifest['total_frames']} frames) in {manifest['num_classes']} "
             f"classes, {len(manifest['shards'])} shards ({manifest['layout']} layout)"]
    if manifest["actions"]:
        lines.append("stored as: " + ", ".join(f"{k} {v}" for k, v in manifest["actions"].items()))
    if manifest["empty_classes"]:
        lines.append(f"classes without videos (index kept): {', '.join(manifest['empty_classes'])}")
    if manifest["num_ignored"]:
        lines.append(f"ignored (not video files / sub-folders): {manifest['num_ignored']}")
    if manifest["num_bad"]:
        lines.append(f"bad files: {manifest['num_bad']} (details in bad_files.jsonl)")
        for k, v in manifest["bad_reasons"].items():
            lines.append(f"  {v:6d}  {k}")
    else:
        lines.append("bad files: none")
    return "\n".join(lines)

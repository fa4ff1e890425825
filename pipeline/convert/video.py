"""Video datasets into the converted-split format (tools/convert_video.py): the video modality of the
conversion engine (pipeline/convert/engine.py holds the order, resume, shards and manifest).

Layouts (`--layout auto` tells them apart):
  ucf       SRC/<Class>/v_<Class>_gXX_cYY.avi and SRC/ucfTrainTestlist/ (a --split-file picks the split);
  kinetics  SRC/<split>.csv (label,youtube_id,time_start,time_end,split) and SRC/<split>/<label>/<file>;
  folder    SRC/<split>/<class>/<video>, the image converter's convention.
Each file becomes constant-frame-rate H.264 in MP4 (pipeline/convert/video_codec.py), stored as KEY.mp4
with its fps / frame count / size / keyframe interval in KEY.json; there is no .beton.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

from pipeline.convert import engine
from pipeline.convert.engine import ConversionError, ConvertOptions, Modality, Progress, Sample, Scan
from pipeline.convert.video_codec import (DEFAULT_MAX_PIXELS, REENCODE, X264_PRESETS, BadVideo, VideoOptions,
                                          normalize_video)
from pipeline.format import layout as fmt

VIDEO_EXTS = {".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".flv", ".3gp", ".ogv", ".wmv"}
LAYOUTS = ("ucf", "kinetics", "folder")
UCF_LIST_DIR = "ucfTrainTestlist"


@dataclass(kw_only=True)
class VideoConvertConfig(ConvertOptions):
    split_file: str | None = None
    layout: str = "auto"
    shard_size: int = 128
    max_pixels: int = DEFAULT_MAX_PIXELS
    reencode: str = "auto"
    keyint: int = 16
    max_gop: int = 64
    crf: int = 23
    preset: str = "veryfast"

    def __post_init__(self):
        if self.layout not in ("auto",) + LAYOUTS:
            raise ConversionError(f"--layout must be auto, {', '.join(LAYOUTS)}; got {self.layout}")
        if self.reencode not in REENCODE:
            raise ConversionError(f"--reencode must be auto, always or never; got {self.reencode}")
        if self.max_pixels < 256:
            raise ConversionError("--max-pixels must be >= 256")
        if self.keyint < 1 or self.max_gop < 1:
            raise ConversionError("--keyint and --max-gop must be >= 1")
        if not 0 <= self.crf <= 51:
            raise ConversionError("--crf must be in 0..51")
        if self.preset not in X264_PRESETS:
            raise ConversionError(f"--preset must be one of {', '.join(X264_PRESETS)}")
        super().__post_init__()

    def output_args(self) -> dict:
        return {"src": str(Path(self.src).resolve()), "split": self.split,
                "split_file": str(Path(self.split_file).resolve()) if self.split_file else None,
                "layout": self.layout, "shard_size": self.shard_size, "max_side": self.max_side,
                "max_pixels": self.max_pixels, "reencode": self.reencode, "keyint": self.keyint,
                "max_gop": self.max_gop, "crf": self.crf, "preset": self.preset, "seed": self.seed,
                "strict": self.strict, "limit": self.limit}


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
                              f"SRC/<Class>/*.avi + SRC/{UCF_LIST_DIR}/; Kinetics: SRC/train.csv + SRC/train/<label>/; "
                              f"class folders: SRC/<split>/<class>/*.mp4)")
    if cfg.layout != "auto":
        return cfg.layout
    if cfg.split_file:
        return "kinetics" if str(cfg.split_file).lower().endswith(".csv") else "ucf"
    if any(p.is_file() for p in _kinetics_csvs(src, cfg.split)):
        return "kinetics"
    if (src / UCF_LIST_DIR).is_dir():
        return "ucf"
    if _is_folder_tree(src / cfg.split):
        return "folder"
    if any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(src)):
        return "ucf"
    raise ConversionError(f"cannot tell the layout of {src}: no {cfg.split}.csv (Kinetics), no class folders "
                          f"(UCF101) and no {cfg.split}/<class>/ folders; pass --layout")


def _is_folder_tree(split_dir: Path) -> bool:
    """SRC/<split>/<class>/<video>: class folders directly under the split folder, one holding a video."""
    if not split_dir.is_dir():
        return False
    for c in engine.class_dirs(split_dir):
        if any(_is_video_name(e.name) for e in os.scandir(split_dir / c) if not e.is_dir()):
            return True
    return False


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


def _scan_folder(cfg: VideoConvertConfig):
    """SRC/<split>/<class>/<video>, as the image converter reads SRC/<split>/<class>/<image>: labels are the
    indices of the split's sorted class folders; other files and sub-folders are ignored and counted."""
    split_dir = Path(cfg.src) / cfg.split
    if not split_dir.is_dir():
        raise ConversionError(f"{split_dir} is not a directory (--layout folder reads SRC/<split>/<class>/*.mp4)")
    ignored: list[str] = []
    classes, per_class = engine.scan_class_tree(split_dir, cfg.split, _is_video_name, ignored)
    if not classes:
        raise ConversionError(f"{split_dir} has no class folders")
    return classes, per_class, [], ignored


def scan(cfg: VideoConvertConfig) -> Scan:
    """List the samples of cfg.split (cfg.layout must be resolved)."""
    split_file = resolve_split_file(cfg)
    if cfg.layout == "ucf":
        classes, per_class, bad, ignored = _scan_ucf(cfg, split_file)
    elif cfg.layout == "kinetics":
        classes, per_class, bad, ignored = _scan_kinetics(cfg, split_file)
    else:
        if split_file is not None:
            raise ConversionError("--split-file does not apply to --layout folder (the split is SRC/<split>/)")
        classes, per_class, bad, ignored = _scan_folder(cfg)
    empty = [c for c, files in zip(classes, per_class) if not files]
    candidates = engine.order(per_class, cfg.seed, cfg.limit)
    head = json.dumps([cfg.layout, classes, bad]).encode()
    if split_file is not None:
        head += hashlib.sha256(split_file.read_bytes()).digest()
    fp = engine.fingerprint(Path(cfg.src), head, candidates)
    return Scan(classes, candidates, bad, sorted(ignored), empty, [], fp, cfg.layout)


# ------------------------------------------------------------------------------------------ modality

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


class VideoModality(Modality):
    name = "convert_video"
    unit = "video"
    noun = "video"
    members = fmt.VIDEO_MEMBER_EXTS

    def scan(self) -> Scan:
        return scan(self.cfg)

    def source(self) -> str:
        return f"the source videos of split {self.cfg.split} under {self.cfg.src}"

    def window(self) -> int:
        return max(4, 2 * self.cfg.workers + 2)

    def results(self, sc: Scan, start: int, pool):
        c = self.cfg
        opts = VideoOptions(max_side=c.max_side, max_pixels=c.max_pixels, reencode=c.reencode, keyint=c.keyint,
                            max_gop=c.max_gop, crf=c.crf, preset=c.preset)
        jobs = ((str(Path(c.src) / rel), opts) for rel, _ in sc.candidates[start:])
        return engine.ordered_results(jobs, pool, self.window(), _process)

    def sample(self, payload) -> Sample:
        mp4, fps, num_frames, w, h, keyint, action = payload
        f = Fraction(fps)
        meta = {"fps": round(float(f), 6), "num_frames": num_frames, "duration": round(num_frames / float(f), 6),
                "width": w, "height": h, "keyint": keyint}
        return Sample("mp4", mp4, meta, action, {"total_frames": num_frames})

    def no_samples(self, prog: Progress, out_split: Path) -> str:
        c = self.cfg
        return (f"no usable video for split {c.split} in {c.src} ({len(prog.bad)} bad files, "
                f"see {out_split / fmt.BAD_FILES})" if prog.bad else f"no video found for split {c.split} in {c.src}")

    def manifest_head(self, sc: Scan) -> dict:
        return {"kind": fmt.VIDEO_KIND, "layout": sc.layout}

    def manifest_counts(self, prog: Progress) -> dict:
        return {"total_frames": prog.totals.get("total_frames", 0)}

    def manifest_format(self) -> dict:
        return {"video": {"container": "mp4", "codec": "h264", "pix_fmt": "yuv420p", "keyint": self.cfg.keyint,
                          "max_gop": self.cfg.max_gop}}


def convert_video(cfg: VideoConvertConfig) -> dict:
    """Run (or resume) a video conversion; returns the manifest."""
    cfg = replace(cfg, layout=detect_layout(cfg))
    if cfg.split_file:  # recorded as the file found, so a rerun from another directory still matches
        cfg = replace(cfg, split_file=str(resolve_split_file(cfg)))
    return engine.run(VideoModality(cfg))

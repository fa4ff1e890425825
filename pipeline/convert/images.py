"""Image datasets into the converted-split format (tools/convert_imagenet.py): the image modality of the
conversion engine (pipeline/convert/engine.py holds the order, resume, shards and manifest).

Input: the ImageNet-1k layout or any class-folder tree (`SRC/<split>/<class>/<image>`), or a flat
`SRC/<split>/` with a LOC_val_solution.csv label file. Each file becomes a baseline RGB JPEG
(pipeline/convert/image_codec.py), stored as KEY.jpg. After the shards, the .beton is streamed from
them (`--formats ffcv`), so both formats hold the same samples under the same global indices by
construction.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.convert import engine
from pipeline.convert.engine import ConversionError, ConvertOptions, Modality, Progress, Sample, Scan
from pipeline.convert.image_codec import DEFAULT_MAX_PIXELS, DEFAULT_VERIFY, VERIFY_MODES, BadImage, normalize_image, try_passthrough
from pipeline.format import layout as fmt
from pipeline.format.shard_index import shard_entries

IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
KEPT = ("passthrough", "trimmed")  # actions that store the source's own bytes (or a prefix of them)
STAGING = ".staging"
VAL_LABEL_FILES = ("LOC_val_solution.csv",)


@dataclass(kw_only=True)
class ConvertConfig(ConvertOptions):
    formats: tuple[str, ...] = ("wds", "ffcv")
    quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS
    verify: str = DEFAULT_VERIFY
    val_labels: str | None = None

    def __post_init__(self):
        self.formats = tuple(self.formats)
        bad = set(self.formats) - {"wds", "ffcv"}
        if bad or not self.formats:
            raise ConversionError(f"--formats takes a comma list of wds, ffcv; got {','.join(self.formats)}")
        if not 1 <= self.quality <= 100:
            raise ConversionError("--quality must be in 1..100")
        if self.verify not in VERIFY_MODES:
            raise ConversionError(f"--verify must be one of {', '.join(VERIFY_MODES)}; got {self.verify!r}")
        super().__post_init__()

    def output_args(self) -> dict:
        return {"src": str(Path(self.src).resolve()), "split": self.split, "formats": list(self.formats),
                "shard_size": self.shard_size, "max_side": self.max_side, "quality": self.quality,
                "seed": self.seed, "strict": self.strict, "limit": self.limit, "max_pixels": self.max_pixels,
                "verify": self.verify, "val_labels": self.val_labels}


# ----------------------------------------------------------------------------------------- scanning

def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _find_val_labels(src: Path, explicit: str | None) -> Path | None:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ConversionError(f"--val-labels {p} does not exist")
        return p
    for name in VAL_LABEL_FILES:
        for p in (src / name, src / "val" / name):
            if p.is_file():
                return p
    return None


def _scan_flat(cfg: ConvertConfig, src: Path, split_dir: Path, ignored: list[str], unlabeled: list[str]):
    """A flat val/ with a LOC_val_solution.csv label file (ImageNet on Kaggle / ILSVRC LOC layout)."""
    label_file = _find_val_labels(src, cfg.val_labels)
    if label_file is None:
        raise ConversionError(f"{split_dir} holds images directly but no LOC_val_solution.csv was found "
                              f"in {src} or {split_dir}; pass --val-labels FILE")
    wnid_of = {}
    with open(label_file, newline="") as f:
        for row in csv.DictReader(f):
            wnid_of[row["ImageId"]] = row["PredictionString"].split()[0]
    train_dir = src / "train"
    classes = engine.class_dirs(train_dir) if train_dir.is_dir() else sorted(set(wnid_of.values()))
    col = {c: i for i, c in enumerate(classes)}
    per_class: list[list[str]] = [[] for _ in classes]
    for e in os.scandir(split_dir):
        if e.is_dir():
            ignored.append(f"{cfg.split}/{e.name}/")
            continue
        if not _is_image_name(e.name):
            ignored.append(f"{cfg.split}/{e.name}")
            continue
        wnid = wnid_of.get(os.path.splitext(e.name)[0])
        if wnid is None or wnid not in col:
            unlabeled.append(f"{cfg.split}/{e.name}")
            continue
        per_class[col[wnid]].append(f"{cfg.split}/{e.name}")
    return classes, per_class


def scan(cfg: ConvertConfig) -> Scan:
    src = Path(cfg.src)
    split_dir = src / cfg.split
    if not split_dir.is_dir():
        raise ConversionError(f"{split_dir} is not a directory: --src must hold {cfg.split}/ "
                              f"(ImageNet layout: SRC/train/<wnid>/*.JPEG, SRC/val/...)")
    ignored: list[str] = []
    unlabeled: list[str] = []
    flat_files = [e.name for e in os.scandir(split_dir) if not e.is_dir() and _is_image_name(e.name)]
    if engine.class_dirs(split_dir) and not flat_files:
        classes, per_class = engine.scan_class_tree(split_dir, cfg.split, _is_image_name, ignored)
    else:
        classes, per_class = _scan_flat(cfg, src, split_dir, ignored, unlabeled)
    if not classes:
        raise ConversionError(f"{split_dir} has no class folders and no images")
    empty = [c for c, files in zip(classes, per_class) if not files]
    candidates = engine.order(per_class, cfg.seed, cfg.limit)
    fp = engine.fingerprint(src, json.dumps(classes).encode(), candidates)
    return Scan(classes, candidates, [], sorted(ignored), empty, sorted(unlabeled), fp)


# --------------------------------------------------------------------------------------- processing

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadImage("broken symlink" if os.path.islink(path) else "file disappeared during conversion") from None
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None


def _process(job, data: bytes | None = None):
    """Read (unless given) and normalise one file. Returns (ok, payload) and never raises. A file kept as
    it is (pass-through, or trimmed after its EOI) comes back as its length instead of its bytes: the
    parent already holds them (see _finalize)."""
    path, max_side, quality, max_pixels, verify = job
    try:
        if data is None:
            data = _read(path)
        enc = normalize_image(data, max_side=max_side, quality=quality, max_pixels=max_pixels, verify=verify)
        if enc.action in KEPT:  # normalize_image keeps these as `data` or a prefix of it
            return True, (len(enc.jpeg), enc.width, enc.height, enc.action)
        return True, (enc.jpeg, enc.width, enc.height, enc.action)
    except BadImage as e:
        return False, str(e)
    except Exception as e:  # a decoder bug must not cost the rest of the dataset
        return False, f"unexpected {type(e).__name__}: {e}"


def _triage(job):
    """Parent side: read the file and settle everything a header decides (pass-through with
    --verify header, most bad files). Why in the parent: a file's bytes through the pool cost the parent a
    pipe receive and an unpickle, more than reading it, and on a pass-through conversion the parent (tar,
    index, hashing, .beton) is the bottleneck. Returns (result, or None when a worker must decode it;
    the bytes read)."""
    path, max_side, _quality, max_pixels, verify = job
    data = b""
    try:
        data = _read(path)
        enc = try_passthrough(data, max_side=max_side, max_pixels=max_pixels, verify=verify)
    except BadImage as e:
        return (False, str(e)), data
    except Exception as e:
        return (False, f"unexpected {type(e).__name__}: {e}"), data
    return (None if enc is None else (True, (enc.jpeg, enc.width, enc.height, enc.action))), data


def _finalize(result, data: bytes):
    ok, payload = result
    if ok and isinstance(payload[0], int):  # kept as read: the worker sent the length
        payload = (data[:payload[0]],) + payload[1:]
    return ok, payload


class ImageModality(Modality):
    name = "convert"
    unit = "img"
    noun = "image"
    members = fmt.MEMBER_EXTS

    def scan(self) -> Scan:
        return scan(self.cfg)

    def results(self, sc: Scan, start: int, pool):
        c = self.cfg
        jobs = ((str(Path(c.src) / rel), c.max_side, c.quality, c.max_pixels, c.verify)
                for rel, _ in sc.candidates[start:])
        return engine.ordered_results(jobs, pool, self.window(), _process, _triage, _finalize)

    def sample(self, payload) -> Sample:
        jpeg, w, h, action = payload
        return Sample("jpg", jpeg, {"width": w, "height": h}, action, {})

    def shard_dir(self, out_split: Path) -> Path:
        return out_split if "wds" in self.cfg.formats else out_split / STAGING

    def extra_outputs(self, prog: Progress, out_split: Path, shard_dir: Path) -> dict | None:
        beton = _write_beton(self.cfg, prog, out_split, shard_dir) if "ffcv" in self.cfg.formats else None
        if shard_dir != out_split:
            shutil.rmtree(shard_dir)
        return beton

    def no_samples(self, prog: Progress, out_split: Path) -> str:
        return (f"no usable image in {self.cfg.src}/{self.cfg.split} ({len(prog.bad)} bad files): "
                f"see the reasons above")

    def manifest_scan(self, sc: Scan) -> dict:
        return {"unlabeled": sc.unlabeled[:1000], "num_unlabeled": len(sc.unlabeled)}


def convert(cfg: ConvertConfig) -> dict:
    """Run (or resume) an image conversion; returns the manifest."""
    return engine.run(ImageModality(cfg))


def _write_beton(cfg, prog: Progress, out_split: Path, shard_dir: Path) -> dict:
    """Stream the finished shards into the .beton: image bytes are read at their offsets from the DALI
    index (no tar parsing), metadata from each sample's .json."""
    # Imported here: ffcv's import JIT-compiles numba code (seconds), which the workers never need.
    from pipeline.convert.beton_writer import write_beton
    n = prog.next_index
    sizes, widths, heights, labels, indices = (np.zeros(n, np.int64) for _ in range(5))
    where = np.zeros((n, 2), np.int64)  # (shard number, byte offset of the .jpg member)
    fds = []
    try:
        for k, sh in enumerate(prog.shards):
            tar, entries = shard_entries(shard_dir, sh)
            fd = os.open(tar, os.O_RDONLY)
            fds.append(fd)
            for s_id, members in entries:
                joff, jsize = members["json"]
                meta = json.loads(os.pread(fd, jsize, joff))
                where[s_id] = (k, members["jpg"][0])
                sizes[s_id] = members["jpg"][1]
                widths[s_id], heights[s_id] = meta["width"], meta["height"]
                labels[s_id], indices[s_id] = meta["label"], meta["index"]
        bar = tqdm(total=n, unit="img", desc="write .beton", disable=not cfg.progress, dynamic_ncols=True)
        with bar:
            info = write_beton(out_split / fmt.beton_name(cfg.split), sizes=sizes, widths=widths, heights=heights,
                               labels=labels, indices=indices, progress=bar.update,
                               read_jpeg=lambda s: os.pread(fds[where[s, 0]], int(sizes[s]), int(where[s, 1])))
    finally:
        for fd in fds:
            os.close(fd)
    return {"file": fmt.beton_name(cfg.split), **info}

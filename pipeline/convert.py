"""Image dataset conversion engine behind tools/convert_imagenet.py.

scan -> order -> process (parallel) -> shards (+ DALI index) -> .beton -> manifest.

Determinism: candidates are listed in (class index, file name) order, permuted once by `seed`, and
processed in that order whatever the number of workers (results are consumed in order). A good sample
gets the next global index, so index = rank among the good samples in permuted order; shard k holds
indices [k*shard_size, (k+1)*shard_size). The .beton is then streamed from the finished shards, so both
formats hold the same samples under the same global indices by construction.

Resume: after each shard is renamed into place, `.progress.json` records the shards done, the next
candidate position and the bad files so far (atomically). A rerun after a crash or kill -9 drops
`*.partial` leftovers and continues from the last recorded shard, ending byte-identical to an
uninterrupted run. A rerun with other output-affecting arguments, or over a changed source tree,
refuses and says why.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import dataset_format as fmt
from .atomic import atomic_open, atomic_write_json, remove_partials
from .image_codec import DEFAULT_MAX_PIXELS, DEFAULT_VERIFY, VERIFY_MODES, BadImage, normalize_image, try_passthrough
from .wds_writer import ShardWriter

IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PROGRESS = ".progress.json"
KEPT = ("passthrough", "trimmed")  # actions that store the source's own bytes (or a prefix of them)
STAGING = ".staging"
VAL_LABEL_FILES = ("LOC_val_solution.csv",)


class ConversionError(RuntimeError):
    """A condition the user must fix; the message says how."""


@dataclass(kw_only=True)
class ConvertConfig:
    src: str
    out: str
    split: str = "train"
    formats: tuple[str, ...] = ("wds", "ffcv")
    workers: int = 0
    shard_size: int = 1000
    max_side: int | None = None
    quality: int = 90
    seed: int = 0
    strict: bool = False
    limit: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    verify: str = DEFAULT_VERIFY
    val_labels: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        self.formats = tuple(self.formats)
        bad = set(self.formats) - {"wds", "ffcv"}
        if bad or not self.formats:
            raise ConversionError(f"--formats takes a comma list of wds, ffcv; got {','.join(self.formats)}")
        if self.shard_size < 1:
            raise ConversionError("--shard-size must be >= 1")
        if self.max_side is not None and self.max_side < 16:
            raise ConversionError("--max-side must be >= 16 (or omitted to keep sizes)")
        if not 1 <= self.quality <= 100:
            raise ConversionError("--quality must be in 1..100")
        if self.limit is not None and self.limit < 1:
            raise ConversionError("--limit must be >= 1")
        if self.verify not in VERIFY_MODES:
            raise ConversionError(f"--verify must be one of {', '.join(VERIFY_MODES)}; got {self.verify!r}")
        if not self.split or "/" in self.split:
            raise ConversionError("--split must be a plain name such as train or val")
        if self.workers <= 0:
            self.workers = os.cpu_count() or 1

    def output_args(self) -> dict:
        """The arguments that decide the output bytes (not workers, progress, overwrite)."""
        return {"src": str(Path(self.src).resolve()), "split": self.split, "formats": list(self.formats),
                "shard_size": self.shard_size, "max_side": self.max_side, "quality": self.quality,
                "seed": self.seed, "strict": self.strict, "limit": self.limit, "max_pixels": self.max_pixels,
                "verify": self.verify, "val_labels": self.val_labels}


@dataclass
class Scan:
    classes: list[str]
    candidates: list[tuple[str, int]]  # (path relative to src, label), in processing order
    ignored: list[str] = field(default_factory=list)  # not image files / folders: never samples
    empty_classes: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)  # flat val images absent from the label file
    fingerprint: str = ""


# ----------------------------------------------------------------------------------------- scanning

def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def _list_class(root: Path, rel_root: Path, ignored: list[str]) -> list[str]:
    files = []
    for e in os.scandir(root):
        rel = str(rel_root / e.name)
        if e.name.startswith("."):
            ignored.append(rel)
        elif e.is_dir(follow_symlinks=False):
            ignored.append(rel + "/")
        elif _is_image_name(e.name):
            files.append(e.name)  # broken symlinks included: processing reports them
        else:
            ignored.append(rel)
    return sorted(files)


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


def scan(cfg: ConvertConfig) -> Scan:
    src = Path(cfg.src)
    split_dir = src / cfg.split
    if not split_dir.is_dir():
        raise ConversionError(f"{split_dir} is not a directory: --src must hold {cfg.split}/ "
                              f"(ImageNet layout: SRC/train/<wnid>/*.JPEG, SRC/val/...)")
    ignored: list[str] = []
    per_class: list[list[str]] = []
    unlabeled: list[str] = []
    class_names = _class_dirs(split_dir)
    flat_files = [e.name for e in os.scandir(split_dir) if not e.is_dir() and _is_image_name(e.name)]
    if class_names and not flat_files:
        classes = class_names
        for c in classes:
            names = _list_class(split_dir / c, Path(cfg.split) / c, ignored)
            per_class.append([f"{cfg.split}/{c}/{n}" for n in names])
    else:
        # Flat val/ with a LOC_val_solution.csv label file (ImageNet on Kaggle / ILSVRC LOC layout).
        label_file = _find_val_labels(src, cfg.val_labels)
        if label_file is None:
            raise ConversionError(f"{split_dir} holds images directly but no LOC_val_solution.csv was found "
                                  f"in {src} or {split_dir}; pass --val-labels FILE")
        wnid_of = {}
        with open(label_file, newline="") as f:
            for row in csv.DictReader(f):
                wnid_of[row["ImageId"]] = row["PredictionString"].split()[0]
        train_dir = src / "train"
        classes = _class_dirs(train_dir) if train_dir.is_dir() else sorted(set(wnid_of.values()))
        col = {c: i for i, c in enumerate(classes)}
        per_class = [[] for _ in classes]
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
        per_class = [sorted(p) for p in per_class]
    if not classes:
        raise ConversionError(f"{split_dir} has no class folders and no images")
    empty = [c for c, files in zip(classes, per_class) if not files]
    if cfg.limit:
        per_class = [files[:cfg.limit] for files in per_class]
    ordered = [(rel, label) for label, files in enumerate(per_class) for rel in files]
    perm = np.random.default_rng(cfg.seed).permutation(len(ordered))
    candidates = [ordered[i] for i in perm]
    h = hashlib.sha256()
    h.update(json.dumps(classes).encode())
    for rel, label in candidates:
        try:
            st = os.stat(src / rel)
            sig = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            sig = "missing"
        h.update(f"{rel}\t{label}\t{sig}\n".encode("utf-8", "surrogateescape"))
    return Scan(classes, candidates, sorted(ignored), empty, sorted(unlabeled), h.hexdigest())


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
    parent already holds them (see _results)."""
    path, max_side, quality, max_pixels, verify = job
    try:
        if data is None:
            data = _read(path)
        enc = normalize_image(data, max_side=max_side, quality=quality, max_pixels=max_pixels, verify=verify)
        if enc.action in KEPT and data.startswith(enc.jpeg):
            return True, (len(enc.jpeg), enc.width, enc.height, enc.action)
        return True, (enc.jpeg, enc.width, enc.height, enc.action)
    except BadImage as e:
        return False, str(e)
    except Exception as e:  # a decoder bug must not cost the rest of the dataset
        return False, f"unexpected {type(e).__name__}: {e}"


def _triage(job):
    """Parent side: read the file and settle everything a header decides (pass-through with
    --verify header, most bad files). Returns (result or None when a worker must decode it, the bytes)."""
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


def _pool_context():
    """fork when it is safe (the CLI: one thread, no native thread pools loaded) since it starts in
    milliseconds; otherwise forkserver, because forking a process that runs DALI, ffcv/numba or torch
    threads can deadlock the child on a lock one of those threads held."""
    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    # numba alone starts no thread (the JPEG walk is compiled, not parallel); ffcv's import does.
    threaded = ("torch", "nvidia.dali", "ffcv", "cv2")
    if threading.active_count() == 1 and not any(m in sys.modules for m in threaded):
        return mp.get_context("fork")
    return mp.get_context("forkserver")


def _results(jobs, pool, window: int):
    """Results in job order. The parent reads each file and settles what the header decides itself;
    files that need a decode (every JPEG under --verify entropy / decode) go to the pool, which sends
    back only a verdict for the ones kept as they are. Why: a file's bytes through the pool cost the
    parent a pipe receive and an unpickle, more than reading it, and on a pass-through conversion the
    parent (tar, index, hashing, .beton) is the bottleneck. At most `window` results are in flight
    (bounded memory)."""
    pending: deque = deque()

    def done(head):
        r, data = head
        if isinstance(r, Future):
            r = r.result()
        ok, payload = r
        if ok and isinstance(payload[0], int):  # kept as read: the worker sent the length
            payload = (data[:payload[0]],) + payload[1:]
        return ok, payload

    for job in jobs:
        r, data = _triage(job)
        if r is None:
            r = pool.submit(_process, job) if pool is not None else _process(job, data)
        pending.append((r, data))
        while pending and (len(pending) > window or not isinstance(pending[0][0], Future) or pending[0][0].done()):
            yield done(pending.popleft())
    while pending:
        yield done(pending.popleft())


# -------------------------------------------------------------------------------------------- state

@dataclass
class Progress:
    args: dict
    fingerprint: str
    next_candidate: int = 0
    next_index: int = 0
    shards: list = field(default_factory=list)  # [{tar, idx, first_index, num_samples, sha256, idx_sha256, bytes}]
    bad: list = field(default_factory=list)  # [{path, reason}]
    actions: dict = field(default_factory=dict)
    class_counts: list = field(default_factory=list)


def _load_progress(split_dir: Path, cls=Progress):
    """The `cls` (a progress dataclass) saved in split_dir, or None."""
    p = split_dir / PROGRESS
    if not p.is_file():
        return None
    with open(p) as f:
        return cls(**json.load(f))


def _check_same_run(cfg, previous_args: dict, previous_fp: str | None, fp: str, where: Path,
                    source: str | None = None):
    """Refuse to resume (or add to) `where` when the arguments or the source files differ from the run
    that wrote it; `source` names the source in the message (default: the image tree of the split)."""
    now = cfg.output_args()
    if previous_args != now:
        diff = {k: (previous_args.get(k), now.get(k)) for k in set(now) | set(previous_args)
                if previous_args.get(k) != now.get(k)}
        detail = ", ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConversionError(f"{where} was written with different arguments ({detail}). Rerun with the "
                              f"same arguments to resume, choose another --out, or pass --overwrite.")
    if previous_fp is not None and previous_fp != fp:
        source = source or f"the source tree under {cfg.src}/{cfg.split}"
        raise ConversionError(f"{source} changed since {where} was started "
                              f"(files added, removed or modified). Pass --overwrite to start again.")


# --------------------------------------------------------------------------------------------- main

def convert(cfg: ConvertConfig) -> dict:
    """Run (or resume) a conversion; returns the manifest."""
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
        _check_same_run(cfg, manifest["arguments"], manifest.get("source_fingerprint"), sc.fingerprint, out_split)
        log(f"[convert] {out_split} is already complete ({manifest['num_samples']} samples); nothing to do")
        return manifest

    prog = _load_progress(out_split)
    if prog is None:
        if any(out_split.iterdir()):
            raise ConversionError(f"{out_split} is not empty and holds no conversion state; choose an empty "
                                  f"--out or pass --overwrite")
        prog = Progress(args=cfg.output_args(), fingerprint=sc.fingerprint, class_counts=[0] * len(sc.classes))
        atomic_write_json(out_split / PROGRESS, asdict(prog), indent=None)
    else:
        _check_same_run(cfg, prog.args, prog.fingerprint, sc.fingerprint, out_split)
        if prog.next_candidate:
            log(f"[convert] resuming {out_split}: {len(prog.shards)} shards, {prog.next_index} samples done")

    shard_dir = out_split if "wds" in cfg.formats else out_split / STAGING
    shard_dir.mkdir(exist_ok=True)
    remove_partials(shard_dir)
    _write_shards(cfg, sc, prog, out_split, shard_dir, log)
    manifest = _finish(cfg, sc, prog, out_split, shard_dir, log)
    return manifest


def _write_shards(cfg, sc: Scan, prog: Progress, out_split: Path, shard_dir: Path, log) -> None:
    src = Path(cfg.src)
    start = prog.next_candidate
    jobs = ((str(src / rel), cfg.max_side, cfg.quality, cfg.max_pixels, cfg.verify)
            for rel, _ in sc.candidates[start:])
    # Created before any thread of ours (progress bar, writer threads) exists, so fork is usable.
    pool = None
    if cfg.workers > 1 and start < len(sc.candidates):
        # concurrent.futures rather than multiprocessing.Pool: Pool.terminate() can deadlock while its
        # task-feeder thread is blocked on a full pipe (seen when --strict stops a run early).
        pool = ProcessPoolExecutor(cfg.workers, mp_context=_pool_context())
        pool.submit(int).result()  # start the workers now, before our own threads exist (fork safety)
    bar = tqdm(total=len(sc.candidates), initial=start, unit="img", desc=f"convert {cfg.split}",
               disable=not cfg.progress, dynamic_ncols=True, smoothing=0.05)
    writer = None
    pos = start
    pending_bad: list[dict] = []
    pending_actions: Counter = Counter()
    pending_counts = Counter()
    results = _results(jobs, pool, window=max(64, 32 * cfg.workers))
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
                jpeg, w, h, action = payload
                if writer is None:
                    k = len(prog.shards)
                    writer = ShardWriter(shard_dir / fmt.shard_name(cfg.split, k, "tar"),
                                         shard_dir / fmt.shard_name(cfg.split, k, "idx"))
                index = prog.next_index + writer.num_samples
                meta = {"index": index, "label": label, "class": sc.classes[label], "source": rel,
                        "width": w, "height": h}
                writer.add(fmt.sample_key(index), {
                    "jpg": jpeg,
                    "cls": str(label).encode(),
                    "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode(),
                    "label.i64": np.int64(label).tobytes(),
                    "index.i64": np.int64(index).tobytes(),
                })
                pending_actions[action.split(":")[0] if action == "passthrough" else action] += 1
                pending_counts[label] += 1
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
                _absorb(prog, pos, pending_bad, pending_actions, pending_counts)
                pending_bad, pending_actions, pending_counts = [], Counter(), Counter()
                atomic_write_json(out_split / PROGRESS, asdict(prog), indent=None)
        if writer is None and pos == len(sc.candidates) and prog.next_candidate != pos:
            # Trailing bad files after the last shard: record them too.
            _absorb(prog, pos, pending_bad, pending_actions, pending_counts)
            atomic_write_json(out_split / PROGRESS, asdict(prog), indent=None)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        results.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # now, not when the traceback is collected
        bar.close()


def _absorb(prog: Progress, pos, bad, actions, counts) -> None:
    prog.next_candidate = pos
    prog.bad.extend(bad)
    for k, v in actions.items():
        prog.actions[k] = prog.actions.get(k, 0) + v
    for label, v in counts.items():
        prog.class_counts[label] += v


def _finish(cfg, sc: Scan, prog: Progress, out_split: Path, shard_dir: Path, log) -> dict:
    n = prog.next_index
    if n == 0:
        raise ConversionError(f"no usable image in {cfg.src}/{cfg.split} ({len(prog.bad)} bad files): "
                              f"see the reasons above")
    beton = None
    if "ffcv" in cfg.formats:
        beton = _write_beton(cfg, prog, out_split, shard_dir)
    if "wds" not in cfg.formats:
        shutil.rmtree(shard_dir)
    with atomic_open(out_split / fmt.BAD_FILES, "w") as f:
        for b in prog.bad:
            f.write(json.dumps(b, ensure_ascii=False) + "\n")
    shards = prog.shards if "wds" in cfg.formats else []
    checksum = hashlib.sha256()
    for sh in shards:
        checksum.update(f"{sh['tar']} {sh['sha256']} {sh['idx']} {sh['idx_sha256']}\n".encode())
    if beton:
        checksum.update(f"{beton['file']} {beton['sha256']}\n".encode())
    reasons = Counter(_reason_kind(b["reason"]) for b in prog.bad)
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "split": cfg.split,
        "num_samples": n,
        "num_classes": len(sc.classes),
        "classes": sc.classes,
        "class_counts": prog.class_counts,
        "empty_classes": sc.empty_classes,
        "num_bad": len(prog.bad),
        "bad_reasons": dict(sorted(reasons.items())),
        "num_ignored": len(sc.ignored),
        "ignored": sc.ignored[:1000],
        "unlabeled": sc.unlabeled[:1000],
        "num_unlabeled": len(sc.unlabeled),
        "actions": dict(sorted(prog.actions.items())),
        "members": list(fmt.MEMBER_EXTS),
        "shards": shards,
        "beton": beton,
        "arguments": cfg.output_args(),
        "source_fingerprint": sc.fingerprint,
        "checksum": checksum.hexdigest(),
    }
    atomic_write_json(out_split / fmt.MANIFEST, manifest)
    (out_split / PROGRESS).unlink(missing_ok=True)
    return manifest


def _write_beton(cfg, prog: Progress, out_split: Path, shard_dir: Path) -> dict:
    """Stream the finished shards into the .beton: image bytes are read at their offsets from the DALI
    index (no tar parsing), metadata from each sample's .json."""
    # Imported here: ffcv's import JIT-compiles numba code (seconds), which the workers never need.
    from .beton_writer import write_beton
    n = prog.next_index
    sizes, widths, heights, labels, indices = (np.zeros(n, np.int64) for _ in range(5))
    where = np.zeros((n, 2), np.int64)  # (shard number, byte offset of the .jpg member)
    fds = []
    try:
        for k, sh in enumerate(prog.shards):
            fd = os.open(shard_dir / sh["tar"], os.O_RDONLY)
            fds.append(fd)
            lines = (shard_dir / sh["idx"]).read_text().splitlines()[1:]
            for j, line in enumerate(lines):
                f = line.split(" ")
                members = {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
                s_id = sh["first_index"] + j
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


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0]


def summary(manifest: dict, bad: list[dict] | None = None) -> str:
    lines = [f"{manifest['num_samples']} samples in {manifest['num_classes']} classes, "
             f"{len(manifest['shards'])} shards" + (", .beton" if manifest["beton"] else "")]
    acts = manifest["actions"]
    if acts:
        lines.append("stored as: " + ", ".join(f"{k} {v}" for k, v in acts.items()))
    if manifest["empty_classes"]:
        lines.append(f"empty classes (index kept): {', '.join(manifest['empty_classes'])}")
    if manifest["num_ignored"]:
        lines.append(f"ignored (not image files / sub-folders): {manifest['num_ignored']}")
    if manifest["num_unlabeled"]:
        lines.append(f"val images without a label (skipped): {manifest['num_unlabeled']}")
    if manifest["num_bad"]:
        lines.append(f"bad files: {manifest['num_bad']} (details in bad_files.jsonl)")
        for k, v in manifest["bad_reasons"].items():
            lines.append(f"  {v:6d}  {k}")
    else:
        lines.append("bad files: none")
    return "\n".join(lines)

"""The one conversion engine behind tools/convert_imagenet.py and tools/convert_video.py.

scan -> order -> process (parallel) -> shards (+ DALI index) -> the modality's extra outputs -> manifest.

A modality (`pipeline.convert.images.ImageModality`, `pipeline.convert.video.VideoModality`) plugs in
what differs: how a source tree is scanned into (file, label) candidates, how one file becomes a stored
member (its codec, run in worker processes), the member's extension and metadata, extra outputs written
from the finished shards (the image .beton) and extra manifest fields. Everything else is here, once:

Determinism: candidates are listed in (class index, path) order, permuted once by `seed`, and processed
in that order whatever the number of workers (results are consumed in order). A good sample gets the
next global index, so index = rank among the good samples in permuted order; shard k holds indices
[k*shard_size, (k+1)*shard_size).

Resume: after each shard is renamed into place, `.progress.json` records the shards done, the next
candidate position and the bad files so far (atomically). A rerun after a crash or kill -9 drops
`*.partial` leftovers and continues from the last recorded shard, ending byte-identical to an
uninterrupted run. A rerun with other output-affecting arguments, or over a changed source tree,
refuses and says why; a rerun of a finished conversion is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

from pipeline.convert.atomic import atomic_open, atomic_write_json, remove_partials
from pipeline.convert.tar_writer import ShardWriter
from pipeline.format import layout as fmt

PROGRESS = ".progress.json"


class ConversionError(RuntimeError):
    """A condition the user must fix; the message says how."""


# ------------------------------------------------------------------------------------------- config

@dataclass(kw_only=True)
class ConvertOptions:
    """The arguments every conversion has; a modality's config adds its own (and may change defaults)."""
    src: str
    out: str
    split: str = "train"
    workers: int = 0
    shard_size: int = 1000
    max_side: int | None = None
    seed: int = 0
    strict: bool = False
    limit: int | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.shard_size < 1:
            raise ConversionError("--shard-size must be >= 1")
        if self.max_side is not None and self.max_side < 16:
            raise ConversionError("--max-side must be >= 16 (or omitted to keep sizes)")
        if self.limit is not None and self.limit < 1:
            raise ConversionError("--limit must be >= 1")
        if not self.split or "/" in self.split:
            raise ConversionError("--split must be a plain name such as train or val")
        if self.workers <= 0:
            self.workers = os.cpu_count() or 1

    def output_args(self) -> dict:
        """The arguments that decide the output bytes (not workers, progress, overwrite)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ scanning

@dataclass
class Scan:
    classes: list[str]
    candidates: list[tuple[str, int]]  # (path relative to src, label), in processing order
    bad: list[dict] = field(default_factory=list)  # found at scan time (listed but missing, unknown class)
    ignored: list[str] = field(default_factory=list)  # not sample files / folders: never samples
    empty_classes: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)  # files no label file names (flat image val/)
    fingerprint: str = ""
    layout: str | None = None


def class_dirs(root: Path) -> list[str]:
    """The class folders of `root`, sorted (hidden ones left out)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def list_class(root: Path, rel_root: str | Path, is_sample: Callable[[str], bool], ignored: list[str]) -> list[str]:
    """Sorted names of the sample files in one class folder; hidden files, sub-folders and other files are
    appended to `ignored` (as paths relative to the source root). Broken symlinks are listed: the worker
    reports them as bad files."""
    files = []
    for e in os.scandir(root):
        rel = str(Path(rel_root) / e.name)
        if e.name.startswith("."):
            ignored.append(rel)
        elif e.is_dir(follow_symlinks=False):
            ignored.append(rel + "/")
        elif is_sample(e.name):
            files.append(e.name)
        else:
            ignored.append(rel)
    return sorted(files)


def scan_class_tree(split_dir: Path, rel_prefix: str, is_sample: Callable[[str], bool], ignored: list[str]):
    """An ImageFolder-style tree `split_dir/<class>/<file>`: (classes, per-class relative paths)."""
    classes = class_dirs(split_dir)
    per_class = [[f"{rel_prefix}/{c}/{n}" for n in list_class(split_dir / c, Path(rel_prefix) / c, is_sample, ignored)]
                 for c in classes]
    return classes, per_class


def order(per_class: list[list[str]], seed: int, limit: int | None) -> list[tuple[str, int]]:
    """(path, label) candidates: each class's files sorted, the first `limit` of each kept, all of them
    permuted once by `seed`."""
    if limit:
        per_class = [files[:limit] for files in per_class]
    ordered = [(rel, label) for label, files in enumerate(per_class) for rel in sorted(files)]
    perm = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in perm]


def fingerprint(src: Path, head: bytes, candidates: list[tuple[str, int]]) -> str:
    """SHA-256 over `head` (what the modality's scan depends on) and every candidate's path, label, size
    and mtime: a rerun over a changed source tree is refused."""
    h = hashlib.sha256()
    h.update(head)
    for rel, label in candidates:
        try:
            st = os.stat(src / rel)
            sig = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            sig = "missing"
        h.update(f"{rel}\t{label}\t{sig}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- workers

def pool_context():
    """fork when it is safe (the CLI: one thread, no native thread pools loaded) since it starts in
    milliseconds; otherwise forkserver, because forking a process that runs DALI, ffcv or torch threads
    can deadlock the child on a lock one of those threads held. numba alone starts no thread (the JPEG
    walk is compiled, not parallel); ffcv's import does."""
    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    threaded = ("torch", "nvidia.dali", "ffcv", "cv2")
    if threading.active_count() == 1 and not any(m in sys.modules for m in threaded):
        return mp.get_context("fork")
    return mp.get_context("forkserver")


def ordered_results(jobs: Iterable, pool, window: int, process: Callable, triage: Callable | None = None,
                    finalize: Callable | None = None) -> Iterator:
    """`process(job)` results in job order, run in `pool` (inline without one), at most `window` in
    flight (bounded memory). With `triage`, the parent first runs `triage(job) -> (result or None, kept)`
    and sends only the jobs it leaves open (None) to the pool; `finalize(result, kept)` then completes a
    result with what the parent kept (the image converter keeps the bytes it read, so a worker sends
    back a verdict instead of the file)."""
    pending: deque = deque()

    def done(head):
        r, kept = head
        if isinstance(r, Future):
            r = r.result()
        return finalize(r, kept) if finalize is not None else r

    for job in jobs:
        r, kept = triage(job) if triage is not None else (None, None)
        if r is None:
            if pool is not None:
                r = pool.submit(process, job)
            else:
                r = process(job) if kept is None else process(job, kept)
        pending.append((r, kept))
        while pending and (len(pending) > window or not isinstance(pending[0][0], Future) or pending[0][0].done()):
            yield done(pending.popleft())
    while pending:
        yield done(pending.popleft())


# --------------------------------------------------------------------------------------------- state

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
    totals: dict = field(default_factory=dict)  # the modality's sums over stored samples (total_frames)

    def absorb(self, pos: int, bad: list, actions: Counter, counts: Counter, totals: Counter) -> None:
        self.next_candidate = pos
        self.bad.extend(bad)
        for k, v in actions.items():
            self.actions[k] = self.actions.get(k, 0) + v
        for label, v in counts.items():
            self.class_counts[label] += v
        for k, v in totals.items():
            self.totals[k] = self.totals.get(k, 0) + v


def load_progress(split_dir: Path) -> Progress | None:
    p = split_dir / PROGRESS
    if not p.is_file():
        return None
    with open(p) as f:
        return Progress(**json.load(f))


def check_same_run(cfg: ConvertOptions, previous_args: dict, previous_fp: str | None, fp: str, where: Path,
                   source: str) -> None:
    """Refuse to resume (or add to) `where` when the arguments or the source files differ from the run
    that wrote it; `source` names the source in the message."""
    now = cfg.output_args()
    if previous_args != now:
        diff = {k: (previous_args.get(k), now.get(k)) for k in set(now) | set(previous_args)
                if previous_args.get(k) != now.get(k)}
        detail = ", ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConversionError(f"{where} was written with different arguments ({detail}). Rerun with the "
                              f"same arguments to resume, choose another --out, or pass --overwrite.")
    if previous_fp is not None and previous_fp != fp:
        raise ConversionError(f"{source} changed since {where} was started "
                              f"(files added, removed or modified). Pass --overwrite to start again.")


# ----------------------------------------------------------------------------------------- modality

class Sample(NamedTuple):
    """What a modality stores for one good result: the member (extension, bytes), the metadata that
    follows index/label/class/source in its .json, the action counted in the manifest, and the sums
    it adds to Progress.totals."""
    ext: str
    data: bytes
    meta: dict
    action: str
    totals: dict


class Modality:
    """What a kind of data plugs into the engine (see the module docstring)."""
    name = "convert"  # log prefix
    unit = "sample"  # progress bar unit
    noun = "sample"  # in messages and the summary
    members: tuple[str, ...] = fmt.MEMBER_EXTS

    def __init__(self, cfg: ConvertOptions):
        self.cfg = cfg

    def scan(self) -> Scan:
        raise NotImplementedError

    def source(self) -> str:
        """The source, as a refusal names it."""
        return f"the source tree under {self.cfg.src}/{self.cfg.split}"

    def results(self, sc: Scan, start: int, pool) -> Iterator:
        """(ok, payload) of candidates[start:], in order (see ordered_results)."""
        raise NotImplementedError

    def window(self) -> int:
        return max(64, 32 * self.cfg.workers)

    def sample(self, payload) -> Sample:
        raise NotImplementedError

    def shard_dir(self, out_split: Path) -> Path:
        return out_split

    def extra_outputs(self, prog: Progress, out_split: Path, shard_dir: Path) -> dict | None:
        """Outputs written from the finished shards (the .beton); its manifest entry, or None."""
        return None

    def no_samples(self, prog: Progress, out_split: Path) -> str:
        return f"no usable {self.noun} in {self.cfg.src}/{self.cfg.split} ({len(prog.bad)} bad files)"

    # Extra manifest fields, in the order the manifest lists them.
    def manifest_head(self, sc: Scan) -> dict:
        return {}

    def manifest_counts(self, prog: Progress) -> dict:
        return {}

    def manifest_scan(self, sc: Scan) -> dict:
        return {}

    def manifest_format(self) -> dict:
        return {}


# --------------------------------------------------------------------------------------------- main

def run(mod: Modality) -> dict:
    """Run (or resume) a conversion; returns the manifest."""
    cfg = mod.cfg
    out_split = Path(cfg.out) / cfg.split
    if cfg.overwrite and out_split.exists():
        shutil.rmtree(out_split)
    out_split.mkdir(parents=True, exist_ok=True)
    remove_partials(out_split)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if cfg.progress else (lambda *a: None)

    sc = mod.scan()
    manifest_path = out_split / fmt.MANIFEST
    if manifest_path.is_file():
        with open(manifest_path) as f:
            manifest = json.load(f)
        check_same_run(cfg, manifest["arguments"], manifest.get("source_fingerprint"), sc.fingerprint, out_split,
                       mod.source())
        log(f"[{mod.name}] {out_split} is already complete ({manifest['num_samples']} samples); nothing to do")
        return manifest

    prog = load_progress(out_split)
    if prog is None:
        if any(out_split.iterdir()):
            raise ConversionError(f"{out_split} is not empty and holds no conversion state; choose an empty "
                                  f"--out or pass --overwrite")
        if cfg.strict and sc.bad:
            raise ConversionError(f"--strict: {sc.bad[0]['path']}: {sc.bad[0]['reason']}")
        prog = Progress(args=cfg.output_args(), fingerprint=sc.fingerprint, bad=list(sc.bad),
                        class_counts=[0] * len(sc.classes))
        atomic_write_json(out_split / PROGRESS, asdict(prog), indent=None)
    else:
        check_same_run(cfg, prog.args, prog.fingerprint, sc.fingerprint, out_split, mod.source())
        if prog.next_candidate:
            log(f"[{mod.name}] resuming {out_split}: {len(prog.shards)} shards, {prog.next_index} samples done")

    shard_dir = mod.shard_dir(out_split)
    shard_dir.mkdir(exist_ok=True)
    remove_partials(shard_dir)
    _write_shards(mod, sc, prog, out_split, shard_dir)
    return _finish(mod, sc, prog, out_split, shard_dir)


def _write_shards(mod: Modality, sc: Scan, prog: Progress, out_split: Path, shard_dir: Path) -> None:
    cfg = mod.cfg
    start = prog.next_candidate
    pool = None
    if cfg.workers > 1 and start < len(sc.candidates):
        # concurrent.futures rather than multiprocessing.Pool: Pool.terminate() can deadlock while its
        # task-feeder thread is blocked on a full pipe (seen when --strict stops a run early).
        pool = ProcessPoolExecutor(cfg.workers, mp_context=pool_context())
        pool.submit(int).result()  # start the workers now, before our own threads exist (fork safety)
    bar = tqdm(total=len(sc.candidates), initial=start, unit=mod.unit, desc=f"convert {cfg.split}",
               disable=not cfg.progress, dynamic_ncols=True, smoothing=0.05)
    writer = None
    pos = start
    pending = ([], Counter(), Counter(), Counter())  # bad, actions, class counts, totals
    results = mod.results(sc, start, pool)
    try:
        for ok, payload in results:
            rel, label = sc.candidates[pos]
            pos += 1
            bar.update(1)
            if not ok:
                if cfg.strict:
                    raise ConversionError(f"--strict: {rel}: {payload}")
                pending[0].append({"path": rel, "reason": payload})
                bar.set_postfix(bad=len(prog.bad) + len(pending[0]), refresh=False)
            else:
                s = mod.sample(payload)
                if writer is None:
                    k = len(prog.shards)
                    writer = ShardWriter(shard_dir / fmt.shard_name(cfg.split, k, "tar"),
                                         shard_dir / fmt.shard_name(cfg.split, k, "idx"))
                index = prog.next_index + writer.num_samples
                meta = {"index": index, "label": label, "class": sc.classes[label], "source": rel, **s.meta}
                writer.add(fmt.sample_key(index), {
                    s.ext: s.data,
                    "cls": str(label).encode(),
                    "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode(),
                    "label.i64": np.int64(label).tobytes(),
                    "index.i64": np.int64(index).tobytes(),
                })
                pending[1][s.action] += 1
                pending[2][label] += 1
                pending[3].update(s.totals)
            if writer is not None and (writer.num_samples == cfg.shard_size or pos == len(sc.candidates)):
                # Commit point: shard files first, then the progress record that points past them.
                first, n = prog.next_index, writer.num_samples
                tar_sha, idx_sha, size = writer.close()
                writer = None
                prog.shards.append({"tar": fmt.shard_name(cfg.split, len(prog.shards), "tar"),
                                    "idx": fmt.shard_name(cfg.split, len(prog.shards), "idx"),
                                    "first_index": first, "num_samples": n, "sha256": tar_sha,
                                    "idx_sha256": idx_sha, "bytes": size})
                prog.next_index += n
                prog.absorb(pos, *pending)
                pending = ([], Counter(), Counter(), Counter())
                atomic_write_json(out_split / PROGRESS, asdict(prog), indent=None)
        if writer is None and pos == len(sc.candidates) and prog.next_candidate != pos:
            # Trailing bad files after the last shard: record them too.
            prog.absorb(pos, *pending)
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


def reason_kind(reason: str) -> str:
    """The reason of a bad file without its details (the manifest counts bad files by this)."""
    return reason.split(":")[0].split(" (")[0]


def _finish(mod: Modality, sc: Scan, prog: Progress, out_split: Path, shard_dir: Path) -> dict:
    cfg = mod.cfg
    n = prog.next_index
    if n == 0:
        raise ConversionError(mod.no_samples(prog, out_split))
    beton = mod.extra_outputs(prog, out_split, shard_dir)
    with atomic_open(out_split / fmt.BAD_FILES, "w") as f:
        for b in prog.bad:
            f.write(json.dumps(b, ensure_ascii=False) + "\n")
    shards = prog.shards if shard_dir == out_split else []
    checksum = hashlib.sha256()
    for sh in shards:
        checksum.update(f"{sh['tar']} {sh['sha256']} {sh['idx']} {sh['idx_sha256']}\n".encode())
    if beton:
        checksum.update(f"{beton['file']} {beton['sha256']}\n".encode())
    reasons = Counter(reason_kind(b["reason"]) for b in prog.bad)
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        **mod.manifest_head(sc),
        "split": cfg.split,
        "num_samples": n,
        "num_classes": len(sc.classes),
        "classes": sc.classes,
        "class_counts": prog.class_counts,
        "empty_classes": sc.empty_classes,
        **mod.manifest_counts(prog),
        "num_bad": len(prog.bad),
        "bad_reasons": dict(sorted(reasons.items())),
        "num_ignored": len(sc.ignored),
        "ignored": sc.ignored[:1000],
        **mod.manifest_scan(sc),
        "actions": dict(sorted(prog.actions.items())),
        "members": list(mod.members),
        **mod.manifest_format(),
        "shards": shards,
        "beton": beton,
        "arguments": cfg.output_args(),
        "source_fingerprint": sc.fingerprint,
        "checksum": checksum.hexdigest(),
    }
    atomic_write_json(out_split / fmt.MANIFEST, manifest)
    (out_split / PROGRESS).unlink(missing_ok=True)
    return manifest


def summary(manifest: dict) -> str:
    """The converter's closing report (counts, what was done, bad files by reason)."""
    video = manifest.get("kind") == fmt.VIDEO_KIND
    noun = "video" if video else "image"
    if video:
        head = (f"{manifest['num_samples']} videos ({manifest['total_frames']} frames) in {manifest['num_classes']} "
                f"classes, {len(manifest['shards'])} shards ({manifest['layout']} layout)")
    else:
        head = (f"{manifest['num_samples']} samples in {manifest['num_classes']} classes, "
                f"{len(manifest['shards'])} shards" + (", .beton" if manifest["beton"] else ""))
    lines = [head]
    if manifest["actions"]:
        lines.append("stored as: " + ", ".join(f"{k} {v}" for k, v in manifest["actions"].items()))
    if manifest["empty_classes"]:
        lines.append(f"classes without {noun}s (index kept): {', '.join(manifest['empty_classes'])}")
    if manifest["num_ignored"]:
        lines.append(f"ignored (not {noun} files / sub-folders): {manifest['num_ignored']}")
    if manifest.get("num_unlabeled"):
        lines.append(f"{noun}s without a label (skipped): {manifest['num_unlabeled']}")
    if manifest["num_bad"]:
        lines.append(f"bad files: {manifest['num_bad']} (details in bad_files.jsonl)")
        for k, v in manifest["bad_reasons"].items():
            lines.append(f"  {v:6d}  {k}")
    else:
        lines.append("bad files: none")
    return "\n".join(lines)

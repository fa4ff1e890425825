"""Benchmark the converter against what a user would otherwise run, on the same input, in one run.

    python -m pipeline.bench.convert [--images 1000] [--workers 2] [--max-side 256]   (or make bench-convert)

Rows (images/s over the same synthetic ImageNet-like JPEGs, 150-800 px, all from the page cache):
  ours pass-through     tools/convert_imagenet.py defaults (--verify entropy): WebDataset shards + DALI
                        .idx + .beton; and the same with --verify header (the faster opt-out: structural
                        walk only) and --verify decode (strict full decode), to show what the check costs
  ffcv DatasetWriter    ffcv's writer over a PIL-decoding indexed dataset, RGBImageField(write_mode='jpg')
  ours --max-side N     the same converter re-encoding to a longer side of N (DCT-domain downscale)
  PIL tar writer        PIL open/convert/resize(Lanczos)/save JPEG per image in a Pool, into tar shards
Each writer gets the same number of worker processes. Results are appended to
pipeline/bench/results/convert.csv with the machine, library versions and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.bench import RESULTS as RESULTS_DIR, append_csv
from pipeline.convert import ConvertConfig, convert
from pipeline.synthetic.images import make
from pipeline.versions import versions, versions_text

ROOT = Path(__file__).resolve().parents[2]

RESULTS = RESULTS_DIR / "convert.csv"


def _files(src: Path) -> list[tuple[str, int]]:
    classes = sorted(p.name for p in (src / "train").iterdir())
    return [(str(p), c) for c, name in enumerate(classes) for p in sorted((src / "train" / name).iterdir())]


def _warm(files) -> int:
    return sum(len(Path(f).read_bytes()) for f, _ in files)


class PILDataset:
    """What an ffcv user writes: an indexable dataset returning (HxWx3 uint8 array, label)."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.files[i]
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), label


def run_ffcv(files, out: Path, workers: int) -> float:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    w = DatasetWriter(str(out / "ffcv.beton"), {"image": RGBImageField(write_mode="jpg", jpeg_quality=90),
                                                "label": IntField()}, num_workers=workers)
    t = time.perf_counter()
    w.from_indexed_dataset(PILDataset(files))
    return time.perf_counter() - t


def _pil_job(job):
    from PIL import Image
    path, max_side, quality = job
    with Image.open(path) as im:
        im = im.convert("RGB")
        if max_side and max(im.size) > max_side:
            s = max_side / max(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.LANCZOS)
        b = io.BytesIO()
        im.save(b, "JPEG", quality=quality)
        return b.getvalue()


def run_pil(files, out: Path, workers: int, max_side: int, shard_size: int = 1000) -> float:
    t = time.perf_counter()
    with mp.get_context("forkserver").Pool(workers) as pool:
        tf = None
        for i, data in enumerate(pool.imap(_pil_job, [(f, max_side, 90) for f, _ in files], chunksize=8)):
            if i % shard_size == 0:
                if tf:
                    tf.close()
                tf = tarfile.open(out / f"pil-{i // shard_size:06d}.tar", "w")
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{i:09d}.cls")
            lab = str(files[i][1]).encode()
            info.size = len(lab)
            tf.addfile(info, io.BytesIO(lab))
        tf.close()
    return time.perf_counter() - t


def run_ours(src: Path, out: Path, workers: int, max_side: int | None, verify: str = "entropy") -> tuple[float, dict]:
    import pipeline.convert.beton_writer  # noqa: F401  (import ffcv before timing, as for the ffcv row)
    t = time.perf_counter()
    m = convert(ConvertConfig(src=str(src), out=str(out), split="train", workers=workers, max_side=max_side,
                              verify=verify, progress=False))
    return time.perf_counter() - t, m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="number of synthetic images (default 1000)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes for every writer")
    p.add_argument("--max-side", type=int, default=256, help="longer side for the re-encode rows (default 256)")
    p.add_argument("--src", default=None, help="reuse/create the synthetic input here (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the best is reported")
    p.add_argument("--no-save", action="store_true", help="do not append to pipeline/bench/results/convert.csv")
    a = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    src = Path(a.src) if a.src else tmp / "src"
    classes = 10
    per = max(1, a.images // classes)
    if not (src / "train").is_dir():
        print(f"generating {per * classes} synthetic images in {src} ...", flush=True)
        make(src, classes=classes, train_per_class=per, val_per_class=0, seed=0, progress=True)
    files = _files(src)
    nbytes = _warm(files)
    sizes = []
    from PIL import Image
    for f, _ in files[:200]:
        with Image.open(f) as im:
            sizes.append(max(im.size))
    print(f"{len(files)} JPEGs, {nbytes / len(files) / 1024:.0f} KiB mean, longer side mean {np.mean(sizes):.0f} px; "
          f"{a.workers} workers", flush=True)

    rows = []

    def best(fn):
        times = []
        for r in range(a.repeats):
            out = tmp / f"out_{len(rows)}_{r}"
            out.mkdir()
            times.append(fn(out))
            shutil.rmtree(out)
        return min(times)

    t_ours = best(lambda o: run_ours(src, o, a.workers, None, "entropy")[0])
    rows.append(("ours pass-through, --verify entropy (default)", t_ours))
    t_header = best(lambda o: run_ours(src, o, a.workers, None, "header")[0])
    rows.append(("ours pass-through, --verify header", t_header))
    t_decode = best(lambda o: run_ours(src, o, a.workers, None, "decode")[0])
    rows.append(("ours pass-through, --verify decode", t_decode))
    t_ffcv = best(lambda o: run_ffcv(files, o, a.workers))
    rows.append(("ffcv DatasetWriter (jpg)", t_ffcv))
    t_ours_rs = best(lambda o: run_ours(src, o, a.workers, a.max_side)[0])
    rows.append((f"ours --max-side {a.max_side} (wds+idx+beton)", t_ours_rs))
    t_pil = best(lambda o: run_pil(files, o, a.workers, a.max_side))
    rows.append((f"PIL tar writer (resize {a.max_side})", t_pil))
    shutil.rmtree(tmp, ignore_errors=True)

    n = len(files)
    base = {0: t_ffcv, 1: t_ffcv, 2: t_ffcv, 3: t_ffcv, 4: t_pil, 5: t_pil}
    ratio = {rows[i][0]: base[i] / rows[i][1] for i in range(len(rows))}
    vs = {rows[i][0]: ("vs ffcv" if i < 3 else "vs PIL" if i == 4 else "") for i in range(len(rows))}
    print("\n| writer | images/s | ratio |\n|---|---:|---:|")
    for name, t in rows:
        r = f"{ratio[name]:.1f}x {vs[name]}" if vs[name] else "1.0x"
        print(f"| {name} | {n / t:,.0f} | {r} |")
    print(f"\ncost of the default check: --verify entropy runs at {t_header / t_ours:.2f}x the speed of "
          f"--verify header ({t_decode / t_ours:.2f}x that of --verify decode)")

    if not a.no_save:
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        machine = f"{platform.machine()} {platform.processor() or ''}".strip()
        ver = versions_text(versions("pillow", "simplejpeg", "ffcv", "numpy"))
        append_csv(RESULTS, ["date", "machine", "cpus", "workers", "images", "writer", "seconds", "images_per_s",
                             "ratio", "versions"],
                   [[stamp, machine, os.cpu_count(), a.workers, n, name, f"{t:.3f}", f"{n / t:.1f}",
                     f"{ratio[name]:.2f}", ver] for name, t in rows])
        print(f"\nappended to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

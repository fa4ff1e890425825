#!/usr/bin/env python
"""Read a converted split back through the stock readers and check it.

    python tools/inspect_dataset.py data/inet/train [--sheet sheet.png] [--no-decode]

Reads OUT/<split> with tarfile (raw members), webdataset, DALI's fn.readers.webdataset (with the .idx
files) and ffcv's Loader (.beton); prints the number of samples per class; checks that every global
index 0..N-1 appears exactly once in each format with the same label everywhere; writes a contact
sheet PNG of random samples with their class names. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

from pipeline.format import layout as fmt


def read_tarfile(split_dir: Path, manifest: dict) -> list[tuple[int, int]]:
    """(index, label) from the raw tar members, checking that .json, .cls and the binary fields agree."""
    out = []
    for sh in manifest["shards"]:
        with tarfile.open(split_dir / sh["tar"]) as tf:
            members = {}
            for m in tf:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key, m in members.items():
            meta = json.loads(m["json"])
            idx = int(np.frombuffer(m["index.i64"], "<i8")[0])
            lab = int(np.frombuffer(m["label.i64"], "<i8")[0])
            if idx != meta["index"] or lab != meta["label"] or int(m["cls"]) != lab or key != fmt.sample_key(idx):
                raise AssertionError(f"{sh['tar']}: sample {key} members disagree")
            out.append((idx, lab))
    return out


def read_webdataset(split_dir: Path, manifest: dict) -> list[tuple[int, int]]:
    import webdataset as wds
    urls = [str(split_dir / sh["tar"]) for sh in manifest["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("json", "cls")
    return [(json.loads(j)["index"], int(c)) for j, c in ds]


def read_dali(split_dir: Path, manifest: dict, decode: bool, batch_size: int = 64) -> list[tuple[int, int]]:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    tars = [str(split_dir / sh["tar"]) for sh in manifest["shards"]]
    idxs = [str(split_dir / sh["idx"]) for sh in manifest["shards"]]
    gpu = _cuda_available()

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=0 if gpu else None, prefetch_queue_depth=1)
    def pipe():
        jpg, label, index = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg", "label.i64", "index.i64"],
            dtypes=[types.UINT8, types.INT64, types.INT64], missing_component_behavior="error",
            random_shuffle=False, pad_last_batch=True, name="reader")
        if decode:
            img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
            return label, index, img.shape()  # returned so that the decoder is not pruned
        return label, index

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    out = []
    while len(out) < n:
        res = p.run()
        labels, indices = res[0], res[1]
        for i in range(len(labels)):
            if len(out) < n:
                out.append((int(np.asarray(indices[i]).ravel()[0]), int(np.asarray(labels[i]).ravel()[0])))
    return out


def read_ffcv(split_dir: Path, manifest: dict, decode: bool) -> list[tuple[int, int]]:
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    pipelines = {"label": [IntDecoder()], "index": [IntDecoder()]}
    pipelines["image"] = [CenterCropRGBImageDecoder((32, 32), 1.0)] if decode else None
    loader = Loader(str(split_dir / manifest["beton"]["file"]), batch_size=64, num_workers=2,
                    order=OrderOption.SEQUENTIAL, drop_last=False, pipelines=pipelines)
    out = []
    for batch in loader:
        label, index = batch[-2], batch[-1]
        out.extend(zip(np.asarray(index).ravel().tolist(), np.asarray(label).ravel().tolist()))
    return out


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def check_exactly_once(name: str, pairs, truth: dict[int, int], n: int) -> list[str]:
    problems = []
    indices = [i for i, _ in pairs]
    counts = np.bincount(np.clip(indices, 0, n), minlength=n + 1) if indices else np.zeros(n + 1, int)
    missing = np.flatnonzero(counts[:n] == 0)
    dup = np.flatnonzero(counts[:n] > 1)
    if len(pairs) != n or len(missing) or len(dup) or counts[n]:
        problems.append(f"{name}: {len(pairs)} samples read for {n}; missing {missing[:10].tolist()}, "
                        f"duplicated {dup[:10].tolist()}")
    wrong = [(i, lab) for i, lab in pairs if truth.get(i) != lab]
    if wrong:
        problems.append(f"{name}: {len(wrong)} labels differ from the shards, e.g. {wrong[:5]}")
    return problems


def contact_sheet(split_dir: Path, manifest: dict, path: Path, n: int = 48, seed: int = 0, cols: int = 8,
                  cell: int = 128) -> Path:
    """Random samples as a grid, each captioned with its class and global index."""
    import io

    from PIL import Image, ImageDraw

    from pipeline.format.shard_index import iter_shard
    rng = np.random.default_rng(seed)
    total = manifest["num_samples"]
    want = set(rng.choice(total, size=min(n, total), replace=False).tolist())
    picked = []
    for sh in manifest["shards"]:
        lo, hi = sh["first_index"], sh["first_index"] + sh["num_samples"]
        if not any(lo <= w < hi for w in want):
            continue
        for key, m in iter_shard(split_dir / sh["tar"]):
            if int(key) in want:
                picked.append((int(key), json.loads(m["json"]), m["jpg"]))
    picked.sort()
    rows = (len(picked) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 14)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (idx, meta, jpg) in enumerate(picked):
        im = Image.open(io.BytesIO(jpg)).convert("RGB")
        im.thumbnail((cell - 4, cell - 4))
        x, y = (k % cols) * cell, (k // cols) * (cell + 14)
        sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        draw.text((x + 2, y + cell), f"{meta['class']} #{idx}"[:22], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def inspect(split_dir: str | Path, decode: bool = True, sheet: str | Path | None = None,
            formats: tuple[str, ...] = ("tarfile", "webdataset", "dali", "ffcv")) -> dict:
    split_dir = Path(split_dir)
    manifest = fmt.load_manifest(split_dir)
    n = manifest["num_samples"]
    report = {"num_samples": n, "problems": [], "read": {}}
    truth = None
    if manifest["shards"]:
        pairs = read_tarfile(split_dir, manifest)
        truth = dict(pairs)
        report["read"]["tarfile"] = len(pairs)
        report["problems"] += check_exactly_once("tarfile", pairs, truth, n)
        if "webdataset" in formats:
            pairs = read_webdataset(split_dir, manifest)
            report["read"]["webdataset"] = len(pairs)
            report["problems"] += check_exactly_once("webdataset", pairs, truth, n)
        if "dali" in formats:
            pairs = read_dali(split_dir, manifest, decode)
            report["read"]["dali"] = len(pairs)
            report["problems"] += check_exactly_once("dali", pairs, truth, n)
    if manifest["beton"] and "ffcv" in formats:
        pairs = read_ffcv(split_dir, manifest, decode)
        report["read"]["ffcv"] = len(pairs)
        if truth is None:
            truth = dict(pairs)
        report["problems"] += check_exactly_once("ffcv", pairs, truth, n)
    counts = np.bincount(list(truth.values()) if truth else [], minlength=manifest["num_classes"])
    report["class_counts"] = {c: int(k) for c, k in zip(manifest["classes"], counts)}
    if truth is not None and counts.tolist() != manifest["class_counts"]:
        report["problems"].append("per-class counts differ from manifest.json")
    if sheet and manifest["shards"]:
        report["sheet"] = str(contact_sheet(split_dir, manifest, Path(sheet)))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("split_dir", help="a converted split, e.g. OUT/train")
    p.add_argument("--sheet", default=None, help="contact sheet PNG path (default: SPLIT_DIR/contact_sheet.png)")
    p.add_argument("--no-sheet", action="store_true", help="do not write a contact sheet")
    p.add_argument("--no-decode", action="store_true", help="do not decode images in DALI / ffcv (faster)")
    p.add_argument("--readers", default="tarfile,webdataset,dali,ffcv", help="comma list of readers to use")
    a = p.parse_args(argv)
    split_dir = Path(a.split_dir)
    sheet = None if a.no_sheet else Path(a.sheet or split_dir / "contact_sheet.png")
    try:
        rep = inspect(split_dir, decode=not a.no_decode, sheet=sheet, formats=tuple(a.readers.split(",")))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(c) for c in rep["class_counts"]) if rep["class_counts"] else 5
    print(f"{'class':<{width}}  samples")
    for c, k in rep["class_counts"].items():
        print(f"{c:<{width}}  {k:7d}")
    print(f"total: {rep['num_samples']}")
    for r, k in rep["read"].items():
        print(f"read back through {r}: {k} samples")
    if rep.get("sheet"):
        print(f"contact sheet: {rep['sheet']}")
    if rep["problems"]:
        for prob in rep["problems"]:
            print(f"FAIL {prob}")
        return 1
    print("OK: every global index appears exactly once in each format, with the same label")
    return 0


if __name__ == "__main__":
    sys.exit(main())

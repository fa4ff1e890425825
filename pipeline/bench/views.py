"""Throughput of the view loaders next to a plain PIL + torch DataLoader and decode-only, one run.

    python -m pipeline.bench [--data DIR] [--images 512] [--batch-size 64] [--workers 2] [--seconds 20]

Data: DIR/train (default /tmp/infoview_bench/train) is made on first use: `--images` procedurally generated
JPEGs of ImageNet-like sizes (150-800 px a side, ~110 kB at quality 90; tools/make_synthetic.py) run
through the converter (shards + .idx + .beton). Rows (samples/s, 2-view simclr at 224 px unless
noted) are printed and appended to pipeline/bench/results/views.csv with machine, versions and date.

- decode-only (dali reader): `fn.readers.webdataset` over the shards and their index files +
  `fn.decoders.image` on the CPU: images/s, the ceiling for anything that decodes every image once.
- decode-only (PIL): the same JPEGs decoded by PIL in a DataLoader with `--workers` processes.
- pil-dataloader: the simclr recipe written with PIL ops (RandomResizedCrop, flip, ColorJitter p=0.8,
  grayscale p=0.2, Gaussian blur p=0.5, normalize), 2 views, DataLoader with `--workers` processes.
- dali / ffcv: `build_loader(recipe="simclr", backend=..., num_threads=--workers)`.
- with a GPU: dali and ffcv with device="cuda" (CPU threads used = --workers).
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import RESULTS as RESULTS_DIR, append_csv
from pipeline.versions import versions, versions_text

RESULTS = RESULTS_DIR / "views.csv"


def make_data(root: Path, images: int) -> Path:
    split = root / "train"
    if (split / "manifest.json").is_file():
        return split
    from pipeline.convert import ConvertConfig, convert
    from pipeline.synthetic.images import make
    src = root / "src"
    classes = 8
    make(src, classes=classes, train_per_class=-(-images // classes), val_per_class=0, seed=0, progress=True)
    convert(ConvertConfig(src=str(src), out=str(root), split="train", shard_size=256, workers=2, progress=True))
    return split


def timed(batches, seconds: float, warmup: int = 2) -> float:
    """Samples per second over at most `seconds` after `warmup` batches (counting samples of batch[0])."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += b
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def _count(loader):
    for b in loader:
        yield len(b.index)


def decode_only_dali(split: Path, batch: int, workers: int, seconds: float) -> float:
    from nvidia.dali import fn, pipeline_def, types
    tars = sorted(str(p) for p in split.glob("*.tar"))
    idxs = [p[:-4] + ".idx" for p in tars]

    @pipeline_def(batch_size=batch, num_threads=workers, device_id=None)
    def pipe():
        jpg = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg"], dtypes=[types.UINT8],
                                     missing_component_behavior="error", name="r")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()

    def gen():
        while True:
            p.run()
            yield batch
    return timed(gen(), seconds)


class _Jpegs(torch.utils.data.Dataset):
    def __init__(self, split: Path, transform):
        from pipeline.format.shard_index import ShardIndex
        self.split, self.transform = split, transform
        self.n = ShardIndex(split).num_samples
        self.index = None

    def __len__(self):
        return 10 ** 9  # endless: the benchmark stops on time

    def __getitem__(self, i):
        from PIL import Image
        from pipeline.format.shard_index import ShardIndex
        if self.index is None:
            self.index = ShardIndex(self.split)
        data, label = self.index.read(i % self.n)
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB"))


def _decode(im):
    return torch.zeros(1)


def _pil_simclr(im):
    """SimCLR's torchvision recipe written with PIL + numpy (torchvision is not available here)."""
    import random
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps
    out = []
    for _ in range(2):
        w, h = im.size
        area = w * h
        for _ in range(10):
            ta = area * random.uniform(0.08, 1.0)
            ar = np.exp(random.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(ta * ar))), int(round(np.sqrt(ta / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = random.randint(0, w - cw), random.randint(0, h - ch)
                break
        else:
            cw, ch, x, y = w, h, 0, 0
        v = im.resize((224, 224), Image.BILINEAR, box=(x, y, x + cw, y + ch))
        if random.random() < 0.5:
            v = ImageOps.mirror(v)
        if random.random() < 0.8:
            ops = [lambda t: ImageEnhance.Brightness(t).enhance(random.uniform(0.2, 1.8)),
                   lambda t: ImageEnhance.Contrast(t).enhance(random.uniform(0.2, 1.8)),
                   lambda t: ImageEnhance.Color(t).enhance(random.uniform(0.2, 1.8)),
                   lambda t: _hue(t, random.uniform(-0.2, 0.2))]
            random.shuffle(ops)
            for op in ops:
                v = op(v)
        if random.random() < 0.2:
            v = v.convert("L").convert("RGB")
        if random.random() < 0.5:
            v = v.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0)))
        t = torch.from_numpy(np.asarray(v, np.float32) / 255).permute(2, 0, 1)
        out.append((t - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None])
    return torch.stack(out)


def _hue(img, h):
    from PIL import Image
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(h * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def pil_loader(split, transform, batch, workers):
    dl = torch.utils.data.DataLoader(_Jpegs(split, transform), batch_size=batch, num_workers=workers,
                                     sampler=torch.utils.data.RandomSampler(range(10 ** 7)), persistent_workers=False,
                                     prefetch_factor=2)
    for b in dl:
        yield len(b)


def _versions() -> str:
    return versions_text(versions("torch", "dali", "ffcv", "numpy"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/tmp/infoview_bench")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--only", default="", help="comma list of rows to run (default all)")
    args = ap.parse_args(argv)
    from pipeline import build_loader
    split = make_data(Path(args.data), args.images)
    B, Wk, T = args.batch_size, args.workers, args.seconds
    torch.set_num_threads(Wk)

    def loader(backend, device="cpu"):
        # One loader for the whole run, advanced with set_epoch() as a trainer does: building a new
        # one per epoch would time graph construction / JIT compilation instead of throughput.
        ld = build_loader(split.parent, recipe="simclr", backend=backend, batch_size=B, image_size=224,
                          num_threads=Wk, device=device)

        def gen():
            epoch = 0
            while True:
                ld.set_epoch(epoch)
                yield from _count(ld)
                epoch += 1
        return gen()

    rows = {
        "decode-only (dali fn.readers.webdataset, cpu)": lambda: decode_only_dali(split, B, Wk, T),
        "decode-only (PIL, DataLoader)": lambda: timed(pil_loader(split, _decode, B, Wk), T),
        "pil-dataloader simclr 2x224": lambda: timed(pil_loader(split, _pil_simclr, B, Wk), T),
        "dali simclr 2x224 (cpu)": lambda: timed(loader("dali"), T),
        "ffcv simclr 2x224 (cpu)": lambda: timed(loader("ffcv"), T),
    }
    if torch.cuda.is_available():
        rows["dali simclr 2x224 (cuda)"] = lambda: timed(loader("dali", "cuda"), T)
        rows["ffcv simclr 2x224 (cuda)"] = lambda: timed(loader("ffcv", "cuda"), T)
    only = [s for s in args.only.split(",") if s]
    cores = len(os.sched_getaffinity(0))
    machine = f"{platform.node()} {platform.processor() or platform.machine()}, {cores} cores" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    date = datetime.datetime.now().isoformat(timespec="seconds")
    results = {}
    for name, fn in rows.items():
        if only and not any(o in name for o in only):
            continue
        results[name] = fn()
        print(f"{name:48s} {results[name]:8.1f} samples/s", flush=True)
    base = results.get("pil-dataloader simclr 2x224")
    append_csv(RESULTS, ["date", "machine", "versions", "row", "samples_per_s", "vs_pil", "batch_size", "workers",
                         "images"],
               [[date, machine, _versions(), name, f"{v:.1f}", f"{v / base:.2f}" if base else "", B, Wk, args.images]
                for name, v in results.items()])
    print("\n| pipeline | samples/s | vs PIL |\n|---|---:|---:|")
    for name, v in results.items():
        print(f"| {name} | {v:.0f} | {v / base:.2f}x |" if base else f"| {name} | {v:.0f} | |")
    print(f"\n{machine}; {_versions()}; batch {B}, {Wk} workers/threads; rows appended to {RESULTS}")


if __name__ == "__main__":
    main()

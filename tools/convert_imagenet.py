#!/usr/bin/env python
"""Convert an ImageNet-layout image tree into WebDataset shards (+ DALI index) and an FFCV .beton.

    python tools/convert_imagenet.py --src /data/imagenet --out /data/inet --split train
    python tools/convert_imagenet.py --src /data/imagenet --out /data/inet --split val --max-side 512

Rerunning the same command resumes an interrupted conversion and ends byte-identical to an
uninterrupted run. See pipeline/convert/engine.py for the ordering and resume rules and
pipeline/convert/image_codec.py for how each kind of input file is stored.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.convert import ConversionError, ConvertConfig, convert, summary
from pipeline.convert.image_codec import DEFAULT_MAX_PIXELS, DEFAULT_VERIFY, VERIFY_MODES


def parse_args(argv=None) -> ConvertConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True,
                   help="dataset root holding SPLIT/<class>/*.JPEG (ImageNet layout); a flat SPLIT/ of images "
                        "is labelled from LOC_val_solution.csv (in SRC or SRC/val, or --val-labels)")
    p.add_argument("--out", required=True, help="output root; files go to OUT/SPLIT/")
    p.add_argument("--split", default="train", help="split folder name under --src (default: train)")
    p.add_argument("--formats", default="wds,ffcv",
                   help="comma list: wds (tar shards + DALI .idx), ffcv (.beton). Default: both")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--max-side", type=int, default=None,
                   help="downscale images whose longer side exceeds this (never upscale). Without it, and "
                        "when no colour conversion is needed, the original JPEG bytes are kept untouched")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality for re-encoded images (default: 90)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sample order (global indices and shard contents depend on it)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad file instead of reporting it")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N files of each class (quick trials)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images whose header announces more pixels (default: {DEFAULT_MAX_PIXELS})")
    p.add_argument("--verify", choices=VERIFY_MODES, default=DEFAULT_VERIFY,
                   help="check of JPEGs kept byte for byte. 'entropy' (default): the loaders' structural walk "
                        "plus a strict 1/8-scale decode that reads every Huffman code (catches corrupt "
                        "entropy-coded data); 'decode': a strict full-size decode instead; 'header': the "
                        "structural walk only (faster: see the README's converter benchmark; misses garbage "
                        "without 0xFF bytes in the entropy-coded data)")
    p.add_argument("--val-labels", default=None, help="label CSV (ImageId,PredictionString) for a flat split")
    p.add_argument("--overwrite", action="store_true", help="delete OUT/SPLIT first instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    return ConvertConfig(src=a.src, out=a.out, split=a.split,
                         formats=tuple(f.strip() for f in a.formats.split(",") if f.strip()),
                         workers=a.workers, shard_size=a.shard_size, max_side=a.max_side, quality=a.quality,
                         seed=a.seed, strict=a.strict, limit=a.limit, max_pixels=a.max_pixels, verify=a.verify,
                         val_labels=a.val_labels, overwrite=a.overwrite, progress=not a.no_progress)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        manifest = convert(cfg)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

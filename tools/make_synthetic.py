#!/usr/bin/env python
"""CLI of pipeline/synthetic/images.py (its docstring is this command's --help)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.synthetic import images  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=images.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output root (train/, val/, LOC_val_solution.csv)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10, up to 48 distinct "
                                                          "shape x texture pairs, then texture frequency varies)")
    p.add_argument("--train-per-class", type=int, default=100, help="train images per class (default 100)")
    p.add_argument("--val-per-class", type=int, default=20, help="val images per class (default 20; 0: no val)")
    p.add_argument("--val-layout", choices=("flat", "folders"), default="flat",
                   help="flat val/ + LOC_val_solution.csv (ImageNet style) or val/<wnid>/ folders")
    p.add_argument("--seed", type=int, default=0, help="seed (same seed, same bytes)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--with-bad-files", action="store_true", help="add the bad-input zoo to train/")
    p.add_argument("--easy", action="store_true", help="a shape and a texture per class, larger objects, at most "
                                                       "one background blob (see above; for short SSL runs)")
    p.add_argument("--side-range", type=int, nargs=2, default=(150, 800), metavar=("MIN", "MAX"),
                   help="image side range in px (default 150 800)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.classes < 1 or a.train_per_class < 0 or a.val_per_class < 0:
        p.error("--classes must be >= 1 and the per-class counts >= 0")
    if not 16 <= a.side_range[0] <= a.side_range[1]:
        p.error("--side-range needs 16 <= MIN <= MAX")
    images.make(Path(a.out), a.classes, a.train_per_class, a.val_per_class, a.seed, a.val_layout, a.quality,
         a.with_bad_files, not a.no_progress, a.easy, tuple(a.side_range))
    return 0


if __name__ == "__main__":
    sys.exit(main())

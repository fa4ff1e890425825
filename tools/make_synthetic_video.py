#!/usr/bin/env python
"""Write a small synthetic video dataset whose classes are motions (UCF101 or Kinetics layout).

    python tools/make_synthetic_video.py --out data/synth_ucf --classes 8 --per-class 12
    python tools/make_synthetic_video.py --out data/synth_k --layout kinetics --classes 8 --per-class 12

UCF101 layout: OUT/<Class>/v_<Class>_gXX_cYY.avi (MPEG-4 Part 2, like the release; --container mp4 writes
H.264 MP4s, mix alternates) and OUT/ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt in UCF101's
formats ("Class/v_x.avi 1" / "Class/v_x.avi"; groups g01, g05, g09, ... are the test list).
Kinetics layout: OUT/{train,val}.csv (label,youtube_id,time_start,time_end,split) and
OUT/{train,val}/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4 (H.264).

Class c moves the main object with motion c % 8 (right, left, down, up, clockwise, counter-clockwise,
grow, shrink) at speed tier c // 8; shape, colours, position, size, background, distractors and noise
are drawn per video. --class-cues shape+motion also gives class c its own object shape (one of 8, c % 8)
and a 1.5x larger object, so that shape and motion both identify the class while colours and background
stay nuisance (see pipeline/synthetic/video.py). --class-cues easy gives class c its own shape AND its
own texture on a larger object (motion as above) over a plain one-colour-per-video background (no blobs,
no distractors): a set a short CVRL run learns (tests/test_video_train.py). Deterministic for a seed.
--with-bad-files adds the converter's bad-input zoo (zero-byte, truncated, text named .mp4, header only,
audio only, variable frame rate, H.264 4:4:4, odd size, 4000x3000) to the train split (UCF: listed in
trainlist01.txt; Kinetics: rows of train.csv, plus a row whose file is missing). See
pipeline/synthetic/video.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.synthetic.video import CLASS_CUES, make_kinetics, make_ucf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--layout", choices=("ucf", "kinetics"), default="ucf", help="dataset layout (default: ucf)")
    p.add_argument("--classes", type=int, default=8, help="number of classes (default 8; beyond 8 the speed varies)")
    p.add_argument("--per-class", type=int, default=8, help="videos per class (Kinetics: train) (default 8)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="Kinetics: val videos per class (default: per-class // 4, at least 1)")
    p.add_argument("--frames", type=int, default=32, help="frames per video (default 32)")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    p.add_argument("--fps", type=int, default=16, help="frame rate (default 16)")
    p.add_argument("--container", choices=("avi", "mp4", "mix"), default="avi",
                   help="UCF layout: avi (MPEG-4 Part 2), mp4 (H.264) or mix (alternating); Kinetics: always mp4")
    p.add_argument("--seed", type=int, default=0, help="seed (same seed, same bytes)")
    p.add_argument("--class-cues", choices=CLASS_CUES, default="motion",
                   help="what identifies a class: motion (default), shape+motion (class c also fixes the shape) or "
                        "easy (shape and texture per class, larger object, plain background)")
    p.add_argument("--with-bad-files", action="store_true", help="add the bad-input zoo to the train split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.classes < 1 or a.per_class < 0 or a.frames < 2 or a.size < 16 or a.fps < 1:
        p.error("want --classes >= 1, --per-class >= 0, --frames >= 2, --size >= 16, --fps >= 1")
    if a.layout == "ucf":
        make_ucf(Path(a.out), a.classes, a.per_class, a.frames, a.size, a.fps, a.seed, a.container,
                 a.with_bad_files, progress=not a.no_progress, class_cues=a.class_cues)
    else:
        make_kinetics(Path(a.out), a.classes, a.per_class, a.val_per_class, a.frames, a.size, a.fps, a.seed,
                      a.with_bad_files, progress=not a.no_progress, class_cues=a.class_cues)
    return 0


if __name__ == "__main__":
    sys.exit(main())

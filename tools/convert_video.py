#!/usr/bin/env python
"""Convert a UCF101-, Kinetics- or class-folder video tree into WebDataset shards (+ DALI index) of H.264 MP4s.

    python tools/convert_video.py --src /data/UCF-101 --out /data/ucf --split train --split-file trainlist01.txt
    python tools/convert_video.py --src /data/UCF-101 --out /data/ucf --split val --split-file testlist01.txt
    python tools/convert_video.py --src /data/kinetics400 --out /data/k400 --split train --max-side 320
    python tools/convert_video.py --src /data/myvideos --out /data/mine --split train     # SRC/train/<class>/*.mp4

Layouts (--layout auto detects them):
  ucf       SRC/<Class>/v_<Class>_gXX_cYY.avi, labels from SRC/ucfTrainTestlist/classInd.txt (else sorted
            class folders); --split-file (trainlist01.txt, testlist01.txt, ...) selects the videos, without
            it every video of every class folder is converted
  kinetics  SRC/<split>.csv (label,youtube_id,time_start,time_end,split; val.csv or validate.csv for
            --split val), files SRC/<split>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4 (or
            SRC/<label>/...); labels = sorted unique labels of SRC/train.csv (else of the split's CSV);
            rows whose file is absent are reported as "missing"
  folder    SRC/<split>/<class>/<video> (any video extension), as tools/convert_imagenet.py reads images:
            label = index of the class folder in sorted order; other files and sub-folders are ignored
            and counted

Each sample is one MP4 (H.264, yuv420p): an H.264 MP4 source with a constant frame rate and keyframes
at most --max-gop frames apart is stored byte for byte; everything else is re-encoded (libx264, a
keyframe every --keyint frames, constant frame rate). Rerunning the same command resumes an interrupted
conversion and ends byte-identical to an uninterrupted run. See pipeline/convert/engine.py for the
ordering and resume rules and pipeline/convert/video_codec.py for what is stored.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.convert import ConversionError, summary
from pipeline.convert.video import LAYOUTS, VideoConvertConfig, convert_video
from pipeline.convert.video_codec import DEFAULT_MAX_PIXELS, X264_PRESETS


def parse_args(argv=None) -> VideoConvertConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="dataset root (UCF101, Kinetics or SRC/<split>/<class>/ layout)")
    p.add_argument("--out", required=True, help="output root; files go to OUT/SPLIT/")
    p.add_argument("--split", default="train", help="output split name (Kinetics: also the CSV / folder name); "
                                                    "default: train")
    p.add_argument("--split-file", default=None,
                   help="UCF101 list (trainlist01.txt, testlist01.txt; looked up as given, in SRC/ucfTrainTestlist "
                        "and in SRC) or a Kinetics CSV; default: UCF all videos, Kinetics SRC/SPLIT.csv")
    p.add_argument("--layout", choices=("auto", *LAYOUTS), default="auto",
                   help="source layout (default: auto: a Kinetics CSV or a UCF101 list folder decide, else "
                        "SRC/SPLIT/<class>/ folders with videos, else UCF101 class folders)")
    p.add_argument("--max-side", type=int, default=None,
                   help="downscale videos whose longer side exceeds this (re-encodes them; never upscales)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse videos with more pixels per frame (default: {DEFAULT_MAX_PIXELS}, 4096x2160) unless "
                        f"--max-side brings them under it")
    p.add_argument("--reencode", choices=("auto", "always", "never"), default="auto",
                   help="auto: pass H.264 MP4s with a constant frame rate, yuv420p and keyframes at most --max-gop "
                        "apart through byte for byte, re-encode the rest; always: re-encode everything; never: "
                        "report what would need re-encoding as a bad file (default: auto)")
    p.add_argument("--keyint", type=int, default=16,
                   help="keyframe interval of re-encoded videos, frames (default: 16)")
    p.add_argument("--max-gop", type=int, default=64,
                   help="longest keyframe interval (frames) a pass-through source may have (default: 64)")
    p.add_argument("--crf", type=int, default=23, help="libx264 CRF of re-encoded videos (default: 23)")
    p.add_argument("--preset", choices=X264_PRESETS, default="veryfast", help="libx264 preset (default: veryfast)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--shard-size", type=int, default=128, help="videos per shard (default: 128)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sample order (global indices and shard contents depend on it)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad file instead of reporting it")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N videos of each class (quick trials)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT/SPLIT first instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return VideoConvertConfig(src=a.src, out=a.out, split=a.split, split_file=a.split_file, layout=a.layout,
                              workers=a.workers, shard_size=a.shard_size, max_side=a.max_side,
                              max_pixels=a.max_pixels, reencode=a.reencode, keyint=a.keyint, max_gop=a.max_gop,
                              crf=a.crf, preset=a.preset, seed=a.seed, strict=a.strict, limit=a.limit,
                              overwrite=a.overwrite, progress=not a.no_progress)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        manifest = convert_video(cfg)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

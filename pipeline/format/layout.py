"""The on-disk layout of a converted split, shared by the converters (writers) and the loaders (readers).

OUT/<split>/
  <split>-NNNNNN.tar     WebDataset shards; sample key = zero-padded global index
  <split>-NNNNNN.idx     DALI index of the shard (the format `wds2idx` writes, v1.2)
  <split>.beton          FFCV file: fields image (JPEG), label, index; sample id == global index
  manifest.json          counts, classes, shards with their index ranges, arguments, checksum
  bad_files.jsonl        one {"path", "reason"} per rejected input

Members of a sample (in this order):
  KEY.jpg        baseline RGB JPEG
  KEY.cls        ASCII decimal label (webdataset convention)
  KEY.json       {"index", "label", "class", "source", "width", "height"}
  KEY.label.i64  label as 8-byte little-endian int64 (DALI's reader returns it as a typed tensor)
  KEY.index.i64  global index, likewise
"""

from __future__ import annotations

import json
from pathlib import Path

MEMBER_EXTS = ("jpg", "cls", "json", "label.i64", "index.i64")
KEY_DIGITS = 9
MANIFEST = "manifest.json"
BAD_FILES = "bad_files.jsonl"
FORMAT_VERSION = 1

# Video splits (tools/convert_video.py) share the layout above without the .beton; their manifest has
# "kind": "video". Members of a video sample, in this order:
#   KEY.mp4        H.264 (yuv420p) in MP4
#   KEY.cls        ASCII decimal label
#   KEY.json       {"index", "label", "class", "source", "fps", "num_frames", "duration", "width", "height", "keyint"}
#   KEY.label.i64  label, 8-byte little-endian int64
#   KEY.index.i64  global index, likewise
VIDEO_MEMBER_EXTS = ("mp4", "cls", "json", "label.i64", "index.i64")
VIDEO_KIND = "video"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(split: str, shard: int, ext: str) -> str:
    return f"{split}-{shard:06d}.{ext}"


def beton_name(split: str) -> str:
    return f"{split}.beton"


def load_manifest(split_dir: str | Path) -> dict:
    """Read OUT/<split>/manifest.json, with an error that says what to do when it is missing."""
    split_dir = Path(split_dir)
    path = split_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {split_dir} is not a converted split (or its conversion has not "
            f"finished). Run tools/convert_imagenet.py --out {split_dir.parent} --split {split_dir.name} first.")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}: re-run the converter with this version.")
    return manifest


def manifest_kind(split_dir: str | Path) -> str:
    """The manifest's "kind" ("image" when absent: the image converter does not write one)."""
    return str(load_manifest(split_dir).get("kind", "image"))

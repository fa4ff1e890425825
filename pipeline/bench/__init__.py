"""Pipeline benchmarks, each against what a user would otherwise run, in the same run: conversion
(`convert`), view loading (`views`) and video decoding (`video_decode`). Results are appended to
pipeline/bench/results/<name>.csv with the machine, versions and date (`common`)."""

from __future__ import annotations


import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def append_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """Append `rows` to a results CSV, with `header` first when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerows(rows)

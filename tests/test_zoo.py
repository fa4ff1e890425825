"""The method zoo (train/zoo.py, `make bench-methods`) end to end at its --quick budget: synthetic data ->
convert -> pretrain -> linear_eval of the trained and the random-init encoder -> CSV row, PNG, table."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PERCENT_COLUMNS = ("knn20", "knn200", "linear_top1", "random_knn20", "random_knn200", "random_linear_top1")


def zoo(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # One torch thread per command (--threads 1): the suite shares a 2-core machine.
    return subprocess.run([sys.executable, "-m", "train.zoo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_quick_zoo_writes_a_row_a_png_and_a_table(tmp_path):
    """~30 s on one thread of the 2-core VM (data 10 s, 4 SimCLR steps, two probes). The results go to
    tmp_path: the committed train/results/zoo.csv is never touched."""
    results = tmp_path / "res" / "zoo.csv"
    committed = ROOT / "train" / "results" / "zoo.csv"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    t0 = time.time()
    r = zoo("--quick", "--methods", "simclr", "--work", str(tmp_path / "work"), "--results", str(results),
            "--threads", "1", "--progress", "off")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(results.open()))
    assert [x["method"] for x in rows] == ["simclr"], rows
    row = rows[0]
    for col in PERCENT_COLUMNS:
        v = float(row[col])
        assert math.isfinite(v) and 0 <= v <= 100, (col, row[col])
    for col in ("delta_knn20", "delta_linear_top1"):
        assert math.isfinite(float(row[col])) and abs(float(row[col])) <= 100, (col, row[col])
    assert abs(float(row["delta_knn20"]) - (float(row["knn20"]) - float(row["random_knn20"]))) < 0.02
    assert row["data"] == "image" and row["budget"] == "quick" and row["epochs"] == "1" and row["batch"] == "16"
    assert int(row["steps"]) == 64 // 16 and row["image_size"] == "32" and row["classes"] == "4"
    assert float(row["pretrain_s"]) > 0 and "torch=" in row["versions"] and row["machine"] and row["date"]
    png = results.with_suffix(".png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| simclr | image |" in r.stdout, r.stdout[-2000:]
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == before
    print(f"quick zoo (simclr): {time.time() - t0:.0f} s")


def test_unknown_method_fails_naming_the_known_ones(tmp_path):
    from train.methods import known
    r = zoo("--methods", "simclr,nosuch", "--work", str(tmp_path), "--results", str(tmp_path / "z.csv"), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "nosuch" in r.stderr and all(m in r.stderr for m in known()), r.stderr
    assert not (tmp_path / "z.csv").exists() and not any(tmp_path.iterdir())

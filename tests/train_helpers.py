"""Helpers the trainer tests share: a one-thread environment for subprocess runs, and the probe of a
pretrained backbone against a random-init encoder that the learning tests assert on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def env1() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def trained_vs_random(backbone: Path, random_args: list[str], data: Path, tmp_path: Path, seed: str):
    """train/linear_eval.py (kNN + linear probe) of `backbone` and of a random-init encoder built from
    `random_args`; returns ({"trained": result, "random": result}, a one-line summary)."""
    res = {}
    for name, extra in (("trained", ["--backbone", str(backbone)]), ("random", ["--random-init", *random_args])):
        r = subprocess.run([PY, str(ROOT / "train" / "linear_eval.py"), *extra, "--data", str(data),
                            "--out", str(tmp_path / f"{name}.json"), "--iters", "50", "--seed", seed], env=env1(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())
    tr, rd = res["trained"], res["random"]
    line = (f"seed {seed}: kNN@20 trained {tr['knn@20']:.1f} vs random init {rd['knn@20']:.1f} "
            f"({tr['knn@20'] - rd['knn@20']:+.1f}); linear top-1 {tr['top1']:.1f} vs {rd['top1']:.1f}")
    return res, line

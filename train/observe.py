"""Run records: config.json (config, versions, device, git), metrics.jsonl, report.png, progress bar."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path


def versions() -> dict:
    from pipeline.versions import versions as installed
    v = installed("torch", "accelerate", "triton", "numpy", "safetensors", "dali", "ffcv")
    v["platform"] = platform.platform()
    return v


def git_rev(root: Path) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def write_run_config(run_dir: Path, cfg_dict: dict, extra: dict) -> None:
    rec = {**cfg_dict, "versions": versions(), "code": git_rev(Path(__file__).resolve().parents[1]), **extra}
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(rec, indent=2, default=str))
    os.replace(tmp, run_dir / "config.json")


class Metrics:
    """Append-only metrics.jsonl (main process only). Rows: {"kind": "train"|"epoch", "step", ...}."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint so the file matches an uninterrupted run."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, "time": time.time()}) + "\n")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a torn last line from a killed run
    return rows


def write_report(run_dir: Path) -> Path:
    """report.png: loss, kNN and online-probe accuracy, images/s and data-wait % against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(run_dir / "metrics.jsonl")
    tr = [r for r in rows if r.get("kind") == "train"]
    ep = [r for r in rows if r.get("kind") == "epoch"]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot([r["step"] for r in tr], [r["loss"] for r in tr])
    ax[0, 0].set_title("training loss")
    knn_keys = sorted({k for r in ep for k in r if k.startswith(("knn@", "probe_"))})
    for key in knn_keys:
        pts = [(r["step"], r[key]) for r in ep if key in r]
        ax[0, 1].plot(*zip(*pts), marker="o", label=key)
    ax[0, 1].set_title("kNN and online linear probe top-1 (%)")
    if knn_keys:
        ax[0, 1].legend()
    ax[1, 0].plot([r["step"] for r in tr], [r["images_per_s"] for r in tr])
    ax[1, 0].set_title("images / s (global)")
    ax[1, 1].plot([r["step"] for r in tr], [r["data_wait_pct"] for r in tr])
    ax[1, 1].set_title("data wait (% of step time)")
    for a in ax.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "report.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="pretrain")

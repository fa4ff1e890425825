"""End-to-end demo on CPU: synthetic data -> convert -> inspect -> pretrain -> kNN + linear probe vs random init.

    python tools/demo.py --out demo_out            # (`make demo`)

Steps (each is the real command a user would run; their output is shown):
  1. tools/make_synthetic.py       10 classes, --train-per-class / --val-per-class images, --easy (each
     class its own shape and texture: learnable by a CPU-minutes run), rendered at 96-160 px
  2. tools/convert_imagenet.py     train and val, --max-side 96 (cheap CPU decode)
  3. tools/inspect_dataset.py      per-class counts and a contact sheet of OUT/data/train
  4. accelerate launch --num_processes 1 train/pretrain.py   SimCLR (no blur at 32 px, crops of >= 30% of
     the image), ResNet-18 (CIFAR stem, width 8), batch 16, AdamW at a constant 3e-3 after a 1-epoch warm-up
     (the settings of tests/test_train.py's learning test)
  5. train/linear_eval.py          trained backbone and a --random-init encoder: kNN and linear probe
Rerun semantics: the dataset steps are skipped when their outputs exist (conversion itself resumes);
pretraining resumes from OUT/run's latest checkpoint (a finished run is not retrained) unless
--fresh is given, which deletes OUT/run first. The summary goes to stdout and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(cmd: list[str], env=None) -> None:
    print("\n$ " + " ".join(str(c) for c in cmd), flush=True)
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
    if r.returncode:
        sys.exit(f"demo: step failed (exit {r.returncode}): {' '.join(map(str, cmd))}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="demo directory (data/, src/, run/, *.json)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--val-per-class", type=int, default=24)
    p.add_argument("--epochs", type=int, default=30, help="pretraining epochs")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=8, help="ResNet-18 first-stage width")
    p.add_argument("--batch-size", type=int, default=16, help="pretraining batch (--lr 0.048 is per 256, "
                                                              "scaled linearly: 3e-3 at 16)")
    p.add_argument("--fresh", action="store_true", help="retrain from scratch (deletes OUT/run)")
    a = p.parse_args(argv)
    t0 = time.time()
    out = Path(a.out).resolve()
    src, data, run_dir = out / "src", out / "data", out / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}

    if not (src / "LOC_val_solution.csv").exists():
        run([PY, "tools/make_synthetic.py", "--out", src, "--classes", a.classes, "--train-per-class",
             a.train_per_class, "--val-per-class", a.val_per_class, "--easy", "--side-range", 96, 160,
             "--no-progress"], env)
    for split in ("train", "val"):
        run([PY, "tools/convert_imagenet.py", "--src", src, "--out", data, "--split", split, "--max-side", 96,
             "--shard-size", 256, "--no-progress"], env)
    run([PY, "tools/inspect_dataset.py", data / "train", "--no-decode"], env)

    if a.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    if not (run_dir / "backbone.safetensors").exists():
        resume = ["--resume"] if (run_dir / "checkpoints" / "latest").exists() else ["--overwrite"]
        accelerate = Path(PY).parent / "accelerate"
        run([accelerate, "launch", "--num_processes", 1, "--num_machines", 1, "--mixed_precision", "no",
             "--dynamo_backend", "no", "train/pretrain.py", "--method", "simclr", "--blur", "false", "--data", data, "--arch", "resnet18", "--width", a.width, "--cifar-stem",
             "--image-size", a.image_size, "--batch-size", a.batch_size, "--epochs", a.epochs,
             "--crop-min-scale", 0.3, "--optimizer", "adamw", "--lr", 0.048, "--min-lr-ratio", 1,
             "--temperature", 0.2, "--weight-decay", 1e-4, "--warmup-epochs", 1, "--proj-hidden", 128,
             "--proj-dim", 64, "--knn-every", 5,
             "--ckpt-every", 100, "--out", run_dir, *resume], env)
    res = {}
    for name, extra in (("pretrained", ["--backbone", run_dir / "backbone.safetensors"]),
                        ("random-init", ["--random-init", "--arch", "resnet18", "--width", a.width,
                                         "--cifar-stem", "--image-size", a.image_size])):
        run([PY, "train/linear_eval.py", *extra, "--data", data, "--out", out / f"eval_{name}.json"], env)
        res[name] = json.loads((out / f"eval_{name}.json").read_text())

    print("\n=== infoview demo summary ===")
    print(f"{'encoder':<14}{'kNN@20':>9}{'kNN@200':>9}{'linear top1':>13}{'top5':>8}")
    for name, r in res.items():
        print(f"{name:<14}{r['knn@20']:>9.1f}{r['knn@200']:>9.1f}{r['top1']:>13.1f}{r['top5']:>8.1f}")
    gain = res["pretrained"]["knn@20"] - res["random-init"]["knn@20"]
    print(f"self-supervised minus random-init kNN@20: {gain:+.1f} points")
    print(f"report: {run_dir / 'report.png'}   contact sheet: {data / 'train' / 'contact_sheet.png'}")
    print(f"total wall time: {time.time() - t0:.0f} s")
    summary = {"results": res, "knn20_gain": gain, "report": str(run_dir / "report.png"),
               "wall_s": time.time() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()

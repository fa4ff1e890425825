"""Method zoo: every registered method pretrained on the same synthetic data with the same budget, then a
kNN and linear probe of its backbone beside the random-init encoder of the same architecture.

    python -m train.zoo                                  # `make bench-methods`: every method of train.methods.known()
    python -m train.zoo --methods simclr,byol            # a subset (an unknown name fails, listing the known ones)
    python -m train.zoo --work /data/zoo --threads 2     # the cache of data sets and runs; torch threads per run
    python -m train.zoo --quick --results /tmp/z.csv     # tiny budget (1 epoch, a few images): the test's

Steps, each the real command a user would run (subprocesses, their output shown):
  1. image methods: tools/make_synthetic.py --easy (10 classes x 120 train + 24 val, 96-160 px) and
     tools/convert_imagenet.py (--max-side 96), as tools/demo.py; video methods (a method class with
     `clips = True`, e.g. cvrl): tools/make_synthetic_video.py --class-cues easy (8 classes x 32 videos:
     192 train / 64 val) and tools/convert_video.py, as tests/test_video_train.py's learning test.
     Made once into --work and reused (a finished step leaves a marker; conversion itself resumes).
  2. train/pretrain.py per method: the budget of IMAGE_BUDGET / VIDEO_BUDGET (the same epochs and
     batch for every image method) plus the method's row of SETTINGS. Method keys (temperature, EMA,
     queue, negatives) go only to a method whose config has that key; --queue-size and --nce-k are
     sized to the train set (fit_negatives). A finished run whose command is unchanged is reused, an
     interrupted one resumes from its latest checkpoint, anything else retrains (--fresh: always).
  3. train/linear_eval.py (kNN k=20, 200 and an L-BFGS linear probe on frozen features, val split) of
     the trained backbone and of the random-init encoder: the trained run's own architecture rebuilt
     from its backbone.safetensors metadata under the same seed (the trainer seeds torch right before the
     method builds its backbone, so this is the trained network's initialisation; for CMC, the two
     per-view encoders and the L / ab eval views), exported and probed by the same command.
  4. --results (train/results/zoo.csv; --quick: WORK/quick/zoo.csv) gets one row per method (the rows
     of methods run now replace theirs, other rows stay), written atomically; beside it zoo.png (grouped
     bars: kNN@20 and linear top-1, trained and random init, chance marked) and a markdown table on stdout.

Why subprocesses and not train.pretrain.main in-process: the trainer sets process-wide state (accelerate's
AcceleratorState singleton, torch.use_deterministic_algorithms, torch RNG, DALI / decode thread pools) that
would carry from one method into the next; a process per run starts clean, gives back its memory, and a
failing method is reported while the others still run (the zoo then exits 1 naming it). The cost is a
few seconds of interpreter start per command.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python train/zoo.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.versions import versions, versions_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RESULTS = ROOT / "train" / "results" / "zoo.csv"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "infoview_zoo"

# -- data sets -------------------------------------------------------------------------------------------
# full: the demo's image set and the CVRL learning test's video set (both known to be learnable in CPU
# minutes); quick: the smallest sets that still give every class a val sample (the test's budget).
IMAGE_DATA = {
    "full": {"classes": 10, "train_per_class": 120, "val_per_class": 24, "side_range": (96, 160), "max_side": 96},
    "quick": {"classes": 4, "train_per_class": 16, "val_per_class": 8, "side_range": (48, 64), "max_side": 64},
}
VIDEO_DATA = {  # UCF layout: a quarter of the videos (group g % 4 == 1) are the val (testlist01) split
    "full": {"classes": 8, "per_class": 32, "frames": 32, "size": 64},
    "quick": {"classes": 4, "per_class": 8, "frames": 12, "size": 32},
}

# -- budgets ----------------------------------------------------------------------------------------------
# Common to every image method: the demo's / tests/test_train.py learning test's recipe, which takes SimCLR
# from 27 to 73 kNN@20 in ~3 CPU minutes: ResNet-18 at width 8 with the CIFAR stem on 32 px crops,
# projection MLP 128 -> 64 (the methods' 2048-4096 wide heads only cost time at this width), batch 16,
# 30 epochs (1200 images: 2,250 steps), AdamW at a constant 3e-3 (0.048 per 256, linearly scaled; the
# methods' own SGD / LARS at batch 16 and a few thousand steps barely move), weight decay 1e-4,
# a 1-epoch warm-up, no blur (at 32 px it erases the textures that tell the classes apart) and crops of
# >= 30% of the image (the recipes' 8-20% crops miss the object at this size; measured for SimCLR: margin
# 31.6 -> 17.5 / 9.1 points). Each method keeps its own view recipe (colour jitter, grey, RandAugment, Lab).
IMAGE_BUDGET = {
    "arch": "resnet18", "width": 8, "cifar_stem": True, "image_size": 32, "batch_size": 16, "epochs": 30,
    "optimizer": "adamw", "lr": 0.048, "min_lr_ratio": 1.0, "weight_decay": 1e-4, "warmup_epochs": 1.0,
    "blur": False, "crop_min_scale": 0.3, "proj_hidden": 128, "proj_dim": 64,
}
# Video methods: tests/test_video_train.py's CVRL learning test (+15.6 to +46.9 kNN@20 over random init,
# seeds 0-3, ~2.5 min on one thread): R3D-18 width 8, 4 frames 2 apart at 32 px, batch 16, 84 epochs of
# 192 videos (1,008 steps), the same optimiser as the image methods.
VIDEO_BUDGET = {
    "arch": "r3d18", "width": 8, "frames": 4, "stride": 2, "image_size": 32, "batch_size": 16, "epochs": 84,
    "optimizer": "adamw", "lr": 0.048, "min_lr_ratio": 1.0, "weight_decay": 1e-4, "warmup_epochs": 1.0,
    "blur": False, "crop_min_scale": 0.3, "proj_hidden": 128, "proj_dim": 64,
}
QUICK = {"epochs": 1, "warmup_epochs": 0.0}  # --quick, over either budget (video: batch 8, see below)
QUICK_VIDEO_BATCH = 8  # the quick video set has 24 train videos


@dataclasses.dataclass(frozen=True)
class Setting:
    common: dict = dataclasses.field(default_factory=dict)
    """Common keys over the budget (recipe, width, pred_hidden ...): passed to every method."""
    method: dict = dataclasses.field(default_factory=dict)
    """Method keys: passed only where the method's config has the key (others' keys fail in pretrain.py)."""
    why: str = ""


# Per-method settings over the budget, one row per method. The methods' own defaults are ImageNet values
# (hundreds of epochs, batch 256-4096, EMA / queue sized for 1.28M images); what a 2,250-step run on 1,200
# images needs instead, and why. A registered method without a row runs on the budget and its own defaults
# (and the fitted queue / negatives). Not tuned per method by a sweep: chosen from the learning tests'
# measured recipe and the methods' papers; the zoo's CSV is the measurement.
SETTINGS: dict[str, Setting] = {
    "simclr": Setting(method={"temperature": 0.2}, why=(
        "the demo / learning-test run as it is (temperature 0.2: 0.5 learns slower at batch 16)")),
    "mocov2": Setting(method={"temperature": 0.2, "ema": 0.99}, why=(
        "key-encoder EMA 0.99 (~100-step memory) instead of 0.999 (~1000 steps: keys would trail the query "
        "encoder by half the run); queue fitted to the train set (the default 65536 is 55x the data: the same "
        "image's stale keys would be its own negatives)")),
    "infomin": Setting(method={"temperature": 0.15, "ema": 0.99}, why=(
        "MoCo v2's EMA and queue reasoning; its own temperature 0.15 and RandAugment views")),
    "byol": Setting(common={"pred_hidden": 128}, method={"ema": 0.99}, why=(
        "target EMA from 0.99 (cosine to its default 1.0) instead of 0.996, for the same short-run reason as "
        "MoCo; predictor 128 wide like the projector (default 4096)")),
    "instdisc": Setting(method={"temperature": 0.07}, why=(
        "its own temperature 0.07 and one-view recipe; bank negatives fitted to the train set (default 4096 "
        "is more than the 1,200 samples the bank holds)")),
    "cmc": Setting(common={"width": 4}, method={"temperature": 0.07}, why=(
        "two encoders (L, ab) at half the width, as in the paper (its default 32 = 64 / 2): the pair's "
        "features are as wide (2 x 32) as the others' one encoder; bank negatives fitted to the train set")),
    "renyicl": Setting(common={"pred_hidden": 128}, method={"ema": 0.99}, why=(
        "its own γ 2, α 1/65536, τ 0.5 and EMA 0.99 -> 1; predictor 128 wide like the projector (default 4096)")),
    "csimclr": Setting(method={"kappa_e": 1024.0, "kappa_b": 5.0, "beta": 0.1}, why=(
        "κ_b 5 (InfoNCE at temperature 0.2, SimCLR's row) and β 0.1 instead of the reference's 10 and 1: at "
        "batch 16 the contrastive term is bounded by log 31 = 3.4 (log 8191 = 9 at the reference's 4096) and the "
        "residual's alignment pull β κ_b wins: measured with 10 / 1, the run collapsed (kNN@20 15.4 vs random "
        "26.7, I(Y;Z) -> 0)")),
    "cbyol": Setting(common={"pred_hidden": 128}, method={"ema": 0.99}, why=(
        "its own κ_e 16384, κ_b 10, β 1, w 5 and EMA 0.99 (the 300-epoch setting); predictor and target head "
        "128 wide")),
    "ssl_hsic": Setting(common={"pred_hidden": 128}, method={"ema": 0.99}, why=(
        "its own γ 3, 512 random features, bandwidth Adam 3e-4 and EMA 0.99; predictor 128 wide")),
    "bregman": Setting(method={"temperature": 0.5}, why=(
        "its own τ 0.5 (CIFAR), σ 0.9, 100 subnetworks of 512; the budget's AdamW instead of its Adam 5e-3")),
    "simclr+augself": Setting(method={"temperature": 0.2}, why=(
        "SimCLR's row plus --aux augself (crop, colour and flip differences, weight 1 as in the reference)")),
    "cvrl": Setting(common={"recipe": "mocov2"}, method={"temperature": 0.2}, why=(
        "the CVRL learning test's run: MoCo v2's weaker jitter on clips (CVRL's own 0.8 jitter stayed at "
        "chance for 800 steps), temperature 0.2")),
}


# Rows that are a registered method plus common keys (an auxiliary objective over a base method): the
# zoo name -> (base method, keys over the base's row). Their runs train `--method BASE` with the keys.
VARIANTS: dict[str, tuple[str, dict]] = {
    "simclr+augself": ("simclr", {"aux": "augself", "aux_weight": 1.0}),
}


def base_method(name: str) -> str:
    return VARIANTS[name][0] if name in VARIANTS else name


def zoo_names(methods: list[str]) -> list[str]:
    """Every row the zoo can make: the registered methods and the variants over them."""
    return list(methods) + [v for v, (b, _) in VARIANTS.items() if b in methods]


def fit_negatives(n_train: int, cap: int = 4096) -> int:
    """Queue length / bank negatives for a train set of `n_train`: the largest power of two <= n_train / 2
    (at most `cap`, at least 8): with a queue of half the data an image's own key from the previous epoch
    is still in it for ~10% of the steps, and 4096 is MoCo's CIFAR-scale queue. 1,200 images: 512."""
    k = 8
    while k * 2 <= min(cap, n_train // 2):
        k *= 2
    return k


def method_uses(cls, key: str) -> bool:
    """Whether the method's config has `key`: its `reads` (the method keys it declares) or the fields of
    its own `Config` dataclass, whichever the config in place has."""
    if key in getattr(cls, "reads", ()):
        return True
    cfg = getattr(cls, "Config", None)
    return dataclasses.is_dataclass(cfg) and key in {f.name for f in dataclasses.fields(cfg)}


def is_video(cls) -> bool:
    return bool(getattr(cls, "clips", False))


def flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--" + k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def plan(name: str, cls, budget: str, n_train: int, seed: int, knn: bool, epochs: int | None) -> tuple[dict, list[str]]:
    """(the flat pretrain settings of `name`, notes): budget < SETTINGS row < fitted negatives."""
    video = is_video(cls)
    values = dict(VIDEO_BUDGET if video else IMAGE_BUDGET)
    notes = []
    if epochs:
        values["epochs"] = epochs
    if budget == "quick":
        values.update(QUICK)
        if video:
            values["batch_size"] = QUICK_VIDEO_BATCH
    row = SETTINGS.get(name) or SETTINGS.get(base_method(name))
    if name in VARIANTS:
        row = dataclasses.replace(row or Setting(), common={**(row.common if row else {}), **VARIANTS[name][1]})
    if row is None:
        notes.append(f"{name}: no row in train/zoo.py SETTINGS; the budget and the method's own defaults")
        row = Setting()
    values.update(row.common)
    method_keys = {}
    for k, v in row.method.items():
        if method_uses(cls, k):
            method_keys[k] = v
        else:
            notes.append(f"{name}: SETTINGS sets {k!r} but the method has no such key; not passed")
    for k in ("queue_size", "nce_k"):
        if method_uses(cls, k) and k not in method_keys:
            method_keys[k] = fit_negatives(n_train)
    values.update(method_keys)
    values["seed"] = seed
    values["knn_every"] = max(1, values["epochs"] // 3) if knn else 0
    if budget == "quick":
        values["log_every"] = 1  # every step's time is logged: the estimate of a full run
    return values, notes


# -- commands ---------------------------------------------------------------------------------------------
class StepFailed(RuntimeError):
    pass


class Runner:
    def __init__(self, threads: int, progress: bool):
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if not progress:
            self.env["TQDM_DISABLE"] = "1"
        self.progress = progress
        self.n = 0

    def step(self, what: str) -> None:
        self.n += 1
        print(f"\n[zoo {self.n}] {what}", flush=True)

    def run(self, cmd: list) -> float:
        cmd = [str(c) for c in cmd]
        shown = [os.path.relpath(c, ROOT) if os.path.isabs(c) and c.startswith(str(ROOT)) else c for c in cmd]
        print("$ " + " ".join(shown), flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=self.env)
        if r.returncode:
            raise StepFailed(f"exit {r.returncode}: {' '.join(shown)}")
        return time.perf_counter() - t0


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def convert(r: Runner, cmd: list) -> None:
    """A conversion resumes where an interrupted one stopped; one that cannot (its output was started
    from another source tree, or is damaged) is redone from scratch (--overwrite)."""
    try:
        r.run(cmd)
    except StepFailed as e:
        print(f"zoo: the conversion did not resume ({e}); converting again with --overwrite", flush=True)
        r.run([*cmd, "--overwrite"])


def _build_data(r: Runner, kind: str, src: Path, data: Path, sig: dict, title: str, make_cmd: list,
                convert_cmds: dict[str, list]) -> Path:
    """Render the source set (`make_cmd`) and convert each split (`convert_cmds[split]`), each step skipped
    when its marker holds this signature."""
    if _read_json(src / ".zoo_done.json") != sig:
        r.step(title)
        for d in (src, data):  # a new source: its old conversion would refuse to resume on it
            if d.exists():
                shutil.rmtree(d)
        r.run(make_cmd)
        _write_json(src / ".zoo_done.json", sig)
    for split, cmd in convert_cmds.items():
        marker = data / f".zoo_{split}_done.json"
        if _read_json(marker) != sig:
            r.step(f"convert {kind} {split}")
            convert(r, cmd)
            _write_json(marker, sig)
    return data


def _signature(spec: dict, seed: int) -> dict:
    return json.loads(json.dumps({**spec, "seed": seed}))  # as read back (tuples are lists)


def make_image_data(r: Runner, work: Path, budget: str, seed: int) -> Path:
    spec = IMAGE_DATA[budget]
    src, data = work / "image_src", work / "image_data"
    quiet = [] if r.progress else ["--no-progress"]
    make = [PY, ROOT / "tools/make_synthetic.py", "--out", src, "--classes", spec["classes"], "--train-per-class",
            spec["train_per_class"], "--val-per-class", spec["val_per_class"], "--easy", "--side-range",
            *spec["side_range"], "--seed", seed, *quiet]
    conv = {split: [PY, ROOT / "tools/convert_imagenet.py", "--src", src, "--out", data, "--split", split, "--max-side",
                    spec["max_side"], "--shard-size", 256, "--formats", "wds", "--workers", 2, *quiet]
            for split in ("train", "val")}
    title = f"image data set ({spec['classes']} classes x {spec['train_per_class']} + {spec['val_per_class']})"
    return _build_data(r, "image", src, data, _signature(spec, seed), title, make, conv)


def make_video_data(r: Runner, work: Path, budget: str, seed: int) -> Path:
    spec = VIDEO_DATA[budget]
    src, data = work / "video_src", work / "video_data"
    quiet = [] if r.progress else ["--no-progress"]
    make = [PY, ROOT / "tools/make_synthetic_video.py", "--out", src, "--classes", spec["classes"], "--per-class",
            spec["per_class"], "--frames", spec["frames"], "--size", spec["size"], "--container", "mp4",
            "--class-cues", "easy", "--seed", seed, *quiet]
    conv = {split: [PY, ROOT / "tools/convert_video.py", "--src", src, "--out", data, "--split", split,
                    "--split-file", lst, "--workers", 2, *quiet]
            for split, lst in (("train", "trainlist01.txt"), ("val", "testlist01.txt"))}
    title = f"video data set ({spec['classes']} classes x {spec['per_class']} videos, class cues 'easy')"
    return _build_data(r, "video", src, data, _signature(spec, seed), title, make, conv)


def num_samples(data: Path, split: str) -> int:
    return int(json.loads((data / split / "manifest.json").read_text())["num_samples"])


def pretrain(r: Runner, name: str, values: dict, data: Path, runs: Path, fresh: bool) -> dict:
    """train/pretrain.py for `name`; returns {"seconds", "resumed", "reused"}. The command is recorded
    beside the run (runs/NAME.cmd.json) so that a changed setting retrains instead of resuming."""
    out = runs / name
    argv = ["--method", base_method(name), *flags(values), "--data", str(data), "--out", str(out)]
    cmd_file, done_file = runs / f"{name}.cmd.json", runs / f"{name}.done.json"
    done = _read_json(done_file)
    same = _read_json(cmd_file) == argv
    if not fresh and same and done and (out / "backbone.safetensors").exists():
        r.step(f"pretrain {name}: reusing the finished run in {out} (same command)")
        return {**done, "reused": True}
    done_file.unlink(missing_ok=True)
    resume = not fresh and same and (out / "checkpoints" / "latest").exists()
    _write_json(cmd_file, argv)
    r.step(f"pretrain {name}" + (" (resuming)" if resume else ""))
    secs = r.run([PY, ROOT / "train/pretrain.py", *argv, "--progress", "true" if r.progress else "false",
                  "--resume" if resume else "--overwrite"])
    rec = {"seconds": secs, "resumed": resume}
    _write_json(done_file, rec)
    return {**rec, "reused": False}


def backbone_meta(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def random_backbone(trained: Path, seed: int, cache: Path) -> Path:
    """The random-init twin of `trained`: its architecture from its metadata, built under `seed` as the
    trainer builds it (torch.manual_seed(seed), then the backbone), exported with the same metadata."""
    meta = backbone_meta(trained)
    # Cached by what the net and its probe depend on: linear_eval.py reads the training recipe only for a
    # multi-view (CMC) backbone, so image methods on one architecture share one random-init encoder.
    ident = {k: v for k, v in meta.items() if k != "recipe" or meta.get("channels")}
    key = hashlib.sha1(json.dumps([sorted(ident.items()), seed]).encode()).hexdigest()[:12]
    path = cache / key / "backbone.safetensors"
    if not path.exists():
        import torch
        from train.models import backbone_from_meta, export_backbone
        torch.manual_seed(seed)
        net = backbone_from_meta(meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        built = net.meta()  # the build keys come from the net itself; the rest (recipe, image size, frames) as trained
        export_backbone(net, str(path), extra={k: v for k, v in meta.items() if k not in built})
    return path


def linear_eval(r: Runner, backbone: Path, data: Path, out: Path, iters: int, seed: int) -> dict:
    out.unlink(missing_ok=True)
    r.run([PY, ROOT / "train/linear_eval.py", "--backbone", backbone, "--data", data, "--out", out, "--iters", iters,
           "--seed", seed])
    return json.loads(out.read_text())


def step_seconds(run_dir: Path, batch: int) -> float:
    """Median seconds per optimizer step from metrics.jsonl (its images/s is the batch over the step's
    wall time, data wait included; step 1 left out: first-batch start-up). One process."""
    dts = []
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row.get("kind") == "train" and row.get("step", 0) > 1 and row.get("images_per_s"):
                dts.append(batch / row["images_per_s"])
    except (OSError, ValueError):
        return float("nan")
    return statistics.median(dts) if dts else float("nan")


# -- results ----------------------------------------------------------------------------------------------
FIELDS = ["method", "data", "arch", "recipe", "epochs", "steps", "batch", "image_size", "frames", "train_samples",
          "val_samples", "classes", "pretrain_s", "step_s", "knn20", "knn200", "linear_top1", "random_knn20",
          "random_knn200", "random_linear_top1", "delta_knn20", "delta_linear_top1", "settings", "budget", "seed",
          "threads", "device", "machine", "versions", "code", "date", "resumed"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores ({platform.machine()}, {platform.system()})"


def arch_text(meta: dict) -> str:
    s = f"{meta.get('arch', '?')} w{meta.get('width', '?')}"
    if meta.get("channels"):
        s += f" x{len(meta['channels'].split(','))} views"
    if meta.get("cifar_stem") == "1":
        s += " cifar-stem"
    return s


def make_row(name: str, values: dict, budget: str, threads: int, run_dir: Path, pre: dict, tr: dict,
             rd: dict) -> dict:
    cfg = _read_json(run_dir / "config.json") or {}
    meta = backbone_meta(run_dir / "backbone.safetensors")
    shown = {k: v for k, v in values.items() if k not in ("seed", "knn_every", "log_every")}
    return {
        "method": name, "data": "video" if meta.get("input") == "video" else "image", "arch": arch_text(meta),
        "recipe": cfg.get("recipe", meta.get("recipe", "")), "epochs": values["epochs"],
        "steps": cfg.get("total_steps", ""), "batch": values["batch_size"], "image_size": values["image_size"],
        "frames": values.get("frames", ""), "train_samples": tr.get("num_train", ""),
        "val_samples": tr.get("num_test", ""), "classes": tr.get("num_classes", ""),
        "pretrain_s": f"{pre['seconds']:.1f}", "step_s": f"{step_seconds(run_dir, values['batch_size']):.4f}",
        "knn20": f"{tr['knn@20']:.2f}", "knn200": f"{tr['knn@200']:.2f}", "linear_top1": f"{tr['top1']:.2f}",
        "random_knn20": f"{rd['knn@20']:.2f}", "random_knn200": f"{rd['knn@200']:.2f}",
        "random_linear_top1": f"{rd['top1']:.2f}", "delta_knn20": f"{tr['knn@20'] - rd['knn@20']:+.2f}",
        "delta_linear_top1": f"{tr['top1'] - rd['top1']:+.2f}",
        "settings": " ".join(f"{k}={v}" for k, v in shown.items()), "budget": budget, "seed": values["seed"],
        "threads": threads, "device": cfg.get("device_name", ""), "machine": machine(),
        "versions": versions_text(versions("torch", "numpy", "accelerate", "dali", "ffcv", "av", "pillow")),
        "code": cfg.get("code", ""), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed": str(pre["resumed"]).lower(),
    }


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    """The whole CSV to a temp file in the same folder, fsync'd, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = [k for r in rows for k in r if k not in FIELDS]
    header = FIELDS + sorted(set(extra), key=extra.index)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, restval="")
    w.writeheader()
    w.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def order(rows: list[dict], names: list[str]) -> list[dict]:
    pos = {n: i for i, n in enumerate(names)}
    return sorted(rows, key=lambda r: (r.get("data", "") == "video", pos.get(r["method"], len(pos)), r["method"]))


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def markdown(rows: list[dict]) -> str:
    head = ("| method | data | arch | epochs | steps | batch | pretrain s | kNN@20 | kNN@200 | linear top-1 "
            "| random kNN@20 | random linear | Δ kNN@20 | Δ linear |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['data']} | {r['arch']} | {r['epochs']} | {r['steps']} | {r['batch']} | "
                     f"{_f(r['pretrain_s']):.0f} | {_f(r['knn20']):.1f} | {_f(r['knn200']):.1f} | "
                     f"{_f(r['linear_top1']):.1f} | {_f(r['random_knn20']):.1f} | {_f(r['random_linear_top1']):.1f} | "
                     f"{_f(r['delta_knn20']):+.1f} | {_f(r['delta_linear_top1']):+.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars per method: kNN@20 and linear top-1 of the trained encoder beside random init's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * n + 2), 4.8))
    bars = [("knn20", "kNN@20", "tab:blue", None), ("random_knn20", "kNN@20, random init", "lightsteelblue", "//"),
            ("linear_top1", "linear top-1", "tab:orange", None),
            ("random_linear_top1", "linear top-1, random init", "navajowhite", "//")]
    w = 0.8 / len(bars)
    for j, (key, label, color, hatch) in enumerate(bars):
        xs = [i - 0.4 + w * (j + 0.5) for i in range(n)]
        ys = [_f(r[key]) for r in rows]
        ax.bar(xs, ys, w, label=label, color=color, hatch=hatch, edgecolor="grey", linewidth=0.5)
        for x, y in zip(xs, ys):
            if math.isfinite(y):
                ax.text(x, y + 1, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    for i, r in enumerate(rows):
        c = _f(r.get("classes"))
        if math.isfinite(c) and c > 0:
            ax.hlines(100 / c, i - 0.45, i + 0.45, colors="black", linestyles="dotted", linewidth=1,
                      label="chance" if i == 0 else None)
    ax.set_xticks(range(n), [f"{r['method']}\n{r['data']}, {r['steps']} steps" for r in rows], fontsize=8)
    ax.set_ylabel("top-1 on val (%)")
    ax.set_ylim(0, 112)
    budgets = ", ".join(sorted({r.get("budget", "") for r in rows}))
    dates = sorted(r.get("date", "")[:10] for r in rows)
    ax.set_title(f"infoview method zoo: SSL backbone vs random init on synthetic val ({budgets} budget)\n"
                 f"{rows[0]['machine']}; {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""),
                 fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper right", frameon=False)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# -- main -------------------------------------------------------------------------------------------------
def parse(argv=None, known: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m train.zoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="", help="comma list of methods (default: every registered one)")
    p.add_argument("--work", default=str(DEFAULT_WORK),
                   help=f"cache of data sets and runs, reused across invocations (default: {DEFAULT_WORK})")
    p.add_argument("--results", default="",
                   help="results CSV; the PNG goes beside it with .png (default: train/results/zoo.csv; with --quick "
                        "WORK/quick/zoo.csv, so a quick run never touches the committed results)")
    p.add_argument("--quick", action="store_true", help="tiny budget (1 epoch, a few images): for the test only")
    p.add_argument("--epochs", type=int, default=0, help="override the image budget's epochs (default 30)")
    p.add_argument("--video-epochs", type=int, default=0, help="override the video budget's epochs (default 84)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data sets, the runs and the random init")
    p.add_argument("--threads", type=int, default=_default_threads(),
                   help="OMP / MKL threads of every command (default: $OMP_NUM_THREADS, else 2)")
    p.add_argument("--fresh", action="store_true", help="retrain every chosen method (default: reuse / resume)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bars of the commands (auto: when stderr is a terminal)")
    a = p.parse_args(argv)
    known = known if known is not None else _known()
    if a.methods:
        a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        bad = [m for m in a.methods if m not in known]
        if bad or not a.methods:
            p.error(f"unknown method(s): {', '.join(bad) or '(none given)'}; known: {', '.join(known)}")
    else:
        a.methods = list(known)
    if a.threads < 1 or a.epochs < 0 or a.video_epochs < 0:
        p.error("--threads >= 1, --epochs / --video-epochs >= 0")
    return a


def _default_threads() -> int:
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return min(2, os.cpu_count() or 1)


def _known() -> list[str]:
    from train.methods import known
    return zoo_names(known())


def main(argv=None) -> list[dict]:
    from train.methods import get_method, known
    names = zoo_names(known())
    a = parse(argv, names)
    t_all = time.perf_counter()
    budget = "quick" if a.quick else "full"
    work = Path(a.work).resolve() / budget
    results = Path(a.results).resolve() if a.results else (work / "zoo.csv" if a.quick else RESULTS)
    progress = {"on": True, "off": False}.get(a.progress, sys.stderr.isatty())
    r = Runner(a.threads, progress)
    print(f"zoo: methods {', '.join(a.methods)}; {budget} budget; work {work}; results {results}; "
          f"{a.threads} thread(s)", flush=True)
    classes = {m: get_method(base_method(m)) for m in a.methods}
    rows, failed, notes, timing = [], {}, [], {}
    datasets: dict[str, Path | StepFailed] = {}
    random_evals: dict[Path, dict] = {}
    for name in a.methods:
        cls = classes[name]
        kind = "video" if is_video(cls) else "image"
        t0 = time.perf_counter()
        try:
            if kind not in datasets:
                try:
                    datasets[kind] = (make_video_data if kind == "video" else make_image_data)(r, work, budget, a.seed)
                except StepFailed as e:
                    datasets[kind] = e
                    raise StepFailed(f"{kind} data set: {e}") from None
            data = datasets[kind]
            if isinstance(data, StepFailed):
                raise StepFailed(f"no {kind} data set (failed above)")
            values, why = plan(name, cls, budget, num_samples(data, "train"), a.seed, not a.quick,
                               a.video_epochs if kind == "video" else a.epochs)
            for note in why:
                print(f"zoo: note: {note}", flush=True)
            notes += why
            runs = work / "runs"
            pre = pretrain(r, name, values, data, runs, a.fresh)
            trained = runs / name / "backbone.safetensors"
            iters = 50 if a.quick else 200
            r.step(f"linear eval {name}: trained backbone")
            tr = linear_eval(r, trained, data, runs / f"{name}.eval.json", iters, a.seed)
            rnd = random_backbone(trained, a.seed, work / "random")
            if rnd not in random_evals:
                r.step(f"linear eval {name}: random-init encoder of the same architecture ({rnd.parent.name})")
                random_evals[rnd] = linear_eval(r, rnd, data, rnd.parent / "eval.json", iters, a.seed)
            else:
                print(f"\n{name}: random-init encoder {rnd.parent.name} already evaluated in this run", flush=True)
            rd = random_evals[rnd]
            rows.append(make_row(name, values, budget, a.threads, runs / name, pre, tr, rd))
            timing[name] = time.perf_counter() - t0
            print(f"zoo: {name}: kNN@20 {tr['knn@20']:.1f} vs random {rd['knn@20']:.1f}, linear {tr['top1']:.1f} vs "
                  f"{rd['top1']:.1f} ({timing[name]:.0f} s with data and eval)", flush=True)
        except (StepFailed, OSError, ValueError, KeyError) as e:
            failed[name] = str(e)
            print(f"zoo: {name} FAILED: {e}", file=sys.stderr, flush=True)
    new = {row["method"] for row in rows}
    merged = order([x for x in read_rows(results) if x.get("method") not in new] + rows, names)
    if rows:
        write_rows(results, merged)
        plot(merged, results.with_suffix(".png"))
        print(f"\nwrote {results} and {results.with_suffix('.png')} ({len(rows)} row(s) updated, {len(merged)} in all)")
    print("\n" + markdown(merged))
    if a.quick:
        print("\nestimated full-budget pretraining at this speed (median step time x full steps, + start-up):")
        for row in rows:
            cls = classes[row["method"]]
            full, _ = plan(row["method"], cls, "full", _full_train(cls), a.seed, False,
                           a.video_epochs if is_video(cls) else a.epochs)
            steps = full["epochs"] * (_full_train(cls) // full["batch_size"])
            est = _f(row["step_s"]) * steps * full["batch_size"] / int(row["batch"])
            print(f"  {row['method']}: {steps} steps x {_f(row['step_s']) * full['batch_size'] / int(row['batch']):.3f}"
                  f" s = ~{est / 60:.1f} min")
    print(f"\nzoo: {time.perf_counter() - t_all:.0f} s in all" + "".join(f"; {m} {t:.0f} s" for m, t in timing.items()))
    if failed:
        sys.exit("zoo: failed: " + "; ".join(f"{m} ({e})" for m, e in failed.items()))
    return rows


def _full_train(cls) -> int:
    """Train samples of the full data set (tools/make_synthetic_video: clip n is in group n // 2 + 1, and
    groups g % 4 == 1 are the val list)."""
    if is_video(cls):
        d = VIDEO_DATA["full"]
        return d["classes"] * sum(1 for n in range(d["per_class"]) if (n // 2 + 1) % 4 != 1)
    d = IMAGE_DATA["full"]
    return d["classes"] * d["train_per_class"]


if __name__ == "__main__":
    main()

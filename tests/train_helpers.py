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
ACCELERATE = str(Path(PY).parent / "accelerate")


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch2_cmd() -> tuple[str, ...]:
    """`accelerate launch` of 2 gloo processes on a free port of their own, not accelerate's default
    29500: two suites (or a leftover rendezvous) on one machine must not collide."""
    return (ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no")


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


def call(method, views, index, step, label=None, aug=None):
    """One forward of a method on a Batch made of these tensors; returns its self-supervised loss."""
    from pipeline.loaders.batch import Batch
    _, out = method(Batch(views=list(views), index=index, label=label, aug=aug), step)
    return out.loss


def finish(method, step):
    """What the trainer does after the optimizer step: after_step, then the deferred writes."""
    method.after_step(step)
    method.run_deferred()


def make_method(cfg, n_data, total_steps, channels, clips=False):
    from train.methods import get_method
    from train.methods.base import DataInfo
    return get_method(cfg.run.method)(cfg, DataInfo(n_data, tuple(channels), clips=clips), total_steps)


def tiny_config(method: str, common: dict | None = None, **method_keys):
    """A small-model config of `method`: the `common` keys given, and of `method_keys` those the method
    has (a queue size for MoCo, negatives for the bank methods: the others would fail as not applying)."""
    import dataclasses

    from train.methods import build_config, get_method
    own = {f.name for f in dataclasses.fields(get_method(method).Config)}
    return build_config({"method": method, **(common or {}), **{k: v for k, v in method_keys.items() if k in own}})


def image_methods() -> list[str]:
    from train.methods import get_method, known
    return [m for m in known() if not get_method(m).clips]


def stateful_methods() -> list[str]:
    """Registered methods that keep registered state (banks, queues), from a tiny instance of each."""
    from train.methods import get_method
    out = []
    for m in image_methods():
        cfg = tiny_config(m, {"width": 4, "cifar_stem": True, "proj_hidden": 8, "pred_hidden": 8, "proj_dim": 8},
                          queue_size=8, nce_k=8)
        channels = (1, 2) if get_method(m).multiview_encoder else (3, 3)
        if make_method(cfg, 16, 2, channels).state_tensors():
            out.append(m)
    return out

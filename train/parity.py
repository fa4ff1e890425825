"""Step-0 loss and gradients of a method on one fixed global batch, for 1-process vs N-process checks.

    python train/parity.py --data OUT --global-batch 32 --dump step0_1proc.pt
    accelerate launch --multi_gpu --num_processes 2 train/parity.py --data OUT --global-batch 32 --dump step0_2proc.pt
    python train/parity.py --data OUT --method simclr,simclr:ring,mocov2 --dump DIR   # one file per method in DIR

Every process reads the same first batch of `global-batch` samples (pipeline, world_size=1) and keeps
its contiguous slice, builds the method with the same seed, wraps it in DDP through accelerate, and
runs forward + backward once, then the method's after_step (queue / bank writes, EMA targets). Rank 0
writes {"loss" (the mean over ranks), "grads", "state"} (DDP-averaged gradients; every buffer after the step: queue and
pointer, memory banks, BN statistics) to --dump. tests/test_train.py::test_ddp_parity_of_global_losses and
::test_ddp_parity_of_method_state compare the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--dump", required=True)
    p.add_argument("--method", default="simclr",
                   help="a method, METHOD:NEGATIVES (all|ball|ring), or a comma-separated list of them; with a "
                        "list --dump is a folder and gets one METHOD[_NEGATIVES].pt per entry (one process group "
                        "for all: a 2-process launch costs seconds)")
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--negatives", choices=["all", "ball", "ring"], default="all",
                   help="Ring / Ball negatives (methods with a --negatives key), at the default window")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                   help="float64 makes summation-order differences negligible, so the check isolates the "
                        "distributed math (gather, gradient scaling, global BN)")
    a = p.parse_args(argv)
    specs = [m.strip() for m in a.method.split(",") if m.strip()]
    if not specs:
        raise SystemExit("--method: name at least one method")
    dump = Path(a.dump)
    if len(specs) > 1:
        dump.mkdir(parents=True, exist_ok=True)
    acc = None
    for spec in specs:
        method, _, negatives = spec.partition(":")
        target = dump / (spec.replace(":", "_") + ".pt") if len(specs) > 1 else dump
        acc = _step0(a, method, negatives or a.negatives, target, acc)
    acc.end_training()


def _step0(a, name: str, negatives: str, dump: Path, acc):
    """One method's step 0 on the fixed global batch; writes `dump` on rank 0. Returns the accelerator
    (made once: accelerate's state is per process)."""
    from pipeline import build_loader
    from pipeline.views.recipes import get_recipe
    from pipeline.loaders.batch import Batch
    from train.methods import build_config, get_method
    from train.methods.base import DataInfo
    from train.trainer import _accelerator

    cls = get_method(name)
    own = {f.name for f in dataclasses.fields(cls.Config)}
    sized = {k: v for k, v in {"queue_size": 64, "nce_k": 64, "negatives": negatives}.items() if k in own}
    if negatives != "all" and "negatives" not in own:
        raise SystemExit(f"--negatives: {name} has no such key")
    cfg = build_config({"method": name, "data": a.data, "arch": "resnet18", "width": 8, "cifar_stem": True,
                        "sync_bn": True, "proj_hidden": 64, "proj_dim": 32, "batch_size": a.global_batch,
                        "image_size": a.image_size, "out": str(dump.parent / "parity_run"), **sized})
    torch.use_deterministic_algorithms(True)
    acc = acc or _accelerator(cfg)
    rank, ws = acc.process_index, acc.num_processes
    if a.global_batch % ws:
        raise ValueError(f"global batch {a.global_batch} must divide by {ws} processes")
    spec = get_recipe(cls.recipe, a.image_size)
    loader = build_loader(a.data, "train", spec, "dali", batch_size=a.global_batch, image_size=a.image_size,
                          seed=0)
    batch = next(iter(loader))
    loader.close()
    n = a.global_batch // ws
    dtype = getattr(torch, a.dtype)
    local = Batch(views=[v[rank * n:(rank + 1) * n] for v in batch.views], index=batch.index[rank * n:(rank + 1) * n],
                  label=batch.label[rank * n:(rank + 1) * n]).to(acc.device, dtype)
    torch.manual_seed(0)
    method = cls(cfg, DataInfo(1000, tuple(v.num_channels for v in spec.views)), 10).to(dtype)
    model = acc.prepare(method)
    loss, _ = model(local, 0)
    acc.backward(loss)
    inner = acc.unwrap_model(model)
    inner.after_step(0)
    inner.run_deferred()
    # The mean of the ranks' losses: SimCLR and MoCo each evaluate the loss of their local anchors
    # (queries) against gathered or queued keys: DDP's gradient averaging makes the update that of the global mean.
    loss = acc.reduce(loss.detach().clone(), "mean")
    if acc.is_main_process:
        grads = {k: p.grad.detach().clone() for k, p in inner.named_parameters() if p.grad is not None}
        state = {k: b.detach().clone() for k, b in inner.named_buffers()}
        torch.save({"loss": loss, "grads": grads, "state": state}, dump)
    acc.wait_for_everyone()
    acc.free_memory()
    return acc

if __name__ == "__main__":
    main()

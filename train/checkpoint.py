"""Atomic checkpoints of everything a run needs to continue bit-exactly.

Layout: RUN_DIR/checkpoints/step-00001234/{state.pt, rank-0.pt, rank-1.pt, ...} and
RUN_DIR/checkpoints/latest (the name of the newest complete checkpoint).
  state.pt   (rank 0) model incl. memory banks / queues / pointers (persistent buffers), optimizer,
             grad scaler, trainer counters (step, epoch, skipped steps), schedule lengths
  rank-R.pt  (each rank) torch / numpy / python / CUDA RNG states and the loader position
Write protocol: every rank writes into step-N.tmp/ and fsyncs its files; after a barrier rank 0
renames the directory to step-N (atomic), then replaces `latest` through a temp file + rename, then
prunes old checkpoints. A kill at any point leaves the previous checkpoint and pointer intact; a
stale *.tmp is removed by the next save. Loading uses torch.load(weights_only=True): numpy values
are stored as tensors (see _to_safe).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .distributed import world

_STEP_RE = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _barrier():
    if world()[1] > 1:
        dist.barrier()


def _to_safe(x):
    """Recursively make a state loadable with weights_only=True (numpy -> tensors, tuples kept)."""
    if isinstance(x, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k: _to_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_safe(v) for v in x)
    return x


def _from_safe(x):
    if isinstance(x, dict):
        if set(x) == {"__ndarray__"}:
            return x["__ndarray__"].numpy()
        return {k: _from_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_from_safe(v) for v in x)
    return x


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": _to_safe(np.random.get_state()),
         "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(_from_safe(s["numpy"]))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and _STEP_RE.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by `latest`, or else the newest complete step-N directory."""
    d = Path(run_dir) / "checkpoints"
    ptr = d / "latest"
    if ptr.is_file():
        name = ptr.read_text().strip()
        if _STEP_RE.match(name) and (d / name / "state.pt").is_file():
            return d / name
    ckpts = [p for p in list_checkpoints(run_dir) if (p / "state.pt").is_file()]
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict, rank_state: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it with its own `rank_state`; `state` is used on rank 0 only."""
    rank, ws = world()
    d = Path(run_dir) / "checkpoints"
    final = d / f"step-{step:08d}"
    tmp = d / f"step-{step:08d}.tmp"
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    _save(_to_safe(rank_state), tmp / f"rank-{rank}.pt")
    if rank == 0:
        _save(_to_safe({**state, "world_size": ws}), tmp / "state.pt")
    _barrier()
    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. --ckpt-every at an epoch end)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(d)
        ptr_tmp = d / "latest.tmp"
        with open(ptr_tmp, "w") as f:
            f.write(final.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(ptr_tmp, d / "latest")
        _fsync_dir(d)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(state, this rank's rank_state); fails if the world size differs from the saving run."""
    rank, ws = world()
    state = _from_safe(torch.load(path / "state.pt", map_location="cpu", weights_only=True))
    if state["world_size"] != ws:
        raise RuntimeError(f"{path} was written by {state['world_size']} processes, this run has {ws}: "
                           "exact resume needs the same world size")
    rank_state = _from_safe(torch.load(path / f"rank-{rank}.pt", map_location="cpu", weights_only=True))
    return state, rank_state

"""What a backend hands the loader: geometric crops per parameter stream, before the photometric ops."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.views.spec import RecipeSpec


@dataclass(slots=True)
class RawBatch:
    crops: dict[int, torch.Tensor]
    """stream -> uint8 (n, S, S, 3): the crop of the record, resized, not yet flipped (only the streams
    whose views are not in `views`)."""
    index: np.ndarray
    """int64 (n,) global indices of the samples kept (skipped ones removed)."""
    label: np.ndarray
    params: list[dict]
    """One record per view (pipeline.views.params.view_params), rows of the kept samples."""
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """(global index, reason) of the members of this batch that could not be decoded."""
    views: dict[int, torch.Tensor] = field(default_factory=dict)
    """view -> float32 (n, C, S, S): views the backend finished itself (pipeline.views.cpu_views); the loader
    applies torch_ops to the others, from `crops`."""


def streams(recipe: RecipeSpec) -> dict[int, int]:
    """Parameter stream -> view that defines its geometry, in view order."""
    out: dict[int, int] = {}
    for v in range(len(recipe.views)):
        out.setdefault(recipe.param_stream(v), v)
    return out


def take(records: list[dict], keep: np.ndarray) -> list[dict]:
    cache: dict[int, dict] = {}
    return [cache.setdefault(id(r), {k: a[keep] for k, a in r.items()}) for r in records]


def resolve_device(device) -> torch.device:
    """A torch.device with its index: "cuda" means the current CUDA device *now* (the trainer's rank's,
    once accelerate has set it), fixed here, because producer threads start on device 0 and DALI's
    device_id needs a number. Every rank decoding on GPU 0 is what an unindexed "cuda" gave."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={str(device)!r} but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def prefetched(items: Iterable, depth: int, name: str, device: torch.device | None = None) -> Iterator:
    """Yield `items`, produced by a daemon thread up to `depth` ahead. An exception in the producer is
    raised in the consumer; closing the generator early stops the producer. With a CUDA `device` the
    producer thread makes it current first (a new thread's current device is 0), so the tensors and
    streams it creates live on the loader's GPU."""
    q: queue.Queue = queue.Queue(max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        # torch ops in this thread run serially: a thread's first parallel op gives it its own OpenMP team,
        # and with more OpenMP threads than cores libgomp stops spin-waiting in every team, the training
        # thread's included (measured: a tiny-model training step ~1.5x slower, with one core idle)
        torch.set_num_threads(1)
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            for item in items:
                if not put((True, item)):
                    return
            put(None)
        except BaseException as e:  # handed to the consumer, raised there
            put((False, e))
        finally:
            if hasattr(items, "close"):  # a generator (maybe itself prefetched): stop it now
                items.close()

    th = threading.Thread(target=produce, daemon=True, name=name)
    th.start()
    try:
        while True:
            got = q.get()
            if got is None:
                return
            ok, item = got
            if not ok:
                raise item
            yield item
    finally:
        stop.set()
        th.join()

"""`build_loader`: multi-view batches from a converted split, with exact distributed order and resume.

    loader = build_loader(data="OUT", split="train", recipe="simclr", backend="dali", batch_size=256,
                          rank=rank, world_size=world, seed=0, device="cuda")
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # Batch: .views [B x C x H x W, ...], .index int64[B], .label int64[B]
            ...
        ckpt["loader"] = loader.state_dict()   # at any batch boundary

Every batch of every backend is a `pipeline.loaders.batch.Batch`: `views` (one float32 tensor per view
of the recipe, on `device`, normalized as the view's ColorSpec says), `index` and `label` (int64 CPU
tensors), and with `return_aug=True` an `aug` list with the parameter record of each view (crop box
top/left/h/w in source pixels, flip, jitter factors and order, grayscale, blur sigma, solarize,
RandAugment ops) as tensors.

Order and partition: `pipeline.loaders.sampler.EpochSampler` (each sample to exactly one rank per epoch; the
remainder is dropped in mode "train", kept in mode "eval"). Randomness: `pipeline.views.params` (a pure
function of seed, epoch, global index and view). State: {epoch, batch}; a loader given another's state
after k batches yields exactly the batches the other would have yielded next.

Epoch boundaries: a training loader (`continuous=True`, the default of mode "train") does not stop
its producer threads when an epoch ends: they go on with the first batches of the next epoch (up to
`prefetch` ahead), which the loader hands out when it is next iterated at that position (after the
epoch ended or `set_epoch(epoch + 1)`). Why: otherwise every epoch starts with the pipeline empty and
the trainer waits for a full decode + views latency (measured with 8-batch epochs: the first batch of
an epoch took 1.5-2x the steady interval). Any other position (`set_epoch` elsewhere,
`load_state_dict`) drops that read-ahead and starts afresh, so the batches are the same either way.
`close()` stops the threads; so does dropping the loader.

Skipped members: a batch whose members fail the JPEG check is shorter by that many samples (the
sample is not replaced, so the epoch partition stays exact); `loader.stats` counts them and keeps the
first 1000 (index, reason) pairs.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import torch

from pipeline.views import torch_ops
from pipeline.loaders.batch import Batch, aug_records
from pipeline.loaders.prefetch import RawBatch, resolve_device
from pipeline.views.recipes import get_recipe
from pipeline.loaders.sampler import EpochSampler
from pipeline.format.errors import ShardError
from pipeline.views.spec import RecipeSpec

BACKENDS = ("dali", "ffcv")
FORMAT_BACKENDS = {"wds": "dali", "ffcv": "ffcv"}  # the backend that reads each stored format
STATE_VERSION = 1


class ViewLoader:
    def __init__(self, backend, recipe: RecipeSpec, sampler: EpochSampler, device: torch.device,
                 return_aug: bool, continuous: bool = False):
        self.backend, self.recipe, self.sampler = backend, recipe, sampler
        self.device, self.return_aug, self.continuous = device, return_aug, continuous
        self.epoch, self.batch = 0, 0
        self.stats = {"batches": 0, "samples": 0, "skipped": 0, "skipped_samples": []}
        self._stream = None  # the backend's RawBatch generator, positioned at self._stream_at
        self._stream_at = None
        self._finalizer = None

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: must be >= 0")
        self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> dict:
        s = self.sampler
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch, "seed": s.seed,
                "rank": s.rank, "world_size": s.world_size, "batch_size": s.batch_size,
                "num_samples": s.num_samples, "recipe": self.recipe.name}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')}, this code reads {STATE_VERSION}")
        mine = self.state_dict()
        for k in ("seed", "world_size", "batch_size", "num_samples", "recipe"):
            if state[k] != mine[k]:
                raise ValueError(f"loader state has {k}={state[k]!r}, this loader {mine[k]!r}: resuming would "
                                 f"not reproduce the original order")
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"loader state batch={state['batch']} outside 0..{len(self)}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _segments(self, epoch: int, start: int):
        """(epoch, index batches) from (epoch, start) on: this epoch only, or every epoch after it when
        continuous."""
        yield epoch, self.sampler.batches(epoch, start)
        while self.continuous and len(self):
            epoch += 1
            yield epoch, self.sampler.batches(epoch)

    def _drop_stream(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # closes the generator: its producer threads stop
        self._stream = self._stream_at = self._finalizer = None

    def __iter__(self):
        """The batches of the current epoch from the current position; afterwards the loader is at the
        start of the next epoch (so set_epoch is optional)."""
        epoch, n = self.epoch, len(self)
        if self._stream is None or self._stream_at != (epoch, self.batch):
            self._drop_stream()
            self._stream = self.backend.iterate(self._segments(epoch, self.batch))
            self._stream_at = (epoch, self.batch)
            self._finalizer = weakref.finalize(self, self._stream.close)
        try:
            while self.batch < n:
                raw = next(self._stream, None)
                if raw is None:
                    break
                self._stream_at = (epoch, self.batch + 1) if self.batch + 1 < n else (epoch + 1, 0)
                out = self._finish(raw)
                self.batch += 1
                yield out
        except GeneratorExit:  # the consumer stopped early: the stream stays at (epoch, self.batch)
            raise
        except BaseException:
            self._drop_stream()  # an error in the producer (or the consumer) leaves it in no known state
            raise
        if not self.continuous:
            self._drop_stream()
        self.epoch, self.batch = epoch + 1, 0

    def _finish(self, raw: RawBatch) -> Batch:
        st = self.stats
        st["batches"] += 1
        st["samples"] += len(raw.index)
        st["skipped"] += len(raw.skipped)
        st["skipped_samples"].extend(raw.skipped[: max(0, 1000 - len(st["skipped_samples"]))])
        views, done = [], {}
        for v, view in enumerate(self.recipe.views):
            if v in raw.views:
                views.append(_on(raw.views[v], self.device))
                continue
            s = self.recipe.param_stream(v)
            if s not in done:
                if len(raw.index):
                    done[s] = torch_ops.photometric(_on(raw.crops[s], self.device), raw.params[v], view)
                else:
                    done[s] = torch.zeros(0, 3, view.size, view.size, device=self.device)
            views.append(torch_ops.to_output(done[s], view.color))
        return Batch(views=views, index=torch.from_numpy(raw.index.astype(np.int64)),
                     label=torch.from_numpy(raw.label.astype(np.int64)),
                     aug=aug_records(raw.params) if self.return_aug else None)

    def close(self) -> None:
        self._drop_stream()
        self.backend.close()


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A producer's tensor on the consumer's device and stream. Host tensors are copied non_blocking
    (from pageable memory CUDA stages them at once: no wait for the GPU's queue). Tensors the
    producer made on the GPU (on its own stream, synchronised there) are marked as used by this
    stream, so the caching allocator does not hand their memory back to the producer's stream while
    this one still reads it."""
    if t.is_cuda:
        t.record_stream(torch.cuda.current_stream(t.device))
        return t.to(device)
    return t.to(device, non_blocking=True)


def build_loader(data: str | Path, split: str = "train", recipe: str | RecipeSpec = "simclr",
                 backend: str = "dali", *, batch_size: int, image_size: int = 224, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: str = "cpu", num_threads: int = 2,
                 mode: str = "train", shuffle: bool | None = None, drop_last: bool | None = None,
                 return_aug: bool = False, validate: str = "markers", prefetch: int = 2,
                 continuous: bool | None = None, dali_graph: str | None = None) -> ViewLoader:
    """A multi-view loader over OUT/<split> (see the module docstring).

    recipe: a name of pipeline.RECIPES (built at `image_size`) or a RecipeSpec. backend: "dali" (shards
    + DALI decode, GPU decode and resize when device="cuda") or "ffcv" (the .beton). num_threads: DALI
    threads / ffcv workers. mode: "train" (shuffled, remainder dropped, continuous) or "eval" (dataset
    order, nothing dropped, read once): the defaults of shuffle / drop_last / continuous; each can be
    set on its own. validate: "markers" (structural JPEG check, cheap) or "decode" (also a strict
    decode; DALI). continuous: keep reading into the next epoch when one ends (see the module docstring).
    dali_graph: "fused" (DALI decodes and resizes, on its pipelined executor: the GPU graph, also
    runnable on the CPU) or "views" (CPU: DALI decodes, cpu_views cuts; the faster CPU path);
    default: fused on CUDA, views on the CPU.
    """
    spec = get_recipe(recipe, image_size)
    split_dir, dev, order = loader_setup(mode, data, split, device, shuffle, drop_last, continuous)
    if backend == "dali":
        from pipeline.loaders.dali import DaliBackend
        be = DaliBackend(split_dir, spec, batch_size=batch_size, device=dev, num_threads=num_threads,
                         seed=seed, validate=validate, prefetch=prefetch, graph=dali_graph)
        n = be.index.num_samples
    elif backend == "ffcv":
        if dali_graph is not None:
            raise ValueError("dali_graph applies to backend='dali' only")
        if validate != "markers":
            raise ValueError("backend='ffcv' supports validate='markers' only")
        from pipeline.loaders.ffcv import FfcvBackend
        be = FfcvBackend(split_dir, spec, batch_size=batch_size, device=dev, num_threads=num_threads,
                         seed=seed, prefetch=prefetch)
        n = len(be.widths)
    else:
        raise KeyError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    sampler = EpochSampler(num_samples=n, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                           shuffle=order["shuffle"], drop_last=order["drop_last"])
    return ViewLoader(be, spec, sampler, dev, return_aug, continuous=order["continuous"])


MODES = ("train", "eval")


def loader_setup(mode: str, data, split: str, device: str, shuffle: bool | None, drop_last: bool | None,
                 continuous: bool | None) -> tuple[Path, torch.device, dict]:
    """What build_loader and build_clip_loader share: the split directory (it must exist), the device
    (CUDA must be there when asked for) and the defaults of shuffle / drop_last / continuous (True for
    mode "train", False for "eval")."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: a loader's mode is 'train' or 'eval'")
    train = mode == "train"
    split_dir = Path(data) / split
    if not split_dir.is_dir():
        raise ShardError(f"{split_dir} does not exist: no converted split {split!r} under {data}")
    dev = resolve_device(device)
    pick = lambda v: train if v is None else bool(v)  # noqa: E731
    return split_dir, dev, {"shuffle": pick(shuffle), "drop_last": pick(drop_last), "continuous": pick(continuous)}

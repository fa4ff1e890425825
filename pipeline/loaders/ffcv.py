"""ffcv backend: ffcv's `Loader` over the .beton, with a decoder that cuts every view from one decode.

`ViewCropDecoder` is an ffcv `Operation` for the image field. Per sample, in ffcv's JIT (numba,
parallel over the batch): `jpeg_check` (the same structural check as the DALI path; a failing sample is
flagged, not decoded), one `imdecode` of the full image, then for each parameter stream one
`resize_crop` (OpenCV INTER_AREA) of the window that `pipeline.views.params.crop_box` gives for (seed, epoch,
global index, stream) -- the very function the DALI backend and the parameter records use, so both
backends crop the same windows. Why not ffcv's `RandomResizedCropRGBImageDecoder`: it draws crops from
its own unseeded generator (not reproducible, not resumable, no record) and gives one view per decode.
Why not decode at a fixed size and crop in torch: a small crop of a downscaled image loses resolution.

The output of the decoder is one flat uint8 row per sample: the views' pixels back to back and a last
byte that is 1 when the sample decoded. The loader drops flagged rows and counts them.

Order and partition: `order=SEQUENTIAL` with `indices=` this rank's order for the epoch (ffcv's
non-distributed Sequential order returns its `indices` as given). One ffcv Loader (one numba compile,
2-4 s on 2 cores) serves every epoch: before each epoch the backend writes the epoch number into a
one-element array that the compiled decoder reads at run time (`_u64_at`: numba would freeze a captured
array's contents at compile time) and sets the Sequential order's `indices` to the new epoch's order.
Why: building a Loader per epoch, as before, recompiled the decoder every epoch, which on the 8-batch
epochs of `pipeline.bench` took longer than the epoch itself (ffcv ran at ~1.0x the PIL pipeline).
A resumed epoch (fewer samples than a full one) gets its own Loader, compiled once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.format import layout as fmt
from pipeline.loaders.prefetch import RawBatch, prefetched, streams
from pipeline.views.cpu_views import CpuViews
from pipeline.views.params import crop_args, crop_box, sample_key, sample_params
from pipeline.format.errors import ShardError
from pipeline.format.jpeg import jpeg_check
from pipeline.views.spec import RecipeSpec


def _u64_reader():
    """A numba intrinsic: the uint64 stored at an integer address, read at run time."""
    from llvmlite import ir
    from numba import types as nbt
    from numba.extending import intrinsic

    @intrinsic
    def u64_at(typingctx, addr):
        def codegen(context, builder, signature, args):
            return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))
        return nbt.uint64(addr), codegen
    return u64_at


def _decoder_class():
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class ViewCropDecoder(Operation):
        def __init__(self, geoms: list[tuple], seed: int, epoch_cell: np.ndarray):
            """geoms: per stream (stream id, size, kind, smin, smax, rmin, rmax, center_fraction);
            epoch_cell: uint64 (1,) array holding the epoch, read by the compiled code at run time (the
            caller keeps it alive as long as the Loader)."""
            super().__init__()
            assert epoch_cell.dtype == np.uint64 and epoch_cell.flags.c_contiguous
            self.geoms, self.seed, self.epoch_cell = geoms, seed, epoch_cell
            self.total = sum(g[1] * g[1] * 3 for g in geoms)

        def declare_state_and_memory(self, previous_state):
            max_w = np.uint64(self.metadata["width"].max())
            max_h = np.uint64(self.metadata["height"].max())
            shape = (self.total + 1,)
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                    (AllocationQuery(shape, np.dtype("<u1")),
                     AllocationQuery((max_h * max_w * np.uint64(3),), np.dtype("<u1"))))

        def generate_code(self):
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            g = np.array([[s, size, kind, 0, 0, 0, 0, 0] for s, size, kind, *_ in self.geoms], np.int64)
            gf = np.array([[smin, smax, rmin, rmax, cf] for *_, smin, smax, rmin, rmax, cf in self.geoms])
            nstreams = len(self.geoms)
            seed, total = np.uint64(self.seed), self.total
            epoch_addr = np.int64(self.epoch_cell.ctypes.data)
            u64_at = _u64_reader()

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                epoch = u64_at(epoch_addr)
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.int64(field["height"])
                    width = np.int64(field["width"])
                    row = destination[dst_ix]
                    code, _, _ = jpeg_check(image_data)
                    if code != 0:
                        row[total] = 0
                        continue
                    temp = temp_storage[dst_ix]
                    r = imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, 1, False, False)
                    if r != 0:
                        row[total] = 0
                        continue
                    img = temp.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    off = 0
                    for k in range(nstreams):
                        size = g[k, 1]
                        key = sample_key(seed, epoch, np.uint64(source_ix), np.uint64(g[k, 0]))
                        y, x, h, w = crop_box(key, width, height, g[k, 2], gf[k, 0], gf[k, 1], gf[k, 2],
                                              gf[k, 3], gf[k, 4])
                        dst = row[off:off + size * size * 3].reshape(size, size, 3)
                        resize_crop_c(img, y, y + h, x, x + w, dst)
                        off += size * size * 3
                    row[total] = 1
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return ViewCropDecoder


class FfcvBackend:
    name = "ffcv"

    def __init__(self, split_dir: str | Path, recipe: RecipeSpec, *, batch_size: int, device: str = "cpu",
                 num_threads: int = 2, seed: int = 0, prefetch: int = 2):
        self.dir = Path(split_dir)
        manifest = fmt.load_manifest(self.dir)
        if not manifest.get("beton"):
            raise ShardError(f"{self.dir}: the manifest lists no .beton (converted without 'ffcv')")
        self.path = self.dir / manifest["beton"]["file"]
        if not self.path.is_file():
            raise ShardError(f".beton file {self.path} is missing (listed in {self.dir / fmt.MANIFEST})")
        from ffcv.reader import Reader
        try:
            reader = Reader(str(self.path))
        except Exception as e:
            raise ShardError(f"cannot read .beton file {self.path}: {e}") from e
        image = reader.metadata[f"f{list(reader.handlers).index('image')}"]  # ffcv names columns f<k>
        self.widths = image["width"].astype(np.int64)
        self.heights = image["height"].astype(np.int64)
        self.recipe, self.batch_size, self.seed = recipe, batch_size, seed
        self.device = torch.device(device)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.streams = streams(recipe)
        self.geoms = [(s, recipe.views[v].size, *crop_args(recipe.views[v])) for s, v in self.streams.items()]
        self._Decoder = _decoder_class()
        self._epoch_cell = np.zeros(1, np.uint64)
        self._loaders = {}  # order length -> ffcv Loader (a full epoch's, and a resumed epoch's)
        # on the CPU the photometric ops run per image in threads (pipeline.views.cpu_views); on a GPU, batched
        self._views = CpuViews(recipe, num_threads) if self.device.type == "cpu" else None

    def iterate(self, segments):
        """RawBatches for `segments` ((epoch, index batches) pairs), made by a thread up to `prefetch` ahead
        (ffcv's own threads decode; ours finishes the views and, at an epoch change, builds the next ffcv
        Loader while the consumer still has batches)."""
        return prefetched(self._raw(segments), self.prefetch, "ffcv-producer", self.device)

    def _raw(self, segments):
        for epoch, batches in segments:
            if batches:
                yield from self._epoch(epoch, batches)

    def _loader(self, order: np.ndarray):
        """The ffcv Loader for orders of this length, set to yield `order` on its next iteration."""
        loader = self._loaders.get(len(order))
        if loader is None:
            from ffcv.fields.basics import IntDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.pipeline import PipelineSpec
            decoder = self._Decoder(self.geoms, self.seed, self._epoch_cell)
            loader = Loader(str(self.path), batch_size=self.batch_size, num_workers=self.num_threads,
                            order=OrderOption.SEQUENTIAL, indices=order, drop_last=False, os_cache=True,
                            batches_ahead=self.prefetch,
                            pipelines={"image": PipelineSpec("image", decoder=decoder),
                                       "label": [IntDecoder()], "index": [IntDecoder()]})
            self._loaders[len(order)] = loader
        loader.traversal_order.indices = order  # what Sequential.sample_order returns (ffcv 1.0.x)
        return loader

    def _epoch(self, epoch: int, batches: list[np.ndarray]):
        order = np.concatenate(batches).astype(np.uint64)
        loader = self._loader(order)
        # the previous epoch's ffcv iterator has finished (the loop below ran to its end), so no batch
        # of it is decoding while the epoch changes
        self._epoch_cell[0] = epoch
        sizes = [g[1] for g in self.geoms]
        for b, (flat, label, index) in zip(batches, loader):
            flat, label, index = np.asarray(flat), np.asarray(label), np.asarray(index)
            idx = index.reshape(-1).astype(np.int64)
            if not np.array_equal(idx, b):
                raise RuntimeError("ffcv returned samples out of the requested order")
            ok = flat[:, -1].astype(bool)
            skipped = [(int(i), "JPEG failed the structural check or decode") for i in idx[~ok]]
            keep = idx[ok]
            flat_ok = torch.from_numpy(flat[ok]).to(self.device)  # a copy: ffcv reuses its buffers
            crops, off = {}, 0
            for (s, _), size in zip(self.streams.items(), sizes):
                n = size * size * 3
                crops[s] = flat_ok[:, off:off + n].reshape(-1, size, size, 3)
                off += n
            params = sample_params(self.recipe, self.seed, epoch, keep, self.widths[keep], self.heights[keep])
            views = {}
            if self._views is not None and len(keep):
                views, left = self._views.run(None, params, self.streams,
                                              resized={s: c.numpy() for s, c in crops.items()})
                crops = {s: torch.from_numpy(c) for s, c in left.items()}
            yield RawBatch(crops=crops, index=keep, label=label.reshape(-1)[ok].astype(np.int64),
                           params=params, skipped=skipped, views=views)

    def close(self):
        self._loaders.clear()
        if self._views is not None:
            self._views.close()



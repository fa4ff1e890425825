"""DALI backend: decode each image once, crop + resize it once per parameter stream.

Why bytes are fed through `fn.external_source` rather than read by `fn.readers.webdataset`: the reader
shuffles with its own buffer and splits shards between ranks by shard, so neither the per-rank sample
set nor the order is a function we control, and resuming after k batches cannot be exact. Here the
loader decides the order (`pipeline.loaders.sampler`), reads each JPEG with one `os.pread` at the offset its
shard's DALI index gives (`pipeline.format.shard_index.ShardIndex`), checks it (`jpeg_check`; a bad member is
skipped and counted, never reaches the decoder), and feeds the bytes and per-sample crop windows
(`roi_start` / `roi_end` argument inputs computed by `pipeline.views.params`) to the graph. `fn.readers.
webdataset` over the same shards and index files is what `pipeline.bench` uses for decode-only
throughput.

Graph with device="cuda": external_source(bytes) -> decoders.image(device="mixed", nvJPEG) -> per stream:
resize(roi_start, roi_end, size) on the GPU; flip and the photometric ops are `pipeline.views.torch_ops`,
batched on the GPU. With device="cpu": external_source(bytes) -> decoders.image (CPU, device_id=None),
and the decoded images (zero-copy views of DALI's output) go to `pipeline.views.cpu_views`, which cuts,
resizes and finishes every view per image in a thread pool. Why not DALI's CPU resize: measured on 2
cores, decode + two antialiased `fn.resize` ran at ~530 samples/s against ~1,000 for decode alone,
i.e. DALI's CPU resize cost more than the decode; torch's uint8 antialiased kernel is ~3x cheaper.
A producer thread runs read + check + params + DALI + views up to `prefetch` batches ahead of the
consumer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.loaders.prefetch import RawBatch, prefetched, streams, take
from pipeline.views.cpu_views import CpuViews
from pipeline.views.params import sample_params
from pipeline.format.errors import BadSample
from pipeline.format.jpeg import check_jpeg
from pipeline.format.shard_index import ShardIndex
from pipeline.views.spec import RecipeSpec


class DaliBackend:
    name = "dali"
    # Why 3: DALI reuses a graph's output buffers at its next run. In `iterate` the views thread works on
    # batch k while batch k+1 waits in the depth-1 queue and batch k+2 decodes; batch k+3 is decoded only
    # after the views of k are done (the views thread takes k+1 from the queue when it has finished k).
    # So three graphs in turn never overwrite images still in use, and nothing is copied out of DALI
    # (the copy cost ~0.1 ms per image, 3% of a sample's CPU time, measured).
    RING = 3
    DECODE_QUEUE = 1

    def __init__(self, split_dir: str | Path, recipe: RecipeSpec, *, batch_size: int, device: str = "cpu",
                 num_threads: int = 2, seed: int = 0, validate: str = "markers", prefetch: int = 2):
        if validate not in ("markers", "decode"):
            raise ValueError(f"validate={validate!r}: want 'markers' or 'decode'")
        self.index = ShardIndex(split_dir)
        self.recipe, self.batch_size, self.seed = recipe, batch_size, seed
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but CUDA is not available")
        self.num_threads, self.validate, self.prefetch = num_threads, validate, prefetch
        self.streams = streams(recipe)
        # CPU: a ring of RING identical graphs used in turn, so that the views can be cut from a batch's
        # decoded images in place while the next batches decode (see iterate); GPU: one graph.
        self._pipes = [None] * (self.RING if self.device.type == "cpu" else 1)
        self._turn = 0
        self._views = CpuViews(recipe, num_threads) if self.device.type == "cpu" else None

    # -- graph ------------------------------------------------------------------------------------------
    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        gpu = self.device.type == "cuda"
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=(self.device.index or 0) if gpu else None,
                        exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        with pipe:
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            if not gpu:
                # decode only the window that holds every view's crop (libjpeg-turbo skips the IDCT of
                # the rest: ~20% less decode time for two simclr crops, measured)
                anchor = fn.external_source(name="roi_anchor", dtype=types.INT32, ndim=1)
                shape = fn.external_source(name="roi_shape", dtype=types.INT32, ndim=1)
                # use_fast_idct: libjpeg-turbo's fast integer IDCT (JDCT_IFAST), as ffcv decodes with
                # TJFLAG_FASTDCT; ~5% less decode time (measured, DALI CPU decoder, 1 thread), pixel
                # differences of a level or two from the accurate IDCT at quality 90
                outs = [fn.decoders.image_slice(enc, anchor, shape, device="cpu", output_type=types.RGB,
                                                normalized_anchor=False, normalized_shape=False,
                                                axis_names="HW", use_fast_idct=True)]
            else:
                img = fn.decoders.image(enc, device="mixed", output_type=types.RGB)
                outs = []
            for s, v in (self.streams.items() if gpu else ()):
                size = self.recipe.views[v].size
                rs = fn.external_source(name=f"roi_start{s}", dtype=types.FLOAT, ndim=1)
                re = fn.external_source(name=f"roi_end{s}", dtype=types.FLOAT, ndim=1)
                outs.append(fn.resize(img, roi_start=rs, roi_end=re, roi_relative=False, size=[size, size],
                                      interp_type=types.INTERP_LINEAR, antialias=True))
            pipe.set_outputs(*outs)
        pipe.build()
        return pipe

    def _run(self, encoded: list[np.ndarray], params: list[dict]):
        """GPU: ({}, crops), the uint8 crops {stream: (n, S, S, 3)} for torch_ops. CPU: (pending, {}),
        the decoded windows for `_views_of`."""
        k = self._turn % len(self._pipes)
        self._turn += 1
        if self._pipes[k] is None:
            self._pipes[k] = self._build()
        pipe = self._pipes[k]
        pipe.feed_input("enc", encoded)
        if self._views is not None:
            boxes = np.stack([params[v]["crop"] for v in self.streams.values()])  # (streams, n, 4)
            top_left = boxes[:, :, :2].min(0)
            bottom_right = (boxes[:, :, :2] + boxes[:, :, 2:]).max(0)
            pipe.feed_input("roi_anchor", list(top_left.astype(np.int32)))
            pipe.feed_input("roi_shape", list((bottom_right - top_left).astype(np.int32)))
            out, = pipe.run()
            # views into this graph's output buffer, valid until the graph runs again (see RING)
            images = [np.asarray(out[i]) for i in range(len(encoded))]
            return (images, params, top_left, out), {}
        for s, v in self.streams.items():
            box = params[v]["crop"].astype(np.float32)  # top, left, h, w
            pipe.feed_input(f"roi_start{s}", list(box[:, :2]))
            pipe.feed_input(f"roi_end{s}", list(box[:, :2] + box[:, 2:]))
        outs = pipe.run()
        crops = {}
        for s, out in zip(self.streams, outs):
            t = out.as_tensor()
            if self.device.type == "cuda":
                from nvidia.dali.plugin.pytorch import feed_ndarray
                dst = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
                feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
                crops[s] = dst
            else:
                crops[s] = torch.from_numpy(np.array(t))
        return {}, crops

    # -- one batch --------------------------------------------------------------------------------------
    def load(self, epoch: int, indices: np.ndarray) -> RawBatch:
        encoded, keep, labels, hs, ws, skipped = [], [], [], [], [], []
        for i in indices.tolist():
            data, label = self.index.read(i)
            arr = np.frombuffer(data, np.uint8)
            try:
                h, w = check_jpeg(arr, self.validate)
            except BadSample as e:
                skipped.append((i, str(e)))
                continue
            encoded.append(arr)
            keep.append(i)
            labels.append(label)
            hs.append(h)
            ws.append(w)
        keep_a = np.asarray(keep, np.int64)
        params = sample_params(self.recipe, self.seed, epoch, keep_a, np.asarray(ws), np.asarray(hs))
        if not keep:
            return RawBatch(crops={}, index=keep_a, label=np.zeros(0, np.int64), params=params, skipped=skipped)
        try:
            views, crops = self._run(encoded, params)
        except Exception:
            # A decoder error despite the check: find the culprits with a strict decode, rebuild the
            # graph (its state after an error is not to be trusted) and run the rest again.
            self._pipes[(self._turn - 1) % len(self._pipes)] = None
            ok = []
            for j, i in enumerate(keep):
                try:
                    check_jpeg(encoded[j], "decode")
                    ok.append(j)
                except BadSample as e:
                    skipped.append((i, str(e)))
            if len(ok) == len(keep):
                raise
            ok_a = np.asarray(ok, np.int64)
            encoded = [encoded[j] for j in ok]
            keep_a, labels, params = keep_a[ok_a], [labels[j] for j in ok], take(params, ok_a)
            views, crops = self._run(encoded, params) if ok else ({}, {})
        raw = RawBatch(crops=crops, index=keep_a, label=np.asarray(labels, np.int64), params=params,
                       skipped=skipped)
        if self._views is not None:
            raw.views = views  # pending (images, params, origins) until _views_of
        return raw

    def _views_of(self, raw: RawBatch) -> RawBatch:
        """CPU: cut and finish the views of a decoded batch (pipeline.views.cpu_views)."""
        if isinstance(raw.views, tuple):
            images, params, origins, _ = raw.views
            views, crops = self._views.run(images, params, self.streams, origins=origins)
            raw.views, raw.crops = views, {s: torch.from_numpy(c) for s, c in crops.items()}
        return raw

    def iterate(self, segments):
        """RawBatches for `segments` ((epoch, index batches) pairs), produced by a thread up to `prefetch`
        ahead. On the CPU two threads: one reads and decodes (DALI's threads), one makes the views (the
        cpu_views pool), so that decoding batch k+1 overlaps the views of batch k."""
        raw = (self.load(epoch, b) for epoch, batches in segments for b in batches)
        if self._views is None:
            return prefetched(raw, self.prefetch, "dali-producer")
        decoded = prefetched(raw, self.DECODE_QUEUE, "dali-decode")
        return prefetched((self._views_of(r) for r in decoded), self.prefetch, "cpu-views")

    def close(self):
        self._pipes = [None] * len(self._pipes)
        if self._views is not None:
            self._views.close()
        self.index.close()

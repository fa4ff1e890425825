"""DALI backend: decode each image once, crop + resize it once per parameter stream.

Why bytes are fed through `fn.external_source` rather than read by `fn.readers.webdataset`: the reader
shuffles with its own buffer and splits shards between ranks by shard, so neither the per-rank sample
set nor the order is a function we control, and resuming after k batches cannot be exact. Here the
loader decides the order (`pipeline.loaders.sampler`), reads a batch's JPEGs with coalesced `os.pread`s at the
offsets its shards' DALI indexes give (`pipeline.format.shard_index.ShardIndex.read_many`), checks each (`jpeg_check`; a bad member is
skipped and counted, never reaches the decoder), and feeds the bytes and per-sample crop windows
(`roi_start` / `roi_end` argument inputs computed by `pipeline.views.params`) to the graph. `fn.readers.
webdataset` over the same shards and index files is what `pipeline.bench` uses for decode-only
throughput.

Graph with device="cuda" (the "fused" graph): external_source(bytes) -> decoders.image(device="mixed",
nvJPEG) -> per stream: resize(roi_start, roi_end, size) on the GPU; flip and the photometric ops are
`pipeline.views.torch_ops`, batched on the GPU. It runs on DALI's pipelined executor (exec_async,
exec_pipelined) with PIPELINE_DEPTH batches in flight (`ScheduledGraph`): the producer thread feeds
batch k+2 while DALI decodes k+1 and the trainer uses k. The same graph with CPU operators
(graph="fused" on the CPU) is how the tests run that code path without a GPU. With device="cpu": external_source(bytes) -> decoders.image (CPU, device_id=None),
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

from collections import deque

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
    # Fused graph: batches DALI holds at once (fed and scheduled, decoding, done but not yet copied
    # out). 2 lets one decode while the next is fed; more only adds GPU memory for decoded images.
    PIPELINE_DEPTH = 2

    def __init__(self, split_dir: str | Path, recipe: RecipeSpec, *, batch_size: int, device: str = "cpu",
                 num_threads: int = 2, seed: int = 0, validate: str = "markers", prefetch: int = 2,
                 graph: str | None = None):
        if validate not in ("markers", "decode"):
            raise ValueError(f"validate={validate!r}: want 'markers' or 'decode'")
        self.index = ShardIndex(split_dir)
        self.recipe, self.batch_size, self.seed = recipe, batch_size, seed
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but CUDA is not available")
        self.num_threads, self.validate, self.prefetch = num_threads, validate, prefetch
        self.streams = streams(recipe)
        # graph: "views" (CPU only: DALI decodes, cpu_views cuts and finishes the views) or "fused"
        # (DALI decodes and resizes every stream; photometric ops in torch). GPU: always fused.
        graph = graph or ("fused" if self.device.type == "cuda" else "views")
        if graph not in ("views", "fused") or (graph == "views" and self.device.type == "cuda"):
            raise ValueError(f"graph={graph!r}: 'fused' (any device) or 'views' (CPU)")
        self.fused = graph == "fused"
        # views graph: a ring of RING identical graphs used in turn, so that the views can be cut from
        # a batch's decoded images in place while the next batches decode (see iterate). Why not the
        # pipelined executor there: its output buffers are recycled when the next outputs are taken,
        # and the views are cut from them zero-copy in another thread. fused: one ScheduledGraph.
        self._pipes = [None] * (1 if self.fused else self.RING)
        self._turn = 0
        self._views = None if self.fused else CpuViews(recipe, num_threads)
        self._graph: ScheduledGraph | None = None
        self._stream = None  # the fused GPU graph's copy-out stream (made in the producer thread)

    # -- graph ------------------------------------------------------------------------------------------
    def pipeline_kwargs(self) -> dict:
        """Pipeline(...) arguments: the device's own index (never GPU 0 for another rank's loader),
        the pipelined executor for the fused graph, the synchronous one for the views ring."""
        gpu = self.device.type == "cuda"
        if gpu and self.device.index is None:
            raise ValueError("DaliBackend needs an indexed CUDA device (pipeline.loaders.prefetch."
                             "resolve_device)")
        kw = dict(batch_size=self.batch_size, num_threads=self.num_threads,
                  device_id=self.device.index if gpu else None)
        if self.fused:
            return kw | dict(exec_async=True, exec_pipelined=True, prefetch_queue_depth=self.PIPELINE_DEPTH)
        return kw | dict(exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        gpu = self.device.type == "cuda"
        pipe = Pipeline(**self.pipeline_kwargs())
        with pipe:
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            if not self.fused:
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
                img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
                outs = []
            for s, v in (self.streams.items() if self.fused else ()):
                size = self.recipe.views[v].size
                rs = fn.external_source(name=f"roi_start{s}", dtype=types.FLOAT, ndim=1)
                re = fn.external_source(name=f"roi_end{s}", dtype=types.FLOAT, ndim=1)
                outs.append(fn.resize(img, roi_start=rs, roi_end=re, roi_relative=False, size=[size, size],
                                      interp_type=types.INTERP_LINEAR, antialias=True))
            pipe.set_outputs(*outs)
        pipe.build()
        return pipe

    def _run(self, encoded: list[np.ndarray], params: list[dict]):
        """Views graph: the decoded windows (images, params, origins, out) for `_views_of`."""
        k = self._turn % len(self._pipes)
        self._turn += 1
        if self._pipes[k] is None:
            self._pipes[k] = self._build()
        pipe = self._pipes[k]
        pipe.feed_input("enc", encoded)
        boxes = np.stack([params[v]["crop"] for v in self.streams.values()])  # (streams, n, 4)
        top_left = boxes[:, :, :2].min(0)
        bottom_right = (boxes[:, :, :2] + boxes[:, :, 2:]).max(0)
        pipe.feed_input("roi_anchor", list(top_left.astype(np.int32)))
        pipe.feed_input("roi_shape", list((bottom_right - top_left).astype(np.int32)))
        out, = pipe.run()
        # views into this graph's output buffer, valid until the graph runs again (see RING)
        images = [np.asarray(out[i]) for i in range(len(encoded))]
        return images, params, top_left, out

    def _feeds(self, encoded: list[np.ndarray], params: list[dict]) -> dict[str, list]:
        """Fused graph: every external source's input for one batch."""
        feeds = {"enc": encoded}
        for s, v in self.streams.items():
            box = params[v]["crop"].astype(np.float32)  # top, left, h, w
            feeds[f"roi_start{s}"] = list(box[:, :2])
            feeds[f"roi_end{s}"] = list(box[:, :2] + box[:, 2:])
        return feeds

    def _crops(self, outs) -> dict[int, torch.Tensor]:
        """Fused graph: DALI's outputs as uint8 (n, S, S, 3) tensors on the loader's device. GPU: copied
        on the producer's own stream, which is synchronised before DALI gets the buffers back."""
        crops = {}
        for s, out in zip(self.streams, outs):
            t = out.as_tensor()
            if self.device.type == "cuda":
                from nvidia.dali.plugin.pytorch import feed_ndarray
                if self._stream is None:
                    self._stream = torch.cuda.Stream(self.device)
                with torch.cuda.stream(self._stream):
                    dst = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
                    feed_ndarray(t, dst, cuda_stream=self._stream)
                crops[s] = dst
            else:
                crops[s] = torch.from_numpy(np.array(t))
        if self._stream is not None:
            self._stream.synchronize()
        return crops

    # -- one batch --------------------------------------------------------------------------------------
    def _prepare(self, epoch: int, indices: np.ndarray) -> dict:
        """Host part of a batch: read (coalesced), check, sample the view parameters."""
        encoded, keep, labels, hs, ws, skipped = [], [], [], [], [], []
        for i, (arr, label) in zip(indices.tolist(), self.index.read_many(indices)):
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
        return dict(encoded=encoded, keep=keep_a, labels=labels, params=params, skipped=skipped)

    def _raw(self, b: dict, crops=None, views=None) -> RawBatch:
        raw = RawBatch(crops=crops or {}, index=b["keep"], label=np.asarray(b["labels"], np.int64),
                       params=b["params"], skipped=b["skipped"])
        if views is not None:
            raw.views = views  # pending (images, params, origins) until _views_of
        return raw

    def _drop_culprits(self, b: dict) -> bool:
        """After a decoder error: find the members a strict decode rejects and drop them from the
        batch (skipped, with the reason). False when all pass, i.e. the error was not theirs."""
        ok = []
        for j, i in enumerate(b["keep"].tolist()):
            try:
                check_jpeg(b["encoded"][j], "decode")
                ok.append(j)
            except BadSample as e:
                b["skipped"].append((i, str(e)))
        if len(ok) == len(b["keep"]):
            return False
        ok_a = np.asarray(ok, np.int64)
        b["encoded"] = [b["encoded"][j] for j in ok]
        b["keep"], b["labels"] = b["keep"][ok_a], [b["labels"][j] for j in ok]
        b["params"] = take(b["params"], ok_a)
        return True

    def load(self, epoch: int, indices: np.ndarray) -> RawBatch:
        """One batch through the views graph (CPU)."""
        b = self._prepare(epoch, indices)
        if not len(b["keep"]):
            return self._raw(b)
        try:
            views = self._run(b["encoded"], b["params"])
        except Exception:
            # A decoder error despite the check: find the culprits with a strict decode, rebuild the
            # graph (its state after an error is not to be trusted) and run the rest again.
            self._pipes[(self._turn - 1) % len(self._pipes)] = None
            if not self._drop_culprits(b):
                raise
            if not len(b["keep"]):
                return self._raw(b)
            views = self._run(b["encoded"], b["params"])
        return self._raw(b, views=views)

    def _fused_batches(self, segments):
        """RawBatches through the fused graph, PIPELINE_DEPTH in flight. On a decoder error (raised by
        whichever DALI call meets it first) the held batches are cleaned of their culprits, the graph
        is rebuilt and they run again."""
        prepared = (self._prepare(epoch, b) for epoch, batches in segments for b in batches)
        pending: deque = deque()
        for b in prepared:
            pending.append(b)  # an empty batch too: it keeps its place in the order
            if len(b["keep"]):
                try:
                    if self._graph is None:
                        self._graph = ScheduledGraph(self._build(), self.PIPELINE_DEPTH)
                    self._graph.submit(self._feeds(b["encoded"], b["params"]))
                except Exception as e:
                    self._recover(pending, e)
            while pending and (not len(pending[0]["keep"]) or self._graph.full()):
                yield self._collect(pending)
        while pending:
            if len(pending[0]["keep"]):
                try:
                    self._graph.flush()
                except Exception as e:
                    self._recover(pending, e)
                    continue
            yield self._collect(pending)

    def _collect(self, pending: deque) -> RawBatch:
        while True:
            b = pending[0]
            if not len(b["keep"]):
                pending.popleft()
                return self._raw(b)
            try:
                if not self._graph.started:
                    self._graph.flush()
                outs = self._graph.collect()
                break
            except Exception as e:
                self._recover(pending, e)
        try:
            crops = self._crops(outs)
        finally:
            self._graph.release()
        pending.popleft()
        return self._raw(b, crops=crops)

    def _recover(self, pending: deque, error: Exception) -> None:
        """After a DALI error: drop the culprits of every held batch (a strict decode of each member),
        rebuild the graph and feed the held batches again, in order. No culprit anywhere: the error
        is not the data's, re-raised."""
        self._graph = None  # its state after an error is not to be trusted
        found = [self._drop_culprits(b) for b in pending if len(b["keep"])]
        if not any(found):
            raise error
        self._graph = ScheduledGraph(self._build(), self.PIPELINE_DEPTH)
        for b in pending:
            if len(b["keep"]):
                self._graph.submit(self._feeds(b["encoded"], b["params"]))

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
        if self.fused:
            return prefetched(self._fused_batches(segments), self.prefetch, "dali-producer", self.device)
        raw = (self.load(epoch, b) for epoch, batches in segments for b in batches)
        decoded = prefetched(raw, self.DECODE_QUEUE, "dali-decode")
        return prefetched((self._views_of(r) for r in decoded), self.prefetch, "cpu-views")

    def close(self):
        self._pipes = [None] * len(self._pipes)
        self._graph = None
        if self._views is not None:
            self._views.close()
        self.index.close()


class ScheduledGraph:
    """A DALI pipeline on its pipelined executor, fed with feed_input, `depth` batches in flight.

    DALI's protocol: the first schedule_run() prefetches `depth` iterations, so `depth` batches
    must be fed before it; afterwards each schedule_run() runs one more fed batch, outputs() returns
    the oldest finished one (FIFO) and release_outputs() gives its buffers back. A stream that ends
    with fewer than `depth` batches fed is padded with copies of the last one, whose outputs are
    dropped (`flush`)."""

    def __init__(self, pipe, depth: int):
        self.pipe, self.depth = pipe, depth
        self.started = False
        self.fed = 0  # batches fed whose outputs are not yet collected (padding excluded)
        self.padding = 0
        self._last: dict | None = None

    def submit(self, feeds: dict[str, list]) -> None:
        for name, data in feeds.items():
            self.pipe.feed_input(name, data)
        self.fed += 1
        self._last = feeds
        if self.started:
            self.pipe.schedule_run()
        elif self.fed == self.depth:
            self.pipe.schedule_run()  # prefetch: runs the `depth` fed iterations
            self.started = True

    def full(self) -> bool:
        """True when `depth` batches are scheduled: time to collect the oldest."""
        return self.started and self.fed >= self.depth

    def flush(self) -> None:
        """Start the graph even though fewer than `depth` batches were fed (end of the stream)."""
        if not self.started and self.fed:
            last = self._last
            while self.fed + self.padding < self.depth:
                for name, data in last.items():
                    self.pipe.feed_input(name, data)
                self.padding += 1
            self.pipe.schedule_run()
            self.started = True

    def collect(self):
        """The oldest scheduled batch's outputs (call release() when done with them)."""
        if not self.started:
            raise RuntimeError("collect() before the graph started: submit or flush first")
        outs = self.pipe.outputs()
        self.fed -= 1
        return outs

    def release(self) -> None:
        self.pipe.release_outputs()

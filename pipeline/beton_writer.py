"""Streaming FFCV (.beton) writer that stores already-encoded JPEG bytes as they are.

Why not `ffcv.writer.DatasetWriter`: its `RGBImageField.encode` takes a pixel array, so every image is
decoded and re-encoded with OpenCV (a second generation loss and most of the conversion time), its
workers race for pages (the file layout depends on scheduling, so two runs differ), and it needs the
sample count and a shared-memory metadata table up front. This writer produces the same on-disk
format from ffcv's own type definitions (`HeaderType`, `FieldDescType`, `ALLOC_TABLE_TYPE`, each
field's `metadata_type`), using the same page allocation rule as ffcv's `MemoryAllocator` (a sample
never straddles a page; pages are aligned to absolute file offsets, as ffcv's page reader assumes), in
sample order, so the output is byte-identical run to run. Samples are read back by ffcv's `Loader`
with its stock `RGBImageField` decoders (mode 0 = 'jpg').
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                        get_metadata_type)
from ffcv.utils import align_to_page
from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE

from .atomic import commit, partial_path, sha256_file

DEFAULT_PAGE_SIZE = 4 * MIN_PAGE_SIZE  # ffcv's DatasetWriter default (8 MiB)

FIELDS = {"image": RGBImageField(write_mode="jpg"), "label": IntField(), "index": IntField()}


def page_size_for(max_sample_bytes: int) -> int:
    """ffcv needs every sample inside one page: the default, or the next power of two that fits."""
    size = DEFAULT_PAGE_SIZE
    while size < max_sample_bytes:
        size *= 2
    if size >= MAX_PAGE_SIZE:
        raise ValueError(f"a {max_sample_bytes}-byte sample does not fit any ffcv page size")
    return size


class BetonWriter:
    """`add(jpeg, width, height, label, index)` in sample-id order, then `close()`.

    The metadata table sits before the data region, so its size must be known: pass `num_samples`.
    Sample ids are 0..num_samples-1 in call order; the `index` field holds the global index.
    """

    def __init__(self, path: str | Path, num_samples: int, page_size: int = DEFAULT_PAGE_SIZE):
        self.path = Path(path)
        self.num_samples = num_samples
        self.page_size = page_size
        handlers = list(FIELDS.values())
        self.metadata = np.zeros(num_samples, dtype=get_metadata_type(handlers))
        desc = np.zeros(len(FIELDS), dtype=FieldDescType)
        type_ids = {v: k for k, v in TYPE_ID_HANDLER.items()}
        for i, (name, field) in enumerate(FIELDS.items()):
            desc[i]["type_id"] = type_ids[type(field)]
            enc = np.frombuffer(name.encode("ascii"), dtype="<u1")
            desc[i]["name"][:len(enc)] = enc
            desc[i]["arguments"][:] = field.to_binary()[0]
        self.header = np.zeros(1, dtype=HeaderType)[0]
        self.header["version"] = CURRENT_VERSION
        self.header["num_fields"] = len(FIELDS)
        self.header["page_size"] = page_size
        self.header["num_samples"] = num_samples
        self.metadata_start = HeaderType.itemsize + desc.nbytes
        data_start = align_to_page(self.metadata_start + self.metadata.nbytes, page_size)
        self._f = open(partial_path(self.path), "wb")
        # Reserve header + descriptors + metadata, padded to the first page; rewritten at close().
        self._f.write(self.header.tobytes() + desc.tobytes())
        self._f.write(b"\0" * (data_start - self._f.tell()))
        self._page_start = data_start
        self._page = bytearray()
        self._alloc = np.zeros(num_samples, dtype=ALLOC_TABLE_TYPE)
        self._next = 0

    def add(self, jpeg: bytes, width: int, height: int, label: int, index: int) -> None:
        sid = self._next
        if sid >= self.num_samples:
            raise ValueError("more samples than announced")
        n = len(jpeg)
        if n > self.page_size:
            raise ValueError(f"sample {index}: {n} bytes exceed the page size {self.page_size}")
        if len(self._page) + n > self.page_size:
            self._flush_page()
        ptr = self._page_start + len(self._page)
        self._page += jpeg
        self._alloc[sid] = (sid, ptr, n)
        row = self.metadata[sid]
        row["f0"]["mode"] = IMAGE_MODES["jpg"]
        row["f0"]["width"] = width
        row["f0"]["height"] = height
        row["f0"]["data_ptr"] = ptr
        row["f1"] = label
        row["f2"] = index
        self._next += 1

    def _flush_page(self) -> None:
        if not self._page:
            return
        # ffcv writes whole pages (zero padded) so that page-granular readers never read past EOF.
        self._f.write(bytes(self._page) + b"\0" * (self.page_size - len(self._page)))
        self._page_start += self.page_size
        self._page = bytearray()

    def close(self) -> str:
        if self._next != self.num_samples:
            self.abort()
            raise ValueError(f"{self.path}: got {self._next} samples, announced {self.num_samples}")
        self._flush_page()
        self.header["alloc_table_ptr"] = self._f.tell()
        self._f.write(self._alloc.tobytes())
        self._f.seek(0)
        self._f.write(self.header.tobytes())
        self._f.seek(self.metadata_start)
        self._f.write(self.metadata.tobytes())
        commit(self._f, self.path)
        return sha256_file(self.path)

    def abort(self) -> None:
        self._f.close()
        partial_path(self.path).unlink(missing_ok=True)

"""FFCV (.beton) writer that stores already-encoded JPEG bytes as they are.

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
from typing import Callable

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                        get_metadata_type)
from ffcv.utils import align_to_page
from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE

from pipeline.convert.atomic import HashingWriter

DEFAULT_PAGE_SIZE = 4 * MIN_PAGE_SIZE  # ffcv's DatasetWriter default (8 MiB)

# IMAGE_MODES is a numba typed dict: every lookup goes through the JIT (~1 ms), so read it once.
JPG_MODE = int(IMAGE_MODES["jpg"])

FIELDS = {"image": RGBImageField(write_mode="jpg"), "label": IntField(), "index": IntField()}


def page_size_for(max_sample_bytes: int) -> int:
    """ffcv needs every sample inside one page: the default, or the next power of two that fits."""
    size = DEFAULT_PAGE_SIZE
    while size < max_sample_bytes:
        size *= 2
    if size >= MAX_PAGE_SIZE:
        raise ValueError(f"a {max_sample_bytes}-byte sample does not fit any ffcv page size")
    return size


def write_beton(path: str | Path, *, sizes: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                labels: np.ndarray, indices: np.ndarray, read_jpeg: Callable[[int], bytes],
                page_size: int | None = None, progress=None) -> dict:
    """Write a .beton in one sequential pass and return {"sha256", "bytes", "page_size"}.

    Sample id s (0..n-1) gets image bytes `read_jpeg(s)` (exactly `sizes[s]` long), label and index.
    All sizes are known up front, so the page layout, the metadata table and the allocation table are
    computed first and the file is written front to back, hashed as it goes: no seek, no re-read.
    """
    n = len(sizes)
    sizes = np.asarray(sizes, np.int64)
    page_size = page_size or page_size_for(int(sizes.max(initial=0)))
    if sizes.max(initial=0) > page_size:
        raise ValueError(f"a {int(sizes.max())}-byte image exceeds the page size {page_size}")
    handlers = list(FIELDS.values())
    desc = np.zeros(len(FIELDS), dtype=FieldDescType)
    type_ids = {v: k for k, v in TYPE_ID_HANDLER.items()}
    for i, (name, field) in enumerate(FIELDS.items()):
        desc[i]["type_id"] = type_ids[type(field)]
        enc = np.frombuffer(name.encode("ascii"), dtype="<u1")
        desc[i]["name"][:len(enc)] = enc
        desc[i]["arguments"][:] = field.to_binary()[0]
    metadata = np.zeros(n, dtype=get_metadata_type(handlers))
    metadata_start = HeaderType.itemsize + desc.nbytes
    data_start = align_to_page(metadata_start + metadata.nbytes, page_size)

    # ffcv's allocation rule: fill the current page; a sample that does not fit starts a new one.
    page_of = np.empty(n, np.int64)
    ptr = np.empty(n, np.int64)
    page, fill = 0, 0
    for s_id, sz in enumerate(sizes.tolist()):
        if fill + sz > page_size:
            page, fill = page + 1, 0
        page_of[s_id], ptr[s_id] = page, data_start + page * page_size + fill
        fill += sz
    num_pages = page + 1 if n else 0
    img = metadata["f0"]
    img["mode"], img["width"], img["height"], img["data_ptr"] = JPG_MODE, widths, heights, ptr
    metadata["f1"], metadata["f2"] = labels, indices
    alloc = np.zeros(n, dtype=ALLOC_TABLE_TYPE)
    alloc["sample_id"], alloc["ptr"], alloc["size"] = np.arange(n), ptr, sizes
    header = np.zeros(1, dtype=HeaderType)[0]
    header["version"], header["num_fields"], header["page_size"] = CURRENT_VERSION, len(FIELDS), page_size
    header["num_samples"], header["alloc_table_ptr"] = n, data_start + num_pages * page_size

    out = HashingWriter(path, max_queued=4)  # write + hash on a thread while the next page is read
    try:
        head = header.tobytes() + desc.tobytes() + metadata.tobytes()
        out.write(head + bytes(data_start - len(head)))
        bounds = np.searchsorted(page_of, np.arange(num_pages + 1))
        for p in range(num_pages):
            buf = bytearray(page_size)  # fresh buffer: the previous one may still be queued
            pos = 0
            for s_id in range(bounds[p], bounds[p + 1]):
                b = read_jpeg(s_id)
                if len(b) != sizes[s_id]:
                    raise ValueError(f"sample {s_id}: read {len(b)} bytes, expected {sizes[s_id]}")
                buf[pos:pos + len(b)] = b
                pos += len(b)
            out.write(buf)  # ffcv writes whole pages; the tail of buf is still zero
            if progress is not None:
                progress(int(bounds[p + 1] - bounds[p]))
        out.write(alloc.tobytes())
        sha = out.finish()
        out.commit()
    except BaseException:
        out.abort()
        raise
    return {"sha256": sha, "bytes": out.size, "page_size": page_size}

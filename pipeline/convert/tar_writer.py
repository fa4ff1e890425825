"""Deterministic WebDataset shard writer that emits the DALI index (`wds2idx` format v1.2) inline.

Why not `webdataset.TarWriter` + running `wds2idx` afterwards: TarWriter stamps the current time and
user into every header (so two runs never produce the same bytes, which breaks byte-identical resume),
and `wds2idx` re-reads every shard through two `tar` subprocesses. Here each header is fixed (mtime 0,
uid/gid 0, mode 0444, ustar) and the offsets are known while writing, so the index costs nothing. The
test suite checks the index against `wds2idx`'s own output, and the shards against `tarfile`,
`webdataset` and DALI's reader.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from pipeline.convert.atomic import HashingWriter, atomic_open

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking factor; GNU tar and tarfile pad archives to it


def tar_header(name: str, size: int) -> bytes:
    """The ustar header `tarfile` writes for a regular file with mtime 0, uid/gid 0, mode 0444."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


_TEMPLATE = bytearray(tar_header("x", 0))
_TEMPLATE[148:156] = b"        "  # checksum is computed over the header with this field as spaces
_TEMPLATE_SUM = sum(_TEMPLATE) - ord("x")


def fast_tar_header(name: str, size: int) -> bytes:
    """tar_header() without TarInfo's per-field Python work (it was a third of a pass-through
    conversion's main-thread time). Same bytes: tests compare the two for many names and sizes."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:
        return tar_header(name, size)
    h = bytearray(_TEMPLATE)
    h[0:1] = b"\0"
    h[0:len(raw)] = raw
    h[124:136] = b"%011o\0" % size
    chk = _TEMPLATE_SUM + sum(raw) + sum(h[124:136]) - sum(_TEMPLATE[124:136])
    h[148:156] = b"%06o\0 " % chk
    return bytes(h)


class ShardWriter:
    """Write one shard: `add(key, {ext: bytes})` per sample in order, then `close()` renames the .tar and
    .idx into place (atomically, tar first) and returns (sha256 of tar, sha256 of idx, size in bytes).
    Bytes are written and hashed on a background thread (HashingWriter); `close()` may run on another
    thread than `add()` (the converter commits shards on a committer thread)."""

    def __init__(self, tar_path: str | Path, idx_path: str | Path):
        self.tar_path, self.idx_path = Path(tar_path), Path(idx_path)
        self._out = HashingWriter(self.tar_path)
        self._idx_lines: list[str] = []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        parts, chunks = [], []
        pos = self._out.size
        for ext, data in members.items():
            name = f"{key}.{ext}"
            chunks.append(fast_tar_header(name, len(data)))
            pos += BLOCK
            parts.append(f"{ext} {pos} {len(data)} {name}")
            pad = (-len(data)) % BLOCK
            chunks += (data, _ZEROS[:pad])
            pos += len(data) + pad
        # One chunk per sample: a queue hand-off per tar member costs more than this copy.
        self._out.write(b"".join(chunks))
        self._idx_lines.append(" ".join(parts))

    @property
    def num_samples(self) -> int:
        return len(self._idx_lines)

    def close(self) -> tuple[str, str, int]:
        if not self._idx_lines:
            self.abort()
            raise ValueError(f"refusing to write an empty shard {self.tar_path}")
        self._out.write(bytes(2 * BLOCK))
        self._out.write(bytes((-self._out.size) % RECORD))
        size = self._out.size
        tar_sha = self._out.finish()
        self._out.commit()
        idx = f"v1.2 {len(self._idx_lines)}\n" + "".join(line + "\n" for line in self._idx_lines)
        idx_bytes = idx.encode("utf-8")
        with atomic_open(self.idx_path, "wb") as f:
            f.write(idx_bytes)
        return tar_sha, hashlib.sha256(idx_bytes).hexdigest(), size

    def abort(self) -> None:
        self._out.abort()


_ZEROS = bytes(BLOCK)

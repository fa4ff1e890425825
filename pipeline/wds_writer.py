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

from .atomic import atomic_open, commit, partial_path

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking factor; GNU tar and tarfile pad archives to it


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class ShardWriter:
    """Write one shard: `add(key, {ext: bytes})` per sample in order, then `close()` renames the .tar and
    .idx into place (atomically, tar first) and returns (sha256 of tar, sha256 of idx, size in bytes)."""

    def __init__(self, tar_path: str | Path, idx_path: str | Path):
        self.tar_path, self.idx_path = Path(tar_path), Path(idx_path)
        self._f = open(partial_path(self.tar_path), "wb")
        self._pos = 0
        self._sha = hashlib.sha256()
        self._idx_lines: list[str] = []

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._sha.update(b)
        self._pos += len(b)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        parts = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            header = _header(name, len(data))
            self._write(header)
            parts.append(f"{ext} {self._pos} {len(data)} {name}")
            self._write(data)
            pad = (-len(data)) % BLOCK
            if pad:
                self._write(b"\0" * pad)
        self._idx_lines.append(" ".join(parts))

    @property
    def num_samples(self) -> int:
        return len(self._idx_lines)

    def close(self) -> tuple[str, str, int]:
        if not self._idx_lines:
            self.abort()
            raise ValueError(f"refusing to write an empty shard {self.tar_path}")
        self._write(b"\0" * (2 * BLOCK))
        self._write(b"\0" * ((-self._pos) % RECORD))
        size = self._pos
        tar_sha = self._sha.hexdigest()
        commit(self._f, self.tar_path)
        idx = f"v1.2 {len(self._idx_lines)}\n" + "".join(line + "\n" for line in self._idx_lines)
        idx_bytes = idx.encode("utf-8")
        with atomic_open(self.idx_path, "wb") as f:
            f.write(idx_bytes)
        return tar_sha, hashlib.sha256(idx_bytes).hexdigest(), size

    def abort(self) -> None:
        self._f.close()
        partial_path(self.tar_path).unlink(missing_ok=True)


def iter_shard(tar_path: str | Path):
    """Yield (key, {ext: bytes}) for each sample of a shard, streaming (bounded memory)."""
    current, members = None, {}
    with tarfile.open(tar_path, "r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            data = tf.extractfile(m).read()
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext] = data
    if current is not None:
        yield current, members

"""Random access to the samples of a converted split's WebDataset shards, from their DALI indexes.

`ShardIndex` reads manifest.json and every shard's DALI index (`.idx`: `ext offset size name` per
member) once, and then reads any sample's JPEG bytes and label with `os.pread` at their offsets: no tar
parsing, any order. A shard that is missing or unreadable raises `ShardError` naming the file.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from pipeline.format import layout as fmt
from pipeline.format.errors import ShardError


def shard_entries(split_dir: Path, sh: dict) -> tuple[Path, list[tuple[int, dict]]]:
    """The tar of manifest shard `sh` and, per sample, (global index, {member ext: (offset, size)}) from its
    DALI index (v1.2), with an error naming the file when either is missing or the index is malformed."""
    tar, idx = split_dir / sh["tar"], split_dir / sh["idx"]
    for p in (tar, idx):
        if not p.is_file():
            raise ShardError(f"shard file {p} is missing (listed in {split_dir / fmt.MANIFEST})")
    try:
        lines = idx.read_text().splitlines()
    except OSError as e:
        raise ShardError(f"cannot read shard index {idx}: {e}") from e
    if not lines or not lines[0].startswith("v1.2"):
        raise ShardError(f"{idx} is not a DALI index (v1.2)")
    lines = lines[1:]
    if len(lines) != sh["num_samples"]:
        raise ShardError(f"{idx} lists {len(lines)} samples, the manifest says {sh['num_samples']}")
    return tar, [(sh["first_index"] + j, parse_idx_line(line, idx, j + 2)) for j, line in enumerate(lines)]


def parse_idx_line(line: str, idx: Path, lineno: int) -> dict[str, tuple[int, int]]:
    """{member ext: (offset, size)} of one sample line of a DALI index: `ext offset size name` per
    member (member names hold no spaces: they are KEY.ext with a numeric key)."""
    f = line.split(" ")
    if len(f) % 4 or not f[0]:
        raise ShardError(f"{idx} line {lineno}: not 'ext offset size name' groups: {line[:200]!r}")
    try:
        return {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
    except ValueError:
        raise ShardError(f"{idx} line {lineno}: offset or size is not a number: {line[:200]!r}") from None


class ShardIndex:
    """Where every sample of OUT/<split> lives: shard number, offsets and sizes of its .jpg and
    .label.i64 members. Built from the .idx files (read once); bytes are read with os.pread."""

    def __init__(self, split_dir: str | Path):
        self.dir = Path(split_dir)
        self.manifest = fmt.load_manifest(self.dir)
        shards = self.manifest["shards"]
        if not shards:
            raise ShardError(f"{self.dir}: the manifest lists no WebDataset shards (converted with "
                             f"formats without 'wds'?)")
        self.num_samples = int(self.manifest["num_samples"])
        n = self.num_samples
        self.shard = np.full(n, -1, np.int64)
        self.jpg = np.zeros((n, 2), np.int64)
        self.label_at = np.zeros((n, 2), np.int64)
        self.tars = []
        for k, sh in enumerate(shards):
            tar, entries = shard_entries(self.dir, sh)
            for j, (s, members) in enumerate(entries):
                if "jpg" not in members or "label.i64" not in members:
                    raise ShardError(f"{self.dir / sh['idx']} line {j + 2}: no jpg / label.i64 member")
                self.shard[s] = k
                self.jpg[s] = members["jpg"]
                self.label_at[s] = members["label.i64"]
            self.tars.append(tar)
        if (self.shard < 0).any():
            raise ShardError(f"{self.dir}: shards do not cover indices {np.flatnonzero(self.shard < 0)[:10]}...")
        self._fds: dict[int, int] = {}

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            try:
                fd = os.open(self.tars[k], os.O_RDONLY)
            except OSError as e:
                raise ShardError(f"cannot open shard {self.tars[k]}: {e}") from e
            self._fds[k] = fd
        return fd

    def read(self, index: int) -> tuple[bytes, int]:
        """(JPEG bytes, label) of a global index."""
        k = int(self.shard[index])
        fd = self._fd(k)
        off, size = self.jpg[index]
        loff, lsize = self.label_at[index]
        try:
            data = os.pread(fd, int(size), int(off))
            lab = os.pread(fd, int(lsize), int(loff))
        except OSError as e:
            raise ShardError(f"cannot read sample {index} from shard {self.tars[k]}: {e}") from e
        if len(data) != size or len(lab) != 8:
            raise ShardError(f"shard {self.tars[k]} is shorter than its index says (sample {index})")
        return data, int(np.frombuffer(lab, "<i8")[0])

    # read_many joins samples whose bytes lie within READ_GAP of each other (same shard) into one
    # pread of at most READ_MAX bytes: a sample's .jpg and .label.i64 are neighbours in the tar (one
    # read instead of two), and eval / sequential batches become a few large reads.
    READ_GAP = 64 << 10
    READ_MAX = 16 << 20

    def read_many(self, indices) -> list[tuple[np.ndarray, int]]:
        """[(JPEG bytes as a uint8 array, label)] of global indices, in the order given (duplicates
        allowed): reads sorted by (shard, offset) and coalesced (see READ_GAP); the arrays are views
        into the read buffers."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size == 0:
            return []
        if idx.min() < 0 or idx.max() >= self.num_samples:
            raise IndexError(f"indices out of range [0, {self.num_samples})")
        jo, js = self.jpg[idx, 0], self.jpg[idx, 1]
        lo_, ls = self.label_at[idx, 0], self.label_at[idx, 1]
        start = np.minimum(jo, lo_)
        end = np.maximum(jo + js, lo_ + ls)
        shard = self.shard[idx]
        order = np.lexsort((start, shard))
        out: list = [None] * idx.size
        i = 0
        while i < len(order):
            first = order[i]
            k, lo, hi = shard[first], start[first], end[first]
            j = i + 1
            while (j < len(order) and shard[order[j]] == k and start[order[j]] - hi <= self.READ_GAP
                   and max(hi, end[order[j]]) - lo <= self.READ_MAX):
                hi = max(hi, end[order[j]])
                j += 1
            buf = self._pread(int(k), int(lo), int(hi - lo), int(idx[first]))
            for t in order[i:j]:
                a, b = jo[t] - lo, jo[t] - lo + js[t]
                la = lo_[t] - lo
                if ls[t] != 8:
                    raise ShardError(f"shard {self.tars[k]}: sample {idx[t]}'s label member is "
                                     f"{ls[t]} bytes, not 8")
                out[t] = (buf[a:b], int(buf[la:la + 8].view("<i8")[0]))
            i = j
        return out

    def _pread(self, k: int, off: int, size: int, sample: int) -> np.ndarray:
        fd = self._fd(k)
        try:
            data = os.pread(fd, size, off)
        except OSError as e:
            raise ShardError(f"cannot read sample {sample} from shard {self.tars[k]}: {e}") from e
        if len(data) != size:
            raise ShardError(f"shard {self.tars[k]} is shorter than its index says (sample {sample})")
        return np.frombuffer(data, np.uint8)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


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

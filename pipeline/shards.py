"""Random access to the samples of a converted split's WebDataset shards, and the JPEG check.

`ShardIndex` reads manifest.json and every shard's DALI index (`.idx`: `ext offset size name` per
member) once, and then reads any sample's JPEG bytes and label with `os.pread` at their offsets: no tar
parsing, any order. A shard that is missing or unreadable raises `ShardError` naming the file.

`jpeg_check` is a structural check of a whole JPEG stream (numba; the ffcv decoder calls the same
function in its JIT loop): SOI, segment lengths, a frame header, and the entropy-coded data of the scan,
where every 0xFF must be a stuffed byte (FF 00) or a restart marker (FF D0-D7), up to the EOI. It costs a
pass over the bytes (~20 us for 100 kB) and catches truncation and overwritten data; it does not catch
bit flips that keep the syntax valid (a full strict decode would, at the cost of a second decode:
`validate="decode"`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numba import njit

from . import dataset_format as fmt

JPEG_OK = 0
JPEG_REASONS = {-1: "no JPEG start-of-image marker", -2: "truncated JPEG (segment runs past the end)",
                -3: "no end-of-image marker", -4: "corrupt entropy-coded data (invalid marker in scan)",
                -5: "no frame header or scan", -6: "not a baseline/extended JPEG frame",
                -7: "corrupt entropy-coded data (restart marker out of sequence)"}

class ShardError(RuntimeError):
    """A shard (or its index) that the loader cannot read."""


class BadSample(ValueError):
    """A member that cannot become a view (the loader skips and counts it)."""


@njit(cache=True, nogil=True)
def jpeg_walk(data):
    """(code, height, width, end): the structural walk behind jpeg_check; `end` is the offset just past
    the end-of-image marker (bytes after it are not part of the image; the converter trims them).

    Segments: SOI, then marker segments whose lengths must fit; a frame header (SOF0-2) before the
    first scan. Each scan's entropy-coded data: every 0xFF is a stuffed byte (FF 00), a fill byte
    before a marker (FF FF), or a restart marker RST0-7 that must come in sequence (RSTn, RSTn+1 mod 8,
    from RST0 in each scan); a table / comment / application segment or a further SOS may follow a
    scan (multi-scan files); EOI ends the image. Random bytes with an 0xFF in them fail here; bytes
    without one pass (only an entropy decode catches those: the converter's --verify entropy)."""
    n = data.shape[0]
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return -1, 0, 0, 0
    pos = 2
    h = 0
    w = 0
    while True:
        if pos + 4 > n:
            return -2, h, w, 0
        if data[pos] != 0xFF:
            return -2, h, w, 0
        m = data[pos + 1]
        if m == 0xFF:  # fill byte
            pos += 1
            continue
        if m == 0xD9:
            return -5, h, w, 0
        length = (np.int64(data[pos + 2]) << 8) | np.int64(data[pos + 3])
        if length < 2 or pos + 2 + length > n:
            return -2, h, w, 0
        if m == 0xC0 or m == 0xC1 or m == 0xC2:
            if length < 8:
                return -2, h, w, 0
            h = (np.int64(data[pos + 5]) << 8) | np.int64(data[pos + 6])
            w = (np.int64(data[pos + 7]) << 8) | np.int64(data[pos + 8])
        elif 0xC3 <= m <= 0xCF and m != 0xC4 and m != 0xC8 and m != 0xCC:
            return -6, h, w, 0
        if m != 0xDA:
            pos += 2 + length
            continue
        # A scan: walk its entropy-coded data up to the next marker that is not RSTn.
        if h == 0 or w == 0:
            return -5, h, w, 0
        i = pos + 2 + length
        rst = 0
        nxt = -1
        while i < n - 1:
            if data[i] != 0xFF:
                i += 1
                continue
            nx = data[i + 1]
            if nx == 0x00:
                i += 2
            elif nx == 0xFF:  # fill bytes may precede a marker
                i += 1
            elif 0xD0 <= nx <= 0xD7:
                if nx - 0xD0 != rst:
                    return -7, h, w, 0
                rst = (rst + 1) & 7
                i += 2
            else:
                nxt = nx
                break
        if nxt == -1:
            return -3, h, w, 0
        if nxt == 0xD9:
            return 0, h, w, i + 2
        # Between scans only tables, restart intervals, comments, application data, DNL or a scan.
        if not (nxt == 0xDA or nxt == 0xC4 or nxt == 0xDB or nxt == 0xDD or nxt == 0xDC or nxt == 0xFE
                or 0xE0 <= nxt <= 0xEF):
            return -4, h, w, 0
        pos = i


@njit(cache=True, nogil=True)
def jpeg_check(data):
    """(code, height, width): code 0 when the stream is structurally valid (see jpeg_walk; bytes after
    the end-of-image marker are allowed, as every decoder ignores them), else a key of JPEG_REASONS."""
    code, h, w, _end = jpeg_walk(data)
    return code, h, w


def check_jpeg(data: bytes | np.ndarray, validate: str = "markers") -> tuple[int, int]:
    """(height, width) of a JPEG that passes `validate` ("markers" or "decode"), else raise BadSample."""
    arr = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    code, h, w = jpeg_check(arr)
    if code != JPEG_OK:
        raise BadSample(JPEG_REASONS.get(code, f"bad JPEG ({code})"))
    if validate == "decode":
        import simplejpeg
        try:
            simplejpeg.decode_jpeg(arr.tobytes(), colorspace="RGB", strict=True)
        except Exception as e:
            raise BadSample(f"JPEG decode failed: {e}") from None
    return int(h), int(w)


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
    out = []
    for j, line in enumerate(lines):
        f = line.split(" ")
        out.append((sh["first_index"] + j, {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f) - 3, 4)}))
    return tar, out


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

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

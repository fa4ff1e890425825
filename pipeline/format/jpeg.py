"""The structural JPEG check the loaders run on every member and the converter runs before storing one.

`jpeg_walk` / `jpeg_check` (numba; the ffcv decoder calls `jpeg_check` inside its JIT loop): SOI,
segment lengths, a frame header, and the entropy-coded data of every scan, where each 0xFF must be a
stuffed byte (FF 00), a fill byte, or a restart marker in sequence, up to the EOI. It costs a pass over
the bytes (~30 us for 100 kB) and catches truncation and overwritten data holding 0xFF bytes; it does
not catch garbage without 0xFF bytes, or bit flips that keep the syntax valid: only an entropy decode
does (`check_jpeg(validate="decode")`, and the converter's default `--verify entropy`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from pipeline.format.errors import BadSample

JPEG_OK = 0
JPEG_REASONS = {-1: "no JPEG start-of-image marker", -2: "truncated JPEG (segment runs past the end)",
                -3: "no end-of-image marker", -4: "corrupt entropy-coded data (invalid marker in scan)",
                -5: "no frame header or scan", -6: "not a baseline/extended JPEG frame",
                -7: "corrupt entropy-coded data (restart marker out of sequence)"}

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

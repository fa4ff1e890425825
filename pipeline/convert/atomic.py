"""Atomic file output: a file appears under its final name only once it is complete and on disk."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def commit(f, path: str | Path) -> None:
    """Flush, fsync and close `f` (opened on partial_path(path)), then rename it to `path`."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(partial_path(path), path)
    _fsync_dir(Path(path).parent)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    """Write to `path.partial`, fsync, then rename over `path`; on error the partial file is removed."""
    tmp = partial_path(path)
    f = open(tmp, mode)
    try:
        yield f
        commit(f, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode())


def remove_partials(directory: str | Path) -> list[Path]:
    """Delete leftovers of writes that were interrupted (a crash or kill -9 mid-write)."""
    removed = []
    for p in Path(directory).glob("*" + PARTIAL_SUFFIX):
        p.unlink()
        removed.append(p)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)



class HashingWriter:
    """Append-only file output whose writes and SHA-256 run on a background thread.

    Why: file writes and hashlib release the GIL, so moving them off the caller's thread lets a
    conversion's Python work (parsing, tar headers, bookkeeping) run on one core while the bytes are
    written and hashed on the other. Chunks are written in submission order; `finish()` waits for
    them and re-raises any I/O error. The file is opened on partial_path(path): `commit()` makes it
    appear under `path`.
    """

    def __init__(self, path: str | Path, max_queued: int = 256):
        import queue
        import threading
        self.path = Path(path)
        self._f = open(partial_path(self.path), "wb")
        self._sha = hashlib.sha256()
        self.size = 0  # bytes submitted so far (the offset of the next chunk)
        self._q: queue.Queue = queue.Queue(max_queued)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"write {self.path.name}")
        self._thread.start()

    def _run(self):
        while True:
            chunk = self._q.get()
            if chunk is None:
                return
            if self._error is None:
                try:
                    self._f.write(chunk)
                    self._sha.update(chunk)
                except BaseException as e:  # reported by finish()
                    self._error = e

    def write(self, chunk) -> None:
        if self._error is not None:
            raise self._error
        self.size += len(chunk)
        self._q.put(chunk)

    def finish(self) -> str:
        """Wait for every chunk; returns the hex SHA-256 of everything written."""
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._sha.hexdigest()

    def commit(self) -> None:
        commit(self._f, self.path)

    def abort(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._f.close()
        partial_path(self.path).unlink(missing_ok=True)

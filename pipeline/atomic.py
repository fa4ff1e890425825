"""Atomic file output: a file appears under its final name only once it is complete and on disk."""

from __future__ import annotations

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


"""The two errors of reading a converted split: a shard the loader cannot read at all (fatal, names the
file), and one sample that cannot become a view (skipped and counted)."""

from __future__ import annotations


class ShardError(RuntimeError):
    """A shard (or its index) that the loader cannot read."""


class BadSample(ValueError):
    """A member that cannot become a view (the loader skips and counts it)."""

"""Auxiliary objectives a run adds to any base method (`--aux NAME --aux-weight W`): one file each,
registered here by name. The method's `forward` adds W x the auxiliary loss to its own."""

from __future__ import annotations

from .augself import AugSelf

AUX = {"augself": AugSelf}

__all__ = ["AUX", "AugSelf"]

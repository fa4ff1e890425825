"""What a backend hands the loader: geometric crops per parameter stream, before the photometric ops."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .spec import RecipeSpec


@dataclass(slots=True)
class RawBatch:
    crops: dict[int, torch.Tensor]
    """stream -> uint8 (n, S, S, 3): the crop of the record, resized, not yet flipped (only the streams
    whose views are not in `views`)."""
    index: np.ndarray
    """int64 (n,) global indices of the samples kept (skipped ones removed)."""
    label: np.ndarray
    params: list[dict]
    """One record per view (pipeline.params.view_params), rows of the kept samples."""
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """(global index, reason) of the members of this batch that could not be decoded."""
    views: dict[int, torch.Tensor] = field(default_factory=dict)
    """view -> float32 (n, C, S, S): views the backend finished itself (pipeline.cpu_views); the loader
    applies torch_ops to the others, from `crops`."""


def streams(recipe: RecipeSpec) -> dict[int, int]:
    """Parameter stream -> view that defines its geometry, in view order."""
    out: dict[int, int] = {}
    for v in range(len(recipe.views)):
        out.setdefault(recipe.param_stream(v), v)
    return out


def take(records: list[dict], keep: np.ndarray) -> list[dict]:
    cache: dict[int, dict] = {}
    return [cache.setdefault(id(r), {k: a[keep] for k, a in r.items()}) for r in records]

"""`Batch`: what every loader yields and what a method receives, whole.

Per-sample fields share the first dimension B (the samples a batch holds after members that failed
at read time were skipped): the views, the global sample index (memory banks, queues and pseudo-label
tables are keyed by it), the class label (for an online probe or a supervised part only: the trainer
hands the self-supervised loss a batch without it), and, when asked for, each view's applied
augmentation record (`pipeline/views/params.py`), clip frame times, text tokens and extra arrays.
Everything that slices or moves a batch goes through `take` / `to`, so a new field is trimmed to equal
size across ranks and moved to the device like the others, with nothing to add in the trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Batch:
    views: list[torch.Tensor]
    """One tensor per view of the recipe: images (B, C, H, W) or clips (B, C, T, H, W)."""
    index: torch.Tensor
    """int64 (B,): global sample index in the split."""
    label: torch.Tensor | None = None
    """int64 (B,): class label (-1: none); None once removed for a self-supervised loss."""
    aug: list[dict[str, torch.Tensor]] | None = None
    """Per view: the augmentation parameters applied, each array with first dimension B."""
    times: list[torch.Tensor] | None = None
    """Clips, per view: (B, T) source frame numbers of the clip's frames."""
    tokens: torch.Tensor | None = None
    """Text: (B, L) int64 token ids."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further per-sample arrays (first dimension B) a data source or a method adds."""

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def _map(self, fn) -> "Batch":
        """Apply `fn` to every tensor of every field (lists and dicts of tensors included)."""
        def walk(x):
            if isinstance(x, torch.Tensor):
                return fn(x)
            if isinstance(x, list):
                return [walk(v) for v in x]
            if isinstance(x, dict):
                return {k: walk(v) for k, v in x.items()}
            return x
        return Batch(**{f.name: walk(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def take(self, n: int) -> "Batch":
        """The first `n` samples, of every per-sample field."""
        if n > len(self):
            raise ValueError(f"take({n}) from a batch of {len(self)}")
        return self if n == len(self) else self._map(lambda t: t[:n])

    def to(self, device, dtype: torch.dtype | None = None) -> "Batch":
        """Every tensor to `device`; floating-point views (and extras) also to `dtype` when given.
        Integer fields (index, label, tokens, frame numbers) keep their type."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device, dtype=dtype, non_blocking=True)
            return t.to(device, non_blocking=True)
        return self._map(move)

    def without_labels(self) -> "Batch":
        return dataclasses.replace(self, label=None)


def aug_records(params: list[dict]) -> list[dict[str, torch.Tensor]]:
    """The per-view parameter records of pipeline.views.params (numpy arrays) as tensors."""
    return [{k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in rec.items()} for rec in params]

"""Helpers shared by the kernel tests."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor (in elements) any torch op produces while active: how the tests
    prove that no M x M, N x K or B x K x d tensor is ever materialised."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: one scale for a whole tensor, so tiny entries don't blow it up."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def unit(n: int, d: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """n random unit-norm rows (drawn in float64, then cast): the embeddings every loss expects."""
    return torch.nn.functional.normalize(torch.randn(n, d, device=device, dtype=torch.float64), dim=1).to(dtype)

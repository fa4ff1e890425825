"""Batch norm over the global batch of all processes, with nn.BatchNorm's parameter and buffer names,
and the upcast the heads and norms share."""

from __future__ import annotations

import torch
import torch.nn as nn

from train.distributed import all_reduce_with_grad


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 activations upcast; float64 kept)."""
    return x if x.dtype == torch.float64 else x.float()


class SyncStats:
    """Batch norm whose training statistics cover the global batch of all processes (gloo or NCCL).

    torch.nn.SyncBatchNorm refuses CPU tensors; this all-reduces sums with gradients. It takes the
    same path with one process, so 1-process and N-process runs compute the same numbers.
    Same parameter and buffer names as nn.BatchNorm1d/2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        xf = upcast(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        n_local = torch.tensor([x.numel() / c], dtype=xf.dtype, device=x.device)
        s = all_reduce_with_grad(torch.cat([xf.sum(dims), n_local]))
        n = s[-1]
        mean = s[:c] / n
        xc = xf - mean.view(shape)
        var = all_reduce_with_grad((xc * xc).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class SyncBatchNorm2d(SyncStats, nn.BatchNorm2d):
    pass


class SyncBatchNorm1d(SyncStats, nn.BatchNorm1d):
    pass


class SyncBatchNorm3d(SyncStats, nn.BatchNorm3d):
    """BatchNorm3d over the global batch of all processes (see train.models.SyncStats)."""


def batch_norm(dims: int, sync: bool):
    """The BatchNorm class for 1-, 2- or 3-d features, global (SyncStats) or per process."""
    return {1: (SyncBatchNorm1d, nn.BatchNorm1d), 2: (SyncBatchNorm2d, nn.BatchNorm2d),
            3: (SyncBatchNorm3d, nn.BatchNorm3d)}[dims][0 if sync else 1]

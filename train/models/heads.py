"""Projection and prediction heads, and the L2 normalisation of embeddings."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.norm import batch_norm, upcast


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, sync_bn: bool = False) -> nn.Sequential:
    """Projection / prediction head: (Linear-BN-ReLU) x (layers-1), Linear."""
    bn1d = batch_norm(1, sync_bn)
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), bn1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


def l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(upcast(x), dim=1)

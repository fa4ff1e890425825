"""SimCLR (Chen et al. 2020): NT-Xent over all views of the global batch.

Each process gathers the embeddings of every process *with gradients* and evaluates the loss of its
own anchors (its rows of the gathered matrix) against all gathered candidates: the mean of the
processes' losses is the global loss, and with DDP's gradient averaging the update equals one process
on the global batch (tests/test_train.py::test_ddp_parity_of_global_losses checks 1 x 32 against 2 x 16). More
than two views (multicrop) are multi-positive: all views of a sample are positives of each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels

from ..config import MethodConfig, temperature_final_key, temperature_key
from ..distributed import all_gather_nograd, all_gather_with_grad, world
from ..models import l2n, mlp
from .base import Method, Output


def simclr_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive NT-Xent of L2-normalised embeddings z (M, d); rows with equal labels are positives."""
    return kernels.nt_xent(l2n(z), temperature, labels=labels)


def gathered_nt_xent(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of this process's rows z (n, d) as anchors against the rows of every process: the local
    part of the global loss (its mean over processes is the global loss)."""
    rank, ws = world()
    z_all = all_gather_with_grad(z)
    labels_all = all_gather_nograd(labels)
    if ws == 1:
        return simclr_loss(z_all, labels_all, temperature)
    n = z.shape[0]
    return kernels.nt_xent(l2n(z_all), temperature, labels=labels_all, anchors=slice(rank * n, (rank + 1) * n))


@dataclass(kw_only=True)
class SimCLRConfig(MethodConfig):
    temperature: float = temperature_key(0.2)
    temperature_final: float = temperature_final_key()


class SimCLR(Method):
    name = "simclr"
    recipe = "simclr"
    Config = SimCLRConfig
    defaults = {"optimizer": "lars", "lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10.0}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)

    def compute_loss(self, batch, step):
        h = [self.backbone(v) for v in batch.views]
        z = torch.cat([self.projector(x) for x in h])
        loss = gathered_nt_xent(z, batch.index.repeat(len(batch.views)), self.temperature(step))
        return Output(loss, {"temperature": self.temperature(step)}, features=h[0], view_features=h)

"""SimCLR (Chen et al. 2020): NT-Xent over all views of the global batch.

Embeddings of every process are gathered *with gradients* and each process evaluates the same global
loss, so with DDP's gradient averaging the update equals a single process on the global batch
(tests/test_train.py::test_ddp_parity_simclr checks 1 x 32 against 2 x 16). More than two views (multicrop) are
multi-positive: all views of a sample are positives of each other.
"""

from __future__ import annotations

import torch

import kernels

from ..distributed import all_gather_nograd, all_gather_with_grad
from ..models import l2n, mlp
from .base import Method


def simclr_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive NT-Xent of L2-normalised embeddings z (M, d); rows with equal labels are positives."""
    return kernels.nt_xent(l2n(z), temperature, labels=labels)


class SimCLR(Method):
    name = "simclr"
    recipe = "simclr"
    defaults = {"temperature": 0.2, "optimizer": "lars", "lr": 0.3, "weight_decay": 1e-6,
                "warmup_epochs": 10.0}
    reads = frozenset({"temperature", "temperature_final"})

    def __init__(self, cfg, n_data, total_steps, view_channels):
        super().__init__(cfg, n_data, total_steps, view_channels)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)

    def forward(self, views, index, step):
        z = torch.cat([self.projector(self.backbone(v)) for v in views])
        labels = index.repeat(len(views))
        z_all = all_gather_with_grad(z)
        labels_all = all_gather_nograd(labels)
        loss = simclr_loss(z_all, labels_all, self.temperature(step))
        return loss, {"temperature": self.temperature(step)}

"""SimCLR (Chen et al. 2020): NT-Xent over all views of the global batch.

Each process gathers the embeddings of every process *with gradients* and evaluates the loss of its
own anchors (its rows of the gathered matrix) against all gathered candidates: the mean of the
processes' losses is the global loss, and with DDP's gradient averaging the update equals one process
on the global batch (tests/test_train.py::test_ddp_parity_of_global_losses checks 1 x 32 against 2 x 16). More
than two views (multicrop) are multi-positive: all views of a sample are positives of each other.
`--negatives ball|ring` (Wu et al.) keeps, per anchor, a window of similarity ranks among the 2N - 1
in-batch candidates as negatives (kernels.ring_nce with the anchor's own column excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels

from ..config import ConfigError, RingNegatives, temperature_final_key, temperature_key
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


def gathered_ring(z: torch.Tensor, temperature: float, window: tuple[float, float]) -> torch.Tensor:
    """Wu et al.'s in-batch Ring / Ball of two views: each of this process's rows z (2n, d: view 1
    then view 2) as an anchor, its other view as the positive, and as candidates every gathered row but
    itself (2N - 1, the positive among them, as in the reference), of which its rank window are the
    negatives. The local part of the global loss, as gathered_nt_xent."""
    rank, _ = world()
    z = l2n(z)
    n2 = z.shape[0]
    z_all = all_gather_with_grad(z)
    partner = torch.cat([z[n2 // 2:], z[:n2 // 2]])
    own = rank * n2 + torch.arange(n2, device=z.device)
    return kernels.ring_nce(z, partner, z_all, temperature, *window, exclude=own)


@dataclass(kw_only=True)
class SimCLRConfig(RingNegatives):
    temperature: float = temperature_key(0.2)
    temperature_final: float = temperature_final_key()

    def __post_init__(self):
        super().__post_init__()
        if self.negatives != "all" and self.ring_samples:
            raise ConfigError("--ring-samples draws negatives from a bank or queue; SimCLR's in-batch candidates "
                              "carry gradients and are all scored (leave --ring-samples 0)")


class SimCLR(Method):
    name = "simclr"
    recipe = "simclr"
    Config = SimCLRConfig
    defaults = {"optimizer": "lars", "lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10.0}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)
        if cfg.method.negatives != "all" and len(data.view_channels) != 2:
            raise ConfigError(f"--negatives {cfg.method.negatives}: SimCLR's ring pairs two views; the recipe has "
                              f"{len(data.view_channels)}")

    def compute_loss(self, batch, step):
        h = [self.backbone(v) for v in batch.views]
        z = torch.cat([self.projector(x) for x in h])
        win = self.ring_window(step)
        if win is None:
            loss = gathered_nt_xent(z, batch.index.repeat(len(batch.views)), self.temperature(step))
        else:
            loss = gathered_ring(z, self.temperature(step), win)
        return Output(loss, {"temperature": self.temperature(step)}, features=h[0], view_features=h)

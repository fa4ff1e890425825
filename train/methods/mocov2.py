"""MoCo v2 (Chen et al. 2020b): query encoder, momentum key encoder, a queue of negative keys.

The queue (K, d) and its pointer are persistent buffers (checkpointed, restored exactly). Keys of all
processes are enqueued, so every process holds the same queue. Shuffle-BN is not implemented: use
--sync-bn, or the default per-process BN (on one process BN statistics see the whole batch).
"""

from __future__ import annotations

import torch

import kernels

from ..models import l2n, mlp
from .base import Method, Queue, ema_update, make_target


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of normalised queries against their keys (positive) and the queue (negatives)."""
    return kernels.info_nce(l2n(q), l2n(k).detach(), queue, temperature=temperature)


class MoCoV2(Method):
    name = "mocov2"
    recipe = "mocov2"
    defaults = {"temperature": 0.2, "optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4,
                "warmup_epochs": 0.0, "ema": 0.999, "queue_size": 65536}
    reads = frozenset({"temperature", "temperature_final", "ema", "ema_final", "queue_size"})
    symmetric = False

    def __init__(self, cfg, n_data, total_steps, view_channels):
        super().__init__(cfg, n_data, total_steps, view_channels)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.key_backbone = make_target(self.backbone)
        self.key_projector = make_target(self.projector)
        self.queue = Queue(cfg.method.queue_size, m.proj_dim)
        self._pending: list[torch.Tensor] = []

    def _keys(self, x):
        with torch.no_grad():
            return l2n(self.key_projector(self.key_backbone(x)))

    def forward(self, views, index, step):
        t = self.temperature(step)
        q1 = self.projector(self.backbone(views[0]))
        k2 = self._keys(views[1])
        loss = moco_loss(q1, k2, self.queue.keys, t)
        self._pending = [k2]
        if self.symmetric:
            q2 = self.projector(self.backbone(views[1]))
            k1 = self._keys(views[0])
            loss = 0.5 * (loss + moco_loss(q2, k1, self.queue.keys, t))
            self._pending.append(k1)
        return loss, {"temperature": t, "ema": self.ema(step)}

    @torch.no_grad()
    def after_step(self, step):
        m = self.ema(step)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)
        for k in self._pending:
            self.queue.push(k)
        self._pending = []

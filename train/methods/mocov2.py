"""MoCo v2 (Chen et al. 2020b): query encoder, momentum key encoder, a queue of negative keys.

The queue (K, d) and its pointer are registered state (checkpointed, restored exactly). Keys of all
processes are enqueued after the optimizer step (a deferred write), so every process holds the same
queue. Shuffle-BN is not implemented: use --sync-bn, or the default per-process BN (on one process BN
statistics see the whole batch). `--negatives ball|ring` (Wu et al.) restricts each query's negatives
to a window of similarity ranks over the queue (MoCo ring: ranks [655, 6553) of 65,536, all used).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels

from ..config import RingNegatives, ema_final_key, ema_key, positive_int_key, temperature_final_key, temperature_key
from ..models import l2n, mlp
from .base import Method, Output, Queue, ema_update, make_target


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
              window: tuple[float, float] | None = None, samples: int = 0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """InfoNCE of normalised queries against their keys (positive) and the queue (negatives); with a
    rank window (Ball / Ring), each query's negatives are the queue keys of those similarity ranks
    (all of them, or `samples` drawn from each window)."""
    if window is None:
        return kernels.info_nce(l2n(q), l2n(k).detach(), queue, temperature=temperature)
    return kernels.ring_nce(l2n(q), l2n(k).detach(), queue, temperature, *window, num_negatives=samples,
                            generator=generator)


@dataclass(kw_only=True)
class MoCoV2Config(RingNegatives):
    temperature: float = temperature_key(0.2)
    temperature_final: float = temperature_final_key()
    ema: float = ema_key(0.999)
    ema_final: float = ema_final_key()
    queue_size: int = positive_int_key(65536, "queue length; any size: writes wrap round the ring")


class MoCoV2(Method):
    name = "mocov2"
    recipe = "mocov2"
    Config = MoCoV2Config
    defaults = {"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0}
    symmetric = False

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.key_backbone = make_target(self.backbone)
        self.key_projector = make_target(self.projector)
        self.queue = Queue(cfg.method.queue_size, m.proj_dim)

    def _keys(self, x):
        with torch.no_grad():
            return l2n(self.key_projector(self.key_backbone(x)))

    def compute_loss(self, batch, step):
        t, views = self.temperature(step), batch.views
        h1 = self.backbone(views[0])
        k2 = self._keys(views[1])
        win, m = self.ring_window(step), self.cfg.method.ring_samples
        gen = (lambda s: self.step_generator(step, h1.device, stream=s, per_rank=True)) if m else (lambda s: None)
        loss = moco_loss(self.projector(h1), k2, self.queue.keys, t, win, m, gen(5))
        self.defer(self.queue.push, k2)
        if self.symmetric:
            h2 = self.backbone(views[1])
            q2 = self.projector(h2)
            k1 = self._keys(views[0])
            loss = 0.5 * (loss + moco_loss(q2, k1, self.queue.keys, t, win, m, gen(6)))
            self.defer(self.queue.push, k1)
        return Output(loss, {"temperature": t, "ema": self.ema(step)}, features=h1,
                      view_features=[h1, h2] if self.symmetric else [h1])

    @torch.no_grad()
    def after_step(self, step):
        m = self.ema(step)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)

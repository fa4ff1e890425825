"""BYOL (Grill et al. 2020): online backbone + projector + predictor regresses an EMA target's
projection of the other view; symmetrised. The EMA momentum follows a cosine schedule to 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MethodConfig, ema_final_key, ema_key
from ..models import l2n, mlp
from .base import Method, Output, ema_update, make_target


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean of 2 - 2 cos(p, z) with the target z detached."""
    return (2 - 2 * (l2n(p) * l2n(z.detach())).sum(1)).mean()


@dataclass(kw_only=True)
class BYOLConfig(MethodConfig):
    ema: float = ema_key(0.996)
    ema_final: float = ema_final_key(1.0)


class BYOL(Method):
    name = "byol"
    recipe = "byol"
    Config = BYOLConfig
    defaults = {"optimizer": "lars", "lr": 0.2, "weight_decay": 1.5e-6, "warmup_epochs": 10.0,
                "proj_hidden": 4096, "proj_dim": 256}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.target_backbone = make_target(self.backbone)
        self.target_projector = make_target(self.projector)

    def compute_loss(self, batch, step):
        v1, v2 = batch.views[0], batch.views[1]
        h1 = self.backbone(v1)
        p1 = self.predictor(self.projector(h1))
        h2 = self.backbone(v2)
        p2 = self.predictor(self.projector(h2))
        with torch.no_grad():
            z1 = self.target_projector(self.target_backbone(v1))
            z2 = self.target_projector(self.target_backbone(v2))
        loss = 0.5 * (byol_loss(p1, z2) + byol_loss(p2, z1))
        return Output(loss, {"ema": self.ema(step)}, features=h1, view_features=[h1, h2])

    @torch.no_grad()
    def after_step(self, step):
        m = self.ema(step)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_projector, self.projector, m)

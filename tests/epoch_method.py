"""A test-only method on the platform's epoch hook (loaded with INFOVIEW_METHODS=epoch_method): before each
epoch it passes the whole train split through the eval backbone (gathered over ranks) and keeps the
feature mean and a pass counter as registered state; its loss contrasts the two views' centred
features. It stands in for the clustering methods (PCL, SeLa, Local Aggregation) the hook exists for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from train.config import MethodConfig, temperature_key
from train.methods.base import Method, Output, register_state
from train.models import l2n


@dataclass(kw_only=True)
class EpochMeanConfig(MethodConfig):
    temperature: float = temperature_key(0.5)


class EpochMean(Method):
    name = "epochmean"
    recipe = "simclr"
    Config = EpochMeanConfig
    defaults = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0, "warmup_epochs": 0.0}
    seen_labels: list = []

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        d = self.backbone.feat_dim
        register_state(self, "center", torch.zeros(d))
        register_state(self, "passes", torch.zeros((), dtype=torch.long))
        register_state(self, "pass_rows", torch.zeros((), dtype=torch.long))

    def on_epoch_start(self, ctx):
        f, y, i = ctx.features(normalize=False)
        self.center.copy_(f.mean(0).to(self.center))
        self.passes.add_(1)
        self.pass_rows.fill_(int(i.numel()))

    def compute_loss(self, batch, step):
        assert batch.label is None, "labels reached the self-supervised loss"
        h = [self.backbone(v) for v in batch.views]
        z = torch.cat([l2n(x - self.center) for x in h])
        loss = kernels.nt_xent(z, self.temperature(step), labels=batch.index.repeat(len(h)))
        return Output(loss, features=h[0])

"""CVRL (Qian et al. 2021, "Spatiotemporally Augmented Contrastive Video Representation Learning").

Two clips of each video (pipeline.loaders.clips, recipe "cvrl": temporally consistent spatial augmentation, start
offset drawn from a decreasing distribution) through a 3D backbone (r3d18 / r2plus1d18) and a 3-layer
MLP projection head; InfoNCE over the two clips of the global batch: each clip's positive is the other
clip of its video, every other clip of every process is a negative. Embeddings are gathered across
processes *with gradients* and each process evaluates its own clips as anchors (as SimCLR here), so
with DDP's averaging the update equals one process on the global batch; the loss is `kernels.nt_xent`
(2 views = InfoNCE over 2N - 1 candidates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MethodConfig, temperature_final_key, temperature_key
from ..models import mlp
from .base import Method, Output
from .simclr import gathered_nt_xent


@dataclass(kw_only=True)
class CVRLConfig(MethodConfig):
    temperature: float = temperature_key(0.1)
    temperature_final: float = temperature_final_key()


class CVRL(Method):
    name = "cvrl"
    recipe = "cvrl"
    clips = True
    Config = CVRLConfig
    defaults = {"optimizer": "lars", "lr": 0.32, "weight_decay": 1e-6, "warmup_epochs": 5.0, "arch": "r3d18"}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, layers=3, sync_bn=m.sync_bn)

    def compute_loss(self, batch, step):
        views = batch.views
        if any(v.dim() != 5 for v in views):
            raise ValueError(f"cvrl needs (B, C, T, H, W) clips, got {[tuple(v.shape) for v in views]}; use a video "
                             f"dataset and a video arch (r3d18, r2plus1d18)")
        h = self.backbone(torch.cat(views))  # one backbone pass: BN sees both clips
        z = self.projector(h)
        loss = gathered_nt_xent(z, batch.index.repeat(len(views)), self.temperature(step))
        return Output(loss, {"temperature": self.temperature(step)}, features=h[:len(batch)])

"""CVRL (Qian et al. 2021, "Spatiotemporally Augmented Contrastive Video Representation Learning").

Two clips of each video (pipeline.loaders.clips, recipe "cvrl": temporally consistent spatial augmentation, start
offset drawn from a decreasing distribution) through a 3D backbone (r3d18 / r2plus1d18) and a 3-layer
MLP projection head; InfoNCE over the two clips of the global batch: each clip's positive is the other
clip of its video, every other clip of every process is a negative. Embeddings are gathered across
processes *with gradients* (as SimCLR here), so with DDP's averaging the update equals one process on
the global batch; the loss is `kernels.nt_xent` (2 views = InfoNCE over 2N - 1 candidates).
"""

from __future__ import annotations

import torch

from ..distributed import all_gather_nograd, all_gather_with_grad
from ..models import mlp
from .base import Method
from .simclr import simclr_loss


class CVRL(Method):
    name = "cvrl"
    recipe = "cvrl"
    clips = True
    """The trainer feeds clips (pipeline.build_clip_loader), whatever the data manifest says."""
    defaults = {"temperature": 0.1, "optimizer": "lars", "lr": 0.32, "weight_decay": 1e-6, "warmup_epochs": 5.0,
                "arch": "r3d18"}
    reads = frozenset({"temperature", "temperature_final"})

    def __init__(self, cfg, n_data, total_steps, view_channels):
        super().__init__(cfg, n_data, total_steps, view_channels)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, layers=3, sync_bn=m.sync_bn)

    def forward(self, views, index, step):
        if any(v.dim() != 5 for v in views):
            raise ValueError(f"cvrl needs (B, C, T, H, W) clips, got {[tuple(v.shape) for v in views]}; use a video "
                             f"dataset and a video arch (r3d18, r2plus1d18)")
        z = self.projector(self.backbone(torch.cat(views)))  # one backbone pass: BN sees both clips
        labels = index.repeat(len(views))
        z_all = all_gather_with_grad(z)
        labels_all = all_gather_nograd(labels)
        loss = simclr_loss(z_all, labels_all, self.temperature(step))
        return loss, {"temperature": self.temperature(step)}

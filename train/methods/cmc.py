"""CMC (Tian et al. 2019): one encoder per view (L and ab of a Lab image by default, half-width
ResNets), each followed by a linear head to an L2-normalised embedding; views are contrasted in
pairs. Negatives come from one memory bank per view (softmax or NCE, kernels.bank_nce) or from the
global batch (in-batch InfoNCE over gathered embeddings). With V > 2 views, the 'core' objective
contrasts view 0 with each other view and 'full' contrasts all V(V-1)/2 pairs.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn

import kernels

from ..distributed import all_gather_with_grad
from ..models import l2n
from .base import Method
from .instdisc import BankState


def pair_indices(num_views: int, objective: str) -> list[tuple[int, int]]:
    if objective == "core":
        return [(0, j) for j in range(1, num_views)]
    return list(itertools.combinations(range(num_views), 2))


def in_batch_pair_loss(zi: torch.Tensor, zj: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between two views' normalised embeddings (rows i match)."""
    zi, zj = l2n(zi), l2n(zj)
    return kernels.info_nce(zi, zj, temperature=temperature) + kernels.info_nce(zj, zi, temperature=temperature)


class CMC(Method):
    name = "cmc"
    recipe = "cmc_lab"
    multiview_encoder = True
    defaults = {"temperature": 0.07, "optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4,
                "warmup_epochs": 0.0, "nce_k": 4096, "proj_dim": 128, "width": 32}
    reads = frozenset({"temperature", "temperature_final", "nce_k", "nce_mode", "bank_momentum", "cmc_negatives",
                       "cmc_objective"})

    def __init__(self, cfg, n_data, total_steps, view_channels):
        super().__init__(cfg, n_data, total_steps, view_channels)
        if len(view_channels) < 2:
            raise ValueError(f"CMC needs >= 2 views, the recipe gives {len(view_channels)}")
        d = cfg.model.proj_dim
        self.heads = nn.ModuleList(nn.Linear(e.feat_dim, d) for e in self.backbone.encoders)
        self.pairs = pair_indices(len(view_channels), cfg.method.cmc_objective)
        if cfg.method.cmc_negatives == "bank":
            self.memories = nn.ModuleList(BankState(n_data, d) for _ in view_channels)
        self._pending = None

    def forward(self, views, index, step):
        t, me = self.temperature(step), self.cfg.method
        z = [h(e(v)) for h, e, v in zip(self.heads, self.backbone.encoders, views)]
        loss = z[0].new_zeros((), dtype=torch.float32)
        if me.cmc_negatives == "bank":
            k = min(me.nce_k, self.n_data)
            for i, j in self.pairs:
                # view i against view j's memory (positive: the sample's own row there) and back.
                loss = loss + self.memories[j].loss(z[i], index, k, t, me.nce_mode)
                loss = loss + self.memories[i].loss(z[j], index, k, t, me.nce_mode)
            self._pending = (index, [x.detach() for x in z])
        else:
            zg = [all_gather_with_grad(x) for x in z]
            for i, j in self.pairs:
                loss = loss + in_batch_pair_loss(zg[i], zg[j], t)
        return loss, {"temperature": t}

    @torch.no_grad()
    def after_step(self, step):
        if self._pending is not None:
            index, z = self._pending
            for mem, x in zip(self.memories, z):
                mem.write(index, x, self.cfg.method.bank_momentum)
            self._pending = None

    @classmethod
    def eval_recipe(cls, train_recipe, image_size):
        from pipeline.views.recipes import center_crop_views, get_recipe
        return center_crop_views(get_recipe(train_recipe, image_size), image_size)

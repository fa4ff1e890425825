"""CMC (Tian et al. 2019): one encoder per view (L and ab of a Lab image by default, half-width
ResNets), each followed by a linear head to an L2-normalised embedding; views are contrasted in
pairs. Negatives come from one memory bank per view (softmax or NCE, kernels.bank_nce) or from the
global batch (in-batch InfoNCE over gathered embeddings). With V > 2 views, the 'core' objective
contrasts view 0 with each other view and 'full' contrasts all V(V-1)/2 pairs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

import kernels

from ..config import ConfigError, opt
from ..distributed import all_gather_with_grad
from ..models import l2n
from .base import Method, Output
from .instdisc import BankState, InstDiscConfig


def pair_indices(num_views: int, objective: str) -> list[tuple[int, int]]:
    if objective == "core":
        return [(0, j) for j in range(1, num_views)]
    return list(itertools.combinations(range(num_views), 2))


def in_batch_pair_loss(zi: torch.Tensor, zj: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between two views' normalised embeddings (rows i match)."""
    zi, zj = l2n(zi), l2n(zj)
    return kernels.info_nce(zi, zj, temperature=temperature) + kernels.info_nce(zj, zi, temperature=temperature)


@dataclass(kw_only=True)
class CMCConfig(InstDiscConfig):
    cmc_negatives: Literal["bank", "batch"] = opt("bank", "negatives: memory bank or in-batch")
    cmc_objective: Literal["core", "full"] = opt(
        "full", "with > 2 views: 'core' (view 0 against each other) or 'full' (all pairs)")

    def __post_init__(self):
        super().__post_init__()
        if self.negatives != "all" and self.cmc_negatives != "bank":
            raise ConfigError(f"--negatives {self.negatives} ranks a view's memory bank; use --cmc-negatives bank")


class CMC(Method):
    name = "cmc"
    recipe = "cmc_lab"
    multiview_encoder = True
    Config = CMCConfig
    defaults = {"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0, "proj_dim": 128,
                "width": 32}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        channels = data.view_channels
        if len(channels) < 2:
            raise ValueError(f"CMC needs >= 2 views, the recipe gives {len(channels)}")
        d = cfg.model.proj_dim
        self.heads = nn.ModuleList(nn.Linear(e.feat_dim, d) for e in self.backbone.encoders)
        self.pairs = pair_indices(len(channels), cfg.method.cmc_objective)
        if cfg.method.cmc_negatives == "bank":
            self.memories = nn.ModuleList(BankState(self.n_data, d) for _ in channels)

    def compute_loss(self, batch, step):
        t, me, index = self.temperature(step), self.cfg.method, batch.index
        h = [e(v) for e, v in zip(self.backbone.encoders, batch.views)]
        z = [head(x) for head, x in zip(self.heads, h)]
        loss = z[0].new_zeros((), dtype=torch.float32)
        if me.cmc_negatives == "bank":
            k, win = min(me.nce_k, self.n_data), self.ring_window(step)
            for p, (i, j) in enumerate(self.pairs):
                # view i against view j's memory (positive: the sample's own row there) and back.
                gen = [self.step_generator(step, z[i].device, stream=2 * p + s, per_rank=True) for s in (3, 4)]
                loss = loss + self.memories[j].loss(z[i], index, k, t, me.nce_mode, win, me.ring_samples, gen[0])
                loss = loss + self.memories[i].loss(z[j], index, k, t, me.nce_mode, win, me.ring_samples, gen[1])
            for mem, x in zip(self.memories, z):
                self.defer(mem.write, index, x.detach(), me.bank_momentum)
        else:
            zg = [all_gather_with_grad(x) for x in z]
            for i, j in self.pairs:
                loss = loss + in_batch_pair_loss(zg[i], zg[j], t)
        # The probe sees what eval sees: the per-view encoders' features, concatenated.
        return Output(loss, {"temperature": t}, features=torch.cat(h, 1))

    @classmethod
    def eval_recipe(cls, train_recipe, image_size):
        from pipeline.views.recipes import center_crop_views, get_recipe
        return center_crop_views(get_recipe(train_recipe, image_size), image_size)

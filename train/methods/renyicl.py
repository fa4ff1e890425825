"""RényiCL (Lee et al. 2023, "Rényi contrastive learning"): the variational γ-skew Rényi divergence
bound on MoCo v3's shape.

A source encoder (backbone, projector whose last BN has no affine, predictor) is scored against an EMA
target (backbone, projector) of every *other* view: s = cos(p_s, z_t) / τ against every gathered target
row; the positive is the same image, every other image of the global batch a negative. The loss is the
negative skewed Rényi bound with means over the WHOLE global batch (not per anchor):

    L = -1/(γ-1) · log E_P exp((γ-1) s⁺)  +  1/γ · log( α E_P exp(γ s⁺) + (1-α) E_Q exp(γ s⁻) )

(γ = 1: the first term is -E_P s⁺). The reference minimises a surrogate with stop-gradient weights
whose gradient is exactly this expression's; this file computes the expression itself (log-mean-exps,
stable at any γ/τ), so the reported loss is the bound and the update is the reference's. Every process
scores its own rows against all gathered targets and contributes three log-sum-exps, gathered with
gradients into the global ones: each process computes the same global loss (train/distributed.py's
convention), from O(B) numbers exchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import MethodConfig, ema_final_key, ema_key, opt, temperature_key
from ..distributed import all_gather_nograd, all_gather_with_grad, world
from ..models import l2n, mlp
from ..models.norm import batch_norm
from .base import Method, Output, ema_update, make_target


def renyi_stats(p: torch.Tensor, z_all: torch.Tensor, offset: int, temperature: float, gamma: float) -> torch.Tensor:
    """This process's three log-sum-exps, (3,): over its positives of (γ-1)s⁺ (or the sum of s⁺ when
    γ = 1), of γs⁺, and over its negatives of γs⁻. p (n, d) source rows (local), z_all (N, d) all
    targets; row i's positive is z_all[offset + i]."""
    s = l2n(p) @ l2n(z_all).T / temperature
    n = s.shape[0]
    cols = torch.arange(n, device=s.device) + offset
    pos = s[torch.arange(n, device=s.device), cols]
    neg = s.masked_fill(cols[:, None] == torch.arange(s.shape[1], device=s.device), float("-inf"))
    first = pos.sum() if gamma == 1 else torch.logsumexp((gamma - 1) * pos, 0)
    return torch.stack([first, torch.logsumexp(gamma * pos, 0), torch.logsumexp(gamma * neg.reshape(-1), 0)])


def renyi_combine(stats: torch.Tensor, n_pos: int, n_neg: int, gamma: float, alpha: float) -> torch.Tensor:
    """The loss from every process's stats (P, 3) (or one (3,) row) over n_pos positives and n_neg
    negatives in all."""
    stats = stats.reshape(-1, 3)
    if gamma == 1:
        term1 = -stats[:, 0].sum() / n_pos
    else:
        term1 = -(torch.logsumexp(stats[:, 0], 0) - math.log(n_pos)) / (gamma - 1)
    lme_pos = torch.logsumexp(stats[:, 1], 0) - math.log(n_pos)
    lme_neg = torch.logsumexp(stats[:, 2], 0) - math.log(n_neg)
    mix = torch.logaddexp(math.log(alpha) + lme_pos, math.log1p(-alpha) + lme_neg) if alpha < 1 else lme_pos
    return term1 + mix / gamma


def renyi_loss(sources: list[torch.Tensor], z: torch.Tensor, temperature: float, gamma: float,
               alpha: float) -> torch.Tensor:
    """The global-batch loss of this process's source rows (each (n, d): one per source view, pooled as
    the reference concatenates them) against one target view's rows z (n, d), row i of one image:
    targets gathered without gradients, the stats with them."""
    rank, _ = world()
    z_all = all_gather_nograd(z.detach())
    n, total, k = z.shape[0], z_all.shape[0], len(sources)
    st = torch.stack([renyi_stats(p, z_all, rank * n, temperature, gamma) for p in sources])
    first = st[:, 0].sum() if gamma == 1 else torch.logsumexp(st[:, 0], 0)
    st = torch.stack([first, torch.logsumexp(st[:, 1], 0), torch.logsumexp(st[:, 2], 0)])
    return renyi_combine(all_gather_with_grad(st[None]), k * total, k * total * (total - 1), gamma, alpha)


@dataclass(kw_only=True)
class RenyiCLConfig(MethodConfig):
    temperature: float = temperature_key(0.5)
    gamma: float = opt(2.0, "Rényi order γ of the skewed bound (1: the KL / InfoNCE-like limit)",
                       check=(lambda v: 1 <= v <= 16, "in [1, 16]"))
    alpha: float = opt(1.0 / 65536, "skew α: weight of the positives in the mixture αP + (1-α)Q",
                       check=(lambda v: 0 < v <= 1, "in (0, 1]"))
    ema: float = ema_key(0.99)
    ema_final: float = ema_final_key(1.0)


class RenyiCL(Method):
    name = "renyicl"
    recipe = "byol"  # two asymmetric global views (the reference adds RandAugment + erasing on the source)
    Config = RenyiCLConfig
    defaults = {"optimizer": "lars", "lr": 0.8, "weight_decay": 1e-6, "warmup_epochs": 5.0,
                "proj_hidden": 4096, "proj_dim": 256}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m = cfg.model
        # MoCo v3 / SimCLR head: the projector's last BN without affine parameters.
        self.projector = nn.Sequential(*mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn),
                                       batch_norm(1, m.sync_bn)(m.proj_dim, affine=False))
        self.predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.target_backbone = make_target(self.backbone)
        self.target_projector = make_target(self.projector)

    def compute_loss(self, batch, step):
        me, views = self.cfg.method, batch.views
        h = [self.backbone(v) for v in views]
        p = [self.predictor(self.projector(x)) for x in h]
        with torch.no_grad():
            z = [self.target_projector(self.target_backbone(v)) for v in views[:2]]
        t = self.temperature(step)
        # each target global view against every other view's source rows (2 views: p1-z2, p2-z1)
        loss = sum(renyi_loss([p[s] for s in range(len(p)) if s != ti], z[ti], t, me.gamma, me.alpha)
                   for ti in range(len(z)))
        return Output(loss, {"temperature": t, "ema": self.ema(step)}, features=h[0], view_features=h)

    @torch.no_grad()
    def after_step(self, step):
        m = self.ema(step)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_projector, self.projector, m)

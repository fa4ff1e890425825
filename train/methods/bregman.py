"""Deep Bregman divergence for contrastive learning (Rezaei et al. 2023, BeCLR): SimCLR plus a
functional Bregman divergence learned by K scalar subnetworks.

The projection z (L2-normalised) feeds SimCLR's NT-Xent and K small MLPs φ_j (d -> hidden -> 1, ReLU,
dropout), Φ(z) ∈ R^K. The max-affine functional Bregman divergence between samples a and b is
D(a, b) = max_j Φ_j(a) - Φ_{j*(b)}(a), j*(b) = argmax_j Φ_j(b) (the argmax is a constant of the step:
gradients flow through Φ's values). Its similarity exp(-D / 2σ²) divided by τ is the logit of an NT-Xent
cross-entropy (positives: the other views of the same image; self excluded). Loss = that Bregman term +
SimCLR's NT-Xent on z. Candidates are gathered with gradients, anchors are this process's rows.

The K subnetworks run as one batched matmul pair (weights (K, d, hidden) and (K, hidden)) instead of K
modules: the same function, one kernel launch per layer instead of K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig, opt, positive_int_key, temperature_final_key, temperature_key
from ..distributed import all_gather_nograd, all_gather_with_grad, world
from ..models import l2n, mlp
from .base import Method, Output
from .simclr import gathered_nt_xent


class Subnets(nn.Module):
    """K independent scalar MLPs d -> hidden -> 1 (ReLU, dropout), evaluated together: (N, d) -> (N, K)."""

    def __init__(self, k: int, dim: int, hidden: int, dropout: float):
        super().__init__()
        # nn.Linear's default initialisation, per subnet
        b1, b2 = 1 / math.sqrt(dim), 1 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(k, dim, hidden).uniform_(-b1, b1))
        self.b1 = nn.Parameter(torch.empty(k, hidden).uniform_(-b1, b1))
        self.w2 = nn.Parameter(torch.empty(k, hidden).uniform_(-b2, b2))
        self.b2 = nn.Parameter(torch.empty(k).uniform_(-b2, b2))
        self.dropout = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.relu(torch.einsum("nd,kdh->nkh", z, self.w1) + self.b1))
        return (h * self.w2).sum(-1) + self.b2


def bregman_logits(phi: torch.Tensor, phi_all: torch.Tensor, sigma: float, temperature: float) -> torch.Tensor:
    """exp(-D(a, b) / 2σ²) / τ for this process's rows a (phi: (n, K)) against all rows b (phi_all: (N, K))."""
    jstar = phi_all.detach().argmax(1)
    d = phi.max(1, keepdim=True).values - phi[:, jstar]
    return torch.exp(-d / (2 * sigma * sigma)) / temperature


def multi_positive_ce(logits: torch.Tensor, labels: torch.Tensor, labels_all: torch.Tensor, offset: int) -> torch.Tensor:
    """NT-Xent's cross-entropy of logits (n, N): self (column offset + i) excluded, positives the other
    columns with the row's label (their log-probabilities averaged, as kernels.nt_xent)."""
    n, big = logits.shape
    own = offset + torch.arange(n, device=logits.device)
    self_mask = own[:, None] == torch.arange(big, device=logits.device)  # F.one_hot reads min / max back
    logp = logits.masked_fill(self_mask, float("-inf")).log_softmax(1)
    pos = (labels[:, None] == labels_all[None, :]) & ~self_mask
    return -(logp.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()


@dataclass(kw_only=True)
class BregmanConfig(MethodConfig):
    temperature: float = temperature_key(0.5)
    temperature_final: float = temperature_final_key()
    subnets: int = positive_int_key(100, "number K of scalar subnetworks of the max-affine Bregman divergence")
    subnet_hidden: int = positive_int_key(512, "hidden width of each subnetwork")
    subnet_dropout: float = opt(0.2, "dropout in the subnetworks", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    sigma: float = opt(0.9, "bandwidth σ of the similarity exp(-D / 2σ²)", check=(lambda v: v > 0, "> 0"))


class Bregman(Method):
    name = "bregman"
    recipe = "simclr"
    Config = BregmanConfig
    defaults = {"optimizer": "adamw", "lr": 5e-3, "weight_decay": 1e-6, "warmup_epochs": 0.0}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m, me = cfg.model, cfg.method
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.subnets = Subnets(me.subnets, m.proj_dim, me.subnet_hidden, me.subnet_dropout)

    def compute_loss(self, batch, step):
        me, t = self.cfg.method, self.temperature(step)
        h = [self.backbone(v) for v in batch.views]
        z = l2n(torch.cat([self.projector(x) for x in h]))
        labels = batch.index.repeat(len(batch.views))
        contrastive = gathered_nt_xent(z, labels, t)
        phi = self.subnets(z)
        rank, _ = world()
        logits = bregman_logits(phi, all_gather_with_grad(phi), me.sigma, t)
        breg = multi_positive_ce(logits, labels, all_gather_nograd(labels), rank * z.shape[0])
        return Output(breg + contrastive, {"bregman": breg.detach(), "nt_xent": contrastive.detach(),
                                           "temperature": t}, features=h[0], view_features=h)

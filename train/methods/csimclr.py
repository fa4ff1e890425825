"""C-SimCLR (Lee, Arnab, Guadarrama, Canny, Fischer 2021, "Compressive visual representations"): SimCLR
under a conditional entropy bottleneck with von Mises-Fisher encoders.

h1, h2 are the L2-normalised projections of the two views. The forward encoder e(z|x) = vMF(h1, κ_e)
emits a sample z (reparameterised through the mean direction: train/models/vmf.py); the backward encoder
b(z|y) = vMF(h2, κ_b). The logits of z are log b(z|h2_j) for every gathered image j and, by the
reference's "double batch trick", κ_b z·h1_j for every j but itself; the shared log-normaliser cancels,
so this is InfoNCE at temperature 1/κ_b, and I(Y;Z) ≈ log(2N-1) - CE. The residual information
I(X;Z|Y) ≈ log e(z|x) - log b(z|y). Loss = mean[β·residual - I(Y;Z)], in both directions (roles of the
views swapped, the second sample from vMF(h2, κ_e)). Candidates are gathered with gradients from every
process, anchors are this process's rows (SimCLR's convention: the mean over processes is the loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import MethodConfig, opt
from ..distributed import all_gather_with_grad, world
from ..models import l2n, mlp, vmf
from .base import Method, Output


def ceb_direction(a: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, offset: int, kappa_e: float,
                  kappa_b: float, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual, I) per local row of one direction: anchors `a` (n, d) encode z ~ vMF(a, κ_e) (or the
    given sample z), whose positive is b_all[offset + i] among b_all and a_all (self excluded). All
    inputs unit rows."""
    if z is None:
        z = vmf.sample(a, kappa_e)
    n = a.shape[0]
    own = offset + torch.arange(n, device=a.device)
    b = b_all[own]
    residual = vmf.log_prob(z, a, kappa_e) - vmf.log_prob(z, b, kappa_b)
    logits_ab = kappa_b * z @ b_all.T
    logits_aa = (kappa_b * z @ a_all.T).masked_fill(own[:, None] == torch.arange(a_all.shape[0], device=a.device),
                                                         float("-inf"))  # not F.one_hot: it reads min / max back
    ce = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), own, reduction="none")
    return residual, math.log(2 * b_all.shape[0] - 1) - ce


@dataclass(kw_only=True)
class CSimCLRConfig(MethodConfig):
    kappa_e: float = opt(1024.0, "concentration of the forward vMF encoder e(z|x) (its samples' spread)",
                         check=(lambda v: 0 < v <= 1e6, "in (0, 1e6]"))
    kappa_b: float = opt(10.0, "concentration of the backward vMF encoder b(z|y) (1 / the InfoNCE temperature)",
                         check=(lambda v: 0 < v <= 1e6, "in (0, 1e6]"))
    beta: float = opt(1.0, "CEB beta: weight of the residual information I(X;Z|Y)",
                      check=(lambda v: 0 <= v <= 100, "in [0, 100]"))


class CSimCLR(Method):
    name = "csimclr"
    recipe = "simclr"
    Config = CSimCLRConfig
    defaults = {"optimizer": "lars", "lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10.0}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)

    def compute_loss(self, batch, step):
        me = self.cfg.method
        y1 = self.backbone(batch.views[0])
        y2 = self.backbone(batch.views[1])
        h1, h2 = l2n(self.projector(y1)), l2n(self.projector(y2))
        rank, _ = world()
        h1_all, h2_all = all_gather_with_grad(h1), all_gather_with_grad(h2)
        off = rank * h1.shape[0]
        r_a, i_a = ceb_direction(h1, h1_all, h2_all, off, me.kappa_e, me.kappa_b)
        r_b, i_b = ceb_direction(h2, h2_all, h1_all, off, me.kappa_e, me.kappa_b)
        loss = (me.beta * r_a - i_a + me.beta * r_b - i_b).mean()
        return Output(loss, {"i_xz_y": r_a.detach().mean(), "i_yz": i_a.detach().mean()}, features=y1, view_features=[y1, y2])

"""C-BYOL (Lee et al. 2021, "Compressive visual representations"): BYOL under a conditional entropy
bottleneck with von Mises-Fisher encoders.

Online path: backbone, projector, and a stochastic predictor: its output direction μ is the mean of the
forward encoder e(z|x) = vMF(μ, κ_e), and z a sample of it (reparameterised, train/models/vmf.py). Target
path: the EMA backbone and projector give t (stop-gradient); a *trainable* target projector g on l2n(t)
is the mean of the backward encoder b(z|y) = vMF(l2n(g(l2n(t))), κ_b). Per direction (view 1 online
against view 2's target, and swapped):

    w · |z - l2n(t)|²  +  β · (log e(z|x) - log b(z|y))

summed over both directions and averaged over the batch (the reference's byol_ceb loss; w = κ_d / 2).
The target projector learns only from the -β log b term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MethodConfig, ema_final_key, ema_key, opt
from ..models import l2n, mlp, vmf
from .base import Method, Output, ema_update, make_target


def cbyol_direction(mu: torch.Tensor, z: torch.Tensor, t: torch.Tensor, b_mean: torch.Tensor, kappa_e: float,
                    kappa_b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(regression, residual) per row: |z - t|² and log vMF(z | mu, κ_e) - log vMF(z | b_mean, κ_b);
    mu, z, t, b_mean unit rows, t already detached."""
    return (z - t).pow(2).sum(1), vmf.log_prob(z, mu, kappa_e) - vmf.log_prob(z, b_mean, kappa_b)


@dataclass(kw_only=True)
class CBYOLConfig(MethodConfig):
    kappa_e: float = opt(16384.0, "concentration of the forward vMF encoder e(z|x) (the stochastic predictor)",
                         check=(lambda v: 0 < v <= 1e6, "in (0, 1e6]"))
    kappa_b: float = opt(10.0, "concentration of the backward vMF encoder b(z|y) (the target projector)",
                         check=(lambda v: 0 < v <= 1e6, "in (0, 1e6]"))
    beta: float = opt(1.0, "CEB beta: weight of the residual information", check=(lambda v: 0 <= v <= 100, "in [0, 100]"))
    byol_weight: float = opt(5.0, "weight w of the BYOL regression |z - t|^2 (reference: 5 at 300 epochs, 2 at 1000)",
                             check=(lambda v: 0 < v <= 100, "in (0, 100]"))
    ema: float = ema_key(0.99)
    ema_final: float = ema_final_key(1.0)


class CBYOL(Method):
    name = "cbyol"
    recipe = "byol"
    Config = CBYOLConfig
    defaults = {"optimizer": "lars", "lr": 0.35, "weight_decay": 1.5e-6, "warmup_epochs": 10.0,
                "proj_hidden": 4096, "proj_dim": 256}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.target_backbone = make_target(self.backbone)
        self.target_projector = make_target(self.projector)
        # trainable, not an EMA copy: the backward encoder's mean
        self.target_head = mlp(m.proj_dim, m.pred_hidden, m.proj_dim, sync_bn=m.sync_bn)

    def compute_loss(self, batch, step):
        me = self.cfg.method
        v1, v2 = batch.views[0], batch.views[1]
        y1, y2 = self.backbone(v1), self.backbone(v2)
        mus = [l2n(self.predictor(self.projector(y))) for y in (y1, y2)]
        with torch.no_grad():
            ts = [l2n(self.target_projector(self.target_backbone(v))) for v in (v1, v2)]
        bs = [l2n(self.target_head(t)) for t in ts]
        reg = res = 0.0
        for a, b in ((0, 1), (1, 0)):  # online view a against view b's target
            z = vmf.sample(mus[a], me.kappa_e)
            r, c = cbyol_direction(mus[a], z, ts[b], bs[b], me.kappa_e, me.kappa_b)
            reg, res = reg + r, res + c
        loss = (me.byol_weight * reg + me.beta * res).mean()
        return Output(loss, {"byol": reg.detach().mean(), "residual": res.detach().mean(), "ema": self.ema(step)},
                      features=y1, view_features=[y1, y2])

    @torch.no_grad()
    def after_step(self, step):
        m = self.ema(step)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_projector, self.projector, m)

"""SSL-HSIC (Li, Pogodin, Sutherland, Gretton 2021, "Self-supervised learning with kernel dependence
maximization"): BYOL's architecture trained to maximise HSIC(Z, Y) between the representation and the
image identity, minus γ·√HSIC(Z, Z).

The four "views" of a batch are the L2-normalised online predictions of both crops and the stop-gradient
target projections of the other crop (gathered over processes: the loss is global). The kernel on Z is
the inverse multiquadric k(x, y) = c / √(c² + |x - y|²), approximated by D random Fourier features whose
frequencies follow the IMQ's spectral measure (sampled exactly as a Gamma mixture of Gaussians, where
the reference tabulates the amplitude density K_{(d-1)/2}(r) r^{(d-1)/2} with mpmath); the label kernel is identity's, centred (weight w_pos - w_neg = 1). The bandwidth c
enters the loss with its gradient stopped and is trained by its own optimizer (Adam 3e-4) to maximise the
mean log-magnitude of ∂k/∂|x-y|² over 1024 sampled pairs, as in the reference. RFF draws come from a
generator seeded by (run seed, step), so every process draws the same features and a resumed run the
same ones again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..config import MethodConfig, ema_final_key, ema_key, opt, positive_int_key
from ..distributed import all_gather_with_grad
from ..models import l2n, mlp
from .base import ExtraOptimizer, Method, Output, ema_update, make_target


def imq_amplitude_table(d: int, points: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """The reference's tabulated amplitude law |ω| ∝ K_ν(r) r^ν, ν = (d-1)/2, on (0, 100] (mpmath: it
    overflows float64 at small r). Slow (70 s at d = 256): kept as the test's independent check of
    `draw_frequencies`, which samples the same law exactly."""
    import mpmath
    r = np.linspace(1e-12, 100, points)
    nu = (d - 1) / 2
    p = [mpmath.besselk(nu, x) * mpmath.power(x, nu) for x in r]
    total = mpmath.fsum(p)
    return r, np.array([float(v / total) for v in p])


def rff(x: torch.Tensor, c: float | torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Random Fourier features √(2/D) cos(x/c · wᵀ + b) of rows x (n, d); w (D, d), b (D,)."""
    return math.sqrt(2.0 / w.shape[0]) * torch.cos((x / c) @ w.T + b)


def draw_frequencies(d: int, num: int, generator: torch.Generator, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, b): num frequencies of the IMQ kernel 1/√(1 + |δ|²) in d dimensions, and phases.

    The IMQ kernel is a Gamma mixture of Gaussians, (1 + r²)^(-1/2) = E_t[exp(-t r²)], t ~ Gamma(1/2, 1),
    and exp(-t r²) has frequencies N(0, 2t I): so ω = √(2t)·g, g ~ N(0, I), samples its spectral measure
    exactly. The reference draws |ω| from a 10,000-point mpmath table of the same law (truncated at 100)
    times a uniform direction; this needs no table (`imq_amplitude_table` is the test's check)."""
    dev = generator.device  # drawn where the generator lives (the features' device: no copies)
    t = torch._standard_gamma(torch.full((num, 1), 0.5, dtype=torch.float64, device=dev), generator=generator)
    w = (2 * t).sqrt() * torch.randn(num, d, generator=generator, dtype=torch.float64, device=dev)
    b = torch.rand(num, generator=generator, dtype=torch.float64, device=dev) * 2 * math.pi
    return w.to(device, dtype), b.to(device, dtype)


def label_weight(batch: int) -> float:
    """w_pos - w_neg of the doubly centred identity label kernel (the reference's get_label_weights)."""
    w_pos, w_neg = 1.0, 0.0
    for _ in range(2):
        mean = (w_pos + w_neg * (batch - 1)) / batch
        w_pos, w_neg = w_pos - mean, w_neg - mean
    return w_pos - w_neg


def hsic_xy(feats: list[torch.Tensor], w: float) -> torch.Tensor:
    """RFF estimate of HSIC(Z, Y): feats are the k views' features (B, D) of one draw."""
    k, n = len(feats), feats[0].shape[0]
    per_image = sum(feats)
    mean = sum(f.sum(0) for f in feats)
    return w * (per_image.pow(2).sum() / (n * k * (k - 1)) - mean.pow(2).sum() / (n * k) ** 2)


def hsic_xx(feats1: list[torch.Tensor], feats2: list[torch.Tensor]) -> torch.Tensor:
    """RFF estimate of HSIC(Z, Z) from two independent draws of the k views' features (B, D)."""
    k, n = len(feats1), feats1[0].shape[0]
    m1 = (sum(feats1) / k).mean(0, keepdim=True)
    m2 = (sum(feats2) / k).mean(0, keepdim=True)
    z = sum((a - m1).T @ (b - m2) for a, b in zip(feats1, feats2))
    return z.pow(2).sum() / (n * k) ** 2


def hsic_loss(hiddens: list[torch.Tensor], c: float, gamma: float, num_features: int,
              generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """γ·√HSIC(Z, Z) - HSIC(Z, Y) of the k unit-row views (B, d) at IMQ bandwidth c (a number: no
    gradient), with two RFF draws from `generator` (the first serves both estimates, as in the reference)."""
    d, dev, dt = hiddens[0].shape[1], hiddens[0].device, hiddens[0].dtype
    w1, b1 = draw_frequencies(d, num_features, generator, dev, dt)
    w2, b2 = draw_frequencies(d, num_features, generator, dev, dt)
    f1 = [rff(h, c, w1, b1) for h in hiddens]
    f2 = [rff(h, c, w2, b2) for h in hiddens]
    xy = hsic_xy(f1, label_weight(hiddens[0].shape[0]))
    xx = hsic_xx(f2, f1)
    return gamma * xx.clamp_min(0).sqrt() - xy, {"hsic_xy": xy.detach(), "hsic_xx": xx.detach()}


def bandwidth_loss(hiddens: list[torch.Tensor], scale: torch.Tensor, generator: torch.Generator,
                   pairs: int = 1024) -> torch.Tensor:
    """-mean log |∂k/∂δ| over sampled pairs, δ = |x - y|² (stop-gradient), k = c / √(δ + c²): the
    bandwidth's own objective (its gradient reaches only `scale`)."""
    n = hiddens[0].shape[0]
    per = max(1, pairs // len(hiddens))
    pick = lambda: torch.cat([h[torch.randint(n, (per,), generator=generator, device=generator.device).to(h.device)]
                              for h in hiddens])
    x, y = pick().detach(), pick().detach()
    delta = torch.cdist(x, y).pow(2)
    log_g = torch.log(scale.abs()) - math.log(2) - 1.5 * torch.log(delta + scale * scale)
    return -log_g.clamp_min(math.log(1e-7)).mean()


@dataclass(kw_only=True)
class SSLHSICConfig(MethodConfig):
    hsic_gamma: float = opt(3.0, "weight γ of √HSIC(Z, Z) (the regulariser)", check=(lambda v: 0 <= v <= 100, "in [0, 100]"))
    rff_features: int = positive_int_key(512, "random Fourier features of the IMQ kernel")
    kernel_lr: float = opt(3e-4, "learning rate of the bandwidth's Adam optimizer",
                           check=(lambda v: 0 < v <= 1, "in (0, 1]"))
    ema: float = ema_key(0.99)
    ema_final: float = ema_final_key(1.0)


class SSLHSIC(Method):
    name = "ssl_hsic"
    recipe = "byol"
    Config = SSLHSICConfig
    defaults = {"optimizer": "lars", "lr": 0.4, "weight_decay": 1e-6, "warmup_epochs": 10.0,
                "proj_hidden": 4096, "proj_dim": 256}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        m = cfg.model
        self.projector = mlp(self.backbone.feat_dim, m.proj_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim, sync_bn=m.sync_bn)
        self.target_backbone = make_target(self.backbone)
        self.target_projector = make_target(self.projector)
        self.kernel_scale = nn.Parameter(torch.ones(()))

    def compute_loss(self, batch, step):
        me = self.cfg.method
        v1, v2 = batch.views[0], batch.views[1]
        y1, y2 = self.backbone(v1), self.backbone(v2)
        p1, p2 = (self.predictor(self.projector(y)) for y in (y1, y2))
        with torch.no_grad():
            t1, t2 = (self.target_projector(self.target_backbone(v)) for v in (v1, v2))
        hiddens = [all_gather_with_grad(l2n(h)) for h in (p1, p2, t2.detach(), t1.detach())]
        g = self.step_generator(step, y1.device, stream=1)  # the same features on every process
        loss, logs = hsic_loss(hiddens, self.kernel_scale.detach().abs().clamp_min(1e-6), me.hsic_gamma,
                               me.rff_features, g)
        kernel = bandwidth_loss(hiddens, self.kernel_scale, g)
        logs.update(hsic_loss=loss.detach(), kernel_scale=self.kernel_scale.detach(), ema=self.ema(step))
        return Output(loss + kernel, logs, features=y1, view_features=[y1, y2])

    def extra_optimizers(self):
        lr = float(self.cfg.method.kernel_lr)
        return super().extra_optimizers() + [ExtraOptimizer(
            "kernel_scale", [self.kernel_scale], lambda ps: torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.999), eps=1e-8),
            np.full(self.total_steps, lr))]

    @torch.no_grad()
    def after_step(self, step):
        m = self.ema(step)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_projector, self.projector, m)

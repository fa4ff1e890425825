"""Optimizers (SGD, AdamW, LARS) and per-step schedules precomputed as arrays (DINO style)."""

from __future__ import annotations

import numpy as np
import torch

from .config import Config


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `base` over `warmup_steps`, then cosine to `final`.
    One float64 value per step; the length is checked."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    n = total_steps - warmup_steps
    t = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(n, 1)))
    out = np.concatenate([warm, cos]).astype(np.float64)
    assert len(out) == total_steps, (len(out), total_steps)
    return out


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in SimCLR/BYOL: SGD with momentum whose per-tensor update is scaled by
    trust * ||w|| / ||g + wd w||. Groups with `lars_exclude=True` (biases, norms) get neither the
    adaptation nor weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not g["lars_exclude"]:
                    d = d.add(p, alpha=g["weight_decay"])
                    pn, dn = torch.norm(p), torch.norm(d)
                    q = torch.where((pn > 0) & (dn > 0), g["trust"] * pn / dn, torch.ones_like(pn))
                    d = d.mul(q)
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                mu = st["mu"].mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(cfg: Config, groups: list[dict], peak_lr: float) -> torch.optim.Optimizer:
    """The main optimizer over a method's param_groups (each with weight_decay and lars_exclude)."""
    o = cfg.optim
    groups = [dict(g) for g in groups]
    if o.optimizer == "sgd":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.SGD(groups, lr=peak_lr, momentum=o.sgd_momentum)
    if o.optimizer == "adamw":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.AdamW(groups, lr=peak_lr)
    if o.optimizer == "lars":
        return LARS(groups, lr=peak_lr, momentum=o.sgd_momentum, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.optimizer!r}; known: sgd, adamw, lars")


def peak_lr(cfg: Config, world_size: int) -> float:
    """--lr is given for a global batch of 256 and scaled linearly (Goyal et al. 2017)."""
    return cfg.optim.lr * cfg.data.batch_size * world_size / 256


def lr_schedule(cfg: Config, steps_per_epoch: int, world_size: int) -> np.ndarray:
    total = cfg.run.epochs * steps_per_epoch
    base = peak_lr(cfg, world_size)
    warm = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    return cosine_schedule(base, base * cfg.optim.min_lr_ratio, total, warm)


def check_schedule(arr: np.ndarray, total: int, name: str) -> None:
    if len(arr) != total or not np.all(np.isfinite(arr)):
        raise ValueError(f"schedule {name} has {len(arr)} finite-checked steps, expected {total}")


def lr_at(arr: np.ndarray, step: int) -> float:
    return float(arr[min(step, len(arr) - 1)])


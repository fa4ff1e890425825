"""Shared base of the self-supervised methods.

A method is an nn.Module (wrapped by DDP through accelerate) with:
  forward(views, index, step) -> (loss, logs)   the training loss of one local batch
  after_step(step)                              after the optimizer step: EMA targets, bank / queue writes
  eval_backbone()                               the encoder kNN / linear eval / export use
Memory banks, queues and their pointers are *persistent buffers*, so they are in the state dict and
in every checkpoint. Bank and queue writes are deferred to after_step because the loss kernels read
those buffers again in backward. Per-step schedules (temperature, EMA momentum) are arrays built once.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from ..config import Config
from ..distributed import all_gather_nograd
from ..models import build_backbone, l2n
from ..optim import check_schedule, cosine_schedule


class Method(nn.Module):
    name: ClassVar[str] = ""
    recipe: ClassVar[str] = "simclr"
    """Default view recipe (pipeline/views/recipes.py)."""
    defaults: ClassVar[dict] = {}
    """Flat config keys this method sets unless the config file or the CLI does."""
    reads: ClassVar[frozenset] = frozenset()
    """The `method` section keys (temperature, ema, queue_size, ...) this method uses: setting any other
    one fails at parse time, and these must be resolved (no placeholder left) once defaults merge."""
    multiview_encoder: ClassVar[bool] = False
    """True: one encoder per view (CMC); the view channel counts come from the recipe."""

    def __init__(self, cfg: Config, n_data: int, total_steps: int, view_channels: list[int]):
        super().__init__()
        self.cfg, self.n_data, self.total_steps = cfg, n_data, total_steps
        m = cfg.model
        self.backbone = build_backbone(m.arch, m.width, m.cifar_stem, m.sync_bn,
                                       view_channels if self.multiview_encoder else None)
        me = cfg.method
        t_final = me.temperature_final or me.temperature
        self.tau = cosine_schedule(me.temperature, t_final, total_steps) if me.temperature else None
        ema_final = me.ema_final or me.ema
        self.ema_sched = cosine_schedule(me.ema, ema_final, total_steps) if me.ema else None
        for name, arr in (("temperature", self.tau), ("ema", self.ema_sched)):
            if arr is not None:
                check_schedule(arr, total_steps, name)

    # -- schedules ---------------------------------------------------------------------------
    def temperature(self, step: int) -> float:
        return float(self.tau[min(step, len(self.tau) - 1)])

    def ema(self, step: int) -> float:
        return float(self.ema_sched[min(step, len(self.ema_sched) - 1)])

    # -- interface ---------------------------------------------------------------------------
    def forward(self, views: list[torch.Tensor], index: torch.Tensor, step: int):
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called once per optimizer step after it; default: nothing."""

    def discard_pending(self) -> None:
        """Drop deferred bank / queue writes of a skipped (non-finite) step."""
        if hasattr(self, "_pending"):
            self._pending = [] if isinstance(self._pending, list) else None

    def eval_backbone(self) -> nn.Module:
        return self.backbone

    @classmethod
    def eval_recipe(cls, train_recipe: str, image_size: int):
        """Recipe of the kNN / linear-eval loader: center crop, RGB (CMC overrides)."""
        return "eval"


def make_target(module: nn.Module) -> nn.Module:
    """A frozen copy (momentum encoder / EMA target): parameters without gradients."""
    t = copy.deepcopy(module)
    for p in t.parameters():
        p.requires_grad_(False)
    return t


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
    """target = m * target + (1 - m) * online for parameters; buffers (BN stats) are copied."""
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.mul_(m).add_(po.detach(), alpha=1 - m)
    for bt, bo in zip(target.buffers(), online.buffers()):
        bt.copy_(bo)


def init_bank(n: int, d: int) -> torch.Tensor:
    """InstDisc / CMC memory initialisation: uniform in [-1/sqrt(d/3), 1/sqrt(d/3)], rows normalised."""
    std = 1.0 / np.sqrt(d / 3)
    return l2n(torch.rand(n, d).mul_(2 * std).add_(-std))


class Queue(nn.Module):
    """MoCo's key queue: a (K, d) persistent buffer and its write pointer as a long tensor buffer."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", l2n(torch.randn(size, dim)), persistent=True)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long), persistent=True)

    @torch.no_grad()
    def push(self, k: torch.Tensor) -> None:
        """Enqueue the keys of all processes (gathered here), oldest overwritten first. The write wraps
        round the end of the ring, so a batch of any size works: a batch shortened at read time (a
        corrupt member skipped) or a queue that is no multiple of the global batch. More keys than the
        queue holds: the newest `size` stay, where a sequential write would have left them."""
        k = all_gather_nograd(k.detach().to(self.keys.dtype))
        n, size = k.shape[0], self.keys.shape[0]
        p = int(self.ptr)
        start = p
        if n > size:
            k, start = k[n - size:], (p + n - size) % size
        idx = (start + torch.arange(k.shape[0], device=k.device)) % size
        self.keys[idx] = k
        self.ptr.fill_((p + n) % size)

"""Instance discrimination (Wu et al. 2018): a memory bank of one embedding per training sample,
keyed by the global sample index the pipeline yields; each sample is contrasted against its own
bank row and `nce_k` random rows, with the softmax (InfoNCE) or CMC's NCE loss (kernels.bank_nce).

The bank and NCE's normalisation constant Z are persistent buffers (Z < 0 means "not estimated yet";
it is estimated from the first batch, as in the paper, and then kept). Bank rows are written after
the optimizer step with the features and indices of all processes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import kernels

from ..distributed import all_gather_nograd
from ..models import l2n
from .base import Method, init_bank


def bank_loss(q, bank, index, neg_idx, temperature, mode, Z):
    """kernels.bank_nce on normalised queries; returns (loss, Z or None)."""
    out = kernels.bank_nce(l2n(q), bank, index, neg_idx, temperature, mode, Z)
    return out.loss, out.Z


class BankState(nn.Module):
    """One memory bank and its NCE constant."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.register_buffer("bank", init_bank(n, d), persistent=True)
        self.register_buffer("Z", torch.full((), -1.0), persistent=True)

    def loss(self, q, index, k, temperature, mode):
        neg = torch.randint(0, self.bank.shape[0], (q.shape[0], k), device=q.device)
        z = None if mode == "softmax" or float(self.Z) < 0 else self.Z
        loss, z_new = bank_loss(q, self.bank, index, neg, temperature, mode, z)
        if mode == "nce" and float(self.Z) < 0:
            # Every process estimates Z from its batch; average so that all keep the same constant.
            zs = all_gather_nograd(z_new.reshape(1).float())
            self.Z.fill_(float(zs.mean()))
        return loss

    @torch.no_grad()
    def write(self, index, q, momentum):
        kernels.bank_update(self.bank, all_gather_nograd(index), all_gather_nograd(l2n(q.detach())), momentum)


class InstDisc(Method):
    name = "instdisc"
    recipe = "instdisc"  # one view per sample, as in the paper: no second view is decoded and discarded
    defaults = {"temperature": 0.07, "optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4,
                "warmup_epochs": 0.0, "nce_k": 4096, "proj_dim": 128}
    reads = frozenset({"temperature", "temperature_final", "nce_k", "nce_mode", "bank_momentum"})

    def __init__(self, cfg, n_data, total_steps, view_channels):
        super().__init__(cfg, n_data, total_steps, view_channels)
        self.head = nn.Linear(self.backbone.feat_dim, cfg.model.proj_dim)
        self.memory = BankState(n_data, cfg.model.proj_dim)
        self._pending = None

    def forward(self, views, index, step):
        # One view per sample, as in the paper (a recipe with more views: the first one is used).
        q = self.head(self.backbone(views[0]))
        me = self.cfg.method
        loss = self.memory.loss(q, index, min(me.nce_k, self.n_data), self.temperature(step), me.nce_mode)
        self._pending = (index, q.detach())
        return loss, {"temperature": self.temperature(step)}

    @torch.no_grad()
    def after_step(self, step):
        if self._pending is not None:
            self.memory.write(*self._pending, self.cfg.method.bank_momentum)
            self._pending = None

"""Instance discrimination (Wu et al. 2018): a memory bank of one embedding per training sample,
keyed by the global sample index the pipeline yields; each sample is contrasted against its own
bank row and `nce_k` random rows, with the softmax (InfoNCE) or CMC's NCE loss (kernels.bank_nce).
`--negatives ball|ring` (Wu et al.) ranks the whole bank per query instead and keeps a window of
similarity ranks as negatives (kernels.ring_nce; all of them, or --ring-samples drawn from each window as the
reference's 4,095).

The bank and NCE's normalisation constant Z are persistent buffers (Z < 0 means "not estimated yet";
it is estimated from the first batch, as in the paper, and then kept). Bank rows are written after
the optimizer step with the features and indices of all processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

import kernels

from ..config import ConfigError, RingNegatives, fraction_key, opt, positive_int_key, temperature_final_key, temperature_key
from ..distributed import all_gather_nograd
from ..models import l2n
from .base import Method, Output, init_bank, register_state


def bank_loss(q, bank, index, neg_idx, temperature, mode, Z):
    """kernels.bank_nce on normalised queries; returns (loss, Z or None)."""
    out = kernels.bank_nce(l2n(q), bank, index, neg_idx, temperature, mode, Z)
    return out.loss, out.Z


class BankState(nn.Module):
    """One memory bank and its NCE constant."""

    def __init__(self, n: int, d: int):
        super().__init__()
        register_state(self, "bank", init_bank(n, d))
        register_state(self, "Z", torch.full((), -1.0))

    def z_known(self) -> bool:
        """Whether Z holds an estimate (it starts at -1). Reading the buffer is a host sync, so the
        answer is cached until the buffer changes: a new tensor or a new version (a checkpoint load
        or the estimate writes it in place)."""
        seen = (id(self.Z), self.Z._version)
        if getattr(self, "_z_seen", None) != seen:
            self._z_known, self._z_seen = bool(float(self.Z) >= 0), seen
        return self._z_known

    def loss(self, q, index, k, temperature, mode, window=None, samples=0, generator=None):
        if window is not None:
            # Ring / Ball (Wu et al.): every bank row is a candidate, each query keeps the rows of its
            # similarity-rank window as negatives; the positive is its own row (softmax only). With
            # `samples`, that many are drawn from each window (IR-Ring: 4095) and scored by bank_nce.
            qn = l2n(q)
            if samples:
                neg = kernels.ring_sample(qn, self.bank, temperature, *window, samples, generator=generator)
                return bank_loss(q, self.bank, index, neg, temperature, "softmax", None)[0]
            return kernels.ring_nce(qn, self.bank[index], self.bank, temperature, *window)
        neg = torch.randint(0, self.bank.shape[0], (q.shape[0], k), device=q.device)
        estimate = mode == "nce" and not self.z_known()
        z = None if mode == "softmax" or estimate else self.Z
        loss, z_new = bank_loss(q, self.bank, index, neg, temperature, mode, z)
        if estimate:
            # Every process estimates Z from its batch; average so that all keep the same constant.
            zs = all_gather_nograd(z_new.reshape(1).float())
            self.Z.copy_(zs.mean())
        return loss

    @torch.no_grad()
    def write(self, index, q, momentum):
        kernels.bank_update(self.bank, all_gather_nograd(index), all_gather_nograd(l2n(q.detach())), momentum)


@dataclass(kw_only=True)
class InstDiscConfig(RingNegatives):
    temperature: float = temperature_key(0.07)
    temperature_final: float = temperature_final_key()
    nce_k: int = positive_int_key(4096, "negatives drawn from the memory bank per sample")
    nce_mode: Literal["softmax", "nce"] = opt("softmax", "memory-bank loss: softmax (InfoNCE) or CMC's NCE")
    bank_momentum: float = fraction_key(0.5, "memory-bank update momentum")

    def __post_init__(self):
        super().__post_init__()
        if self.negatives != "all" and self.nce_mode != "softmax":
            raise ConfigError(f"--negatives {self.negatives} ranks the whole bank under the softmax loss; "
                              f"it does not apply to --nce-mode {self.nce_mode}")


class InstDisc(Method):
    name = "instdisc"
    recipe = "instdisc"  # one view per sample, as in the paper: no second view is decoded and discarded
    Config = InstDiscConfig
    defaults = {"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0, "proj_dim": 128}

    def __init__(self, cfg, data, total_steps):
        super().__init__(cfg, data, total_steps)
        self.head = nn.Linear(self.backbone.feat_dim, cfg.model.proj_dim)
        self.memory = BankState(self.n_data, cfg.model.proj_dim)

    def compute_loss(self, batch, step):
        # One view per sample, as in the paper (a recipe with more views: the first one is used).
        h = self.backbone(batch.views[0])
        q = self.head(h)
        me = self.cfg.method
        loss = self.memory.loss(q, batch.index, min(me.nce_k, self.n_data), self.temperature(step), me.nce_mode,
                                self.ring_window(step), me.ring_samples,
                                self.step_generator(step, q.device, stream=2, per_rank=True))
        self.defer(self.memory.write, batch.index, q.detach(), me.bank_momentum)
        return Output(loss, {"temperature": self.temperature(step)}, features=h)

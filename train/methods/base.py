"""The platform every self-supervised method stands on.

A method is one file in this package: a `Method` subclass with its `name`, its view `recipe`, its own
typed keys (`Config`, a `train.config.MethodConfig` dataclass), defaults for common keys (`defaults`:
optimizer, lr, weight decay, warm-up, widths), and

  compute_loss(batch, step) -> Output      the self-supervised loss of one local batch (a `Batch`
                                           without labels unless `uses_labels`)
  after_step(step)                         after the optimizer step: EMA targets
  on_epoch_start(ctx)                      before each epoch's first step: a pass over the train split
                                           (`EpochContext.features`) for clustering / pseudo-labels
  eval_backbone()                          the encoder kNN / linear eval / export use
  param_groups() / extra_optimizers()      what the main optimizer trains, and further optimizers

The platform gives it:
  * registered state (`register_state`): persistent buffers (banks, queues, prototypes, assignments)
    that are in every checkpoint, restored exactly by --resume, and checked identical on every rank
    at each checkpoint (`state_digest`);
  * deferred writes (`defer`): bank / queue writes run after the optimizer step (the loss kernels read
    those buffers again in backward) and are dropped with a skipped non-finite step;
  * an online linear probe (`attach_probe`): a linear classifier on the detached pooled features of
    the first view (`Output.features`), with its own optimizer, so a run shows linear accuracy as it
    trains; labels reach only the probe;
  * schedules: per-step temperature and EMA arrays.
A batch of any size works: banks are written by global index; MoCo's queue wraps round its ring; a
rank's batch shortened at read time is trimmed with the others to the smallest (trainer).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config as TrainConfig, MethodConfig
from ..distributed import all_gather_nograd, world
from ..models import build_backbone, l2n
from ..optim import check_schedule, cosine_schedule


@dataclass(frozen=True)
class DataInfo:
    """What the data tells a method: sample count (bank rows), per-view channel counts (backbone input,
    CMC's per-view encoders), class count (the online probe) and whether samples are clips."""
    num_samples: int
    view_channels: tuple[int, ...]
    num_classes: int = 0
    clips: bool = False


@dataclass
class Output:
    loss: torch.Tensor
    """The self-supervised loss of the local batch (the number the run reports and checks)."""
    logs: dict = field(default_factory=dict)
    features: torch.Tensor | None = None
    """Pooled backbone features (B, feat_dim) of the first view, for the online probe."""
    view_features: list[torch.Tensor] | None = None
    """Pooled backbone features of each view the method ran its online backbone on (with gradients),
    for an auxiliary objective (--aux); views it did not run are run by `forward` when one needs them."""


@dataclass
class ExtraOptimizer:
    """A further optimizer of a method (a discriminator, a kernel bandwidth, the online probe): its
    parameters leave the main optimizer; `lr` is a per-step array (its own schedule)."""
    name: str
    params: list[nn.Parameter]
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    lr: np.ndarray


class Method(nn.Module):
    name: ClassVar[str] = ""
    recipe: ClassVar[str] = "simclr"
    """Default view recipe (pipeline/views/recipes.py; clip recipes for `clips` methods)."""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    """The method's own keys (shown by `--method NAME --help`; setting another method's key fails)."""
    defaults: ClassVar[dict] = {}
    """Common config keys (optimizer, lr, ...) this method sets unless the config file or the CLI does."""
    multiview_encoder: ClassVar[bool] = False
    """True: one encoder per view (CMC); the view channel counts come from the recipe."""
    clips: ClassVar[bool] = False
    """True: the method trains on clips (the trainer builds a clip loader whatever the data)."""
    uses_labels: ClassVar[bool] = False
    """True only for supervised parts: otherwise compute_loss never sees labels."""
    wants_aug: ClassVar[bool] = False
    """True: the loader adds each view's applied augmentation record to the batch (`Batch.aug`: crop
    box, flip, jitter factors, ...; AugSelf-style objectives predict them)."""
    outputs: ClassVar[tuple[str, ...]] = ("pooled",)
    """The backbone outputs compute_loss asks `backbone.forward_features` for (AMDIM / DIM / CPC: stage
    maps); a backbone without one of them fails when the method is built, naming what it has."""

    def __init__(self, cfg: TrainConfig, data: DataInfo, total_steps: int):
        super().__init__()
        self.cfg, self.data, self.total_steps = cfg, data, total_steps
        self.n_data = data.num_samples
        m = cfg.model
        ch = list(data.view_channels)
        if not self.multiview_encoder and len(set(ch)) > 1:
            raise ValueError(f"{self.name}: one encoder for views of {ch} channels; use a recipe whose views "
                             "have one channel count")
        if self.multiview_encoder:  # one encoder per view, each with its view's channels
            self.backbone = build_backbone(m.arch, m.width, m.cifar_stem, m.sync_bn, ch)
        else:  # ViTs: positions for the training crop
            vit = {"image_size": cfg.data.image_size, "patch_size": m.patch_size} if m.arch.startswith("vit") else {}
            self.backbone = build_backbone(m.arch, m.width, m.cifar_stem, m.sync_bn, in_channels=ch[0] if ch else 3,
                                           **vit)
        missing = [o for o in self.outputs if o not in self.backbone.feature_names]
        if missing:
            raise ValueError(f"{self.name} needs backbone outputs {missing}; {m.arch} has "
                             f"{', '.join(self.backbone.feature_names)}")
        me = cfg.method
        self.tau = self.ema_sched = None
        if getattr(me, "temperature", 0):
            self.tau = cosine_schedule(me.temperature, getattr(me, "temperature_final", 0) or me.temperature,
                                   total_steps)
            check_schedule(self.tau, total_steps, "temperature")
        if getattr(me, "ema", 0):
            self.ema_sched = cosine_schedule(me.ema, getattr(me, "ema_final", 0) or me.ema, total_steps)
            check_schedule(self.ema_sched, total_steps, "ema")
        self.probe: nn.Linear | None = None
        self.aux = self._build_aux(cfg) if m.aux != "none" else None
        self._deferred: list[tuple[Callable, tuple]] = []
        self._state_names: list[str] = []

    # -- schedules ---------------------------------------------------------------------------
    def temperature(self, step: int) -> float:
        return float(self.tau[min(step, len(self.tau) - 1)])

    def ema(self, step: int) -> float:
        return float(self.ema_sched[min(step, len(self.ema_sched) - 1)])

    def epoch_at(self, step: int) -> float:
        """The (fractional) epoch of `step`: the schedules span all epochs in total_steps."""
        return step * self.cfg.run.epochs / max(1, self.total_steps)

    def ring_window(self, step: int) -> tuple[float, float] | None:
        """The Ring / Ball rank window at `step` (train.config.RingNegatives; None: all negatives)."""
        return self.cfg.method.window(self.epoch_at(step))

    def step_generator(self, step: int, device, stream: int, per_rank: bool = False) -> torch.Generator:
        """A random stream that is a pure function of (run seed, step, stream[, rank]) on `device`:
        the same on every process (per_rank False: e.g. random features of a global loss) or one per
        process (negatives drawn for its own rows), and the same again after a resume."""
        rank = world()[0] if per_rank else 0
        seed = ((int(self.cfg.run.seed) * 1_000_003 + int(step)) * 1009 + int(stream)) * 997 + rank
        return torch.Generator(device=device).manual_seed(seed % (2 ** 63))

    # -- the step ----------------------------------------------------------------------------
    def forward(self, batch, step: int) -> tuple[torch.Tensor, Output]:
        """(the tensor to back-propagate, the method's Output). The first is the self-supervised loss
        plus the online probe's cross-entropy on detached features: the probe's gradient reaches only
        the probe, and DDP averages it with the rest."""
        out = self.compute_loss(batch if self.uses_labels else batch.without_labels(), step)
        if self.aux is not None:
            self._add_aux(batch, out)
        total = out.loss
        if self.probe is not None:
            if out.features is None:
                raise TypeError(f"{self.name}.compute_loss returned no features for the online probe")
            logits = self.probe(out.features.detach())
            y = batch.label.to(logits.device)
            probe_loss = F.cross_entropy(logits.float(), y, ignore_index=-1)
            out.logs["probe_loss"] = probe_loss.detach()
            out.logs["probe_correct"] = (logits.argmax(1) == y).sum().detach()
            out.logs["probe_count"] = (y >= 0).sum().detach()
            total = total + probe_loss.to(total.dtype)
        return total, out

    def compute_loss(self, batch, step: int) -> Output:
        raise NotImplementedError

    # -- auxiliary objective (--aux) ---------------------------------------------------------
    def _build_aux(self, cfg: TrainConfig) -> nn.Module:
        from pipeline.views.recipes import run_recipe

        from ..auxiliary import AUX
        from ..config import ConfigError
        if self.clips or self.multiview_encoder:
            raise ConfigError(f"--aux {cfg.model.aux}: needs one shared image encoder; {self.name} "
                              f"{'trains on clips' if self.clips else 'has one encoder per view'}")
        d = cfg.data
        views = run_recipe(d.recipe or self.recipe, d.image_size, blur=d.blur, crop_min_scale=d.crop_min_scale).views
        try:
            # its own random stream: the method's modules (built after this) initialise as without --aux
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(cfg.run.seed) + 0x5EED)
                return AUX[cfg.model.aux](self.backbone.feat_dim, views, cfg.model.aux_hidden, cfg.model.sync_bn)
        except ValueError as e:
            raise ConfigError(f"--aux {cfg.model.aux} with recipe {d.recipe or self.recipe!r}: {e}") from None

    def _add_aux(self, batch, out: Output) -> None:
        """out.loss += aux_weight x the auxiliary loss on the first two views' backbone features (those
        the method returned, the others run here) and their augmentation records."""
        if batch.aug is None:
            raise RuntimeError(f"--aux {self.cfg.model.aux} needs the batch's augmentation records (the "
                               "trainer's loader adds them when --aux is set)")
        feats = list(out.view_features or ([out.features] if out.features is not None else []))
        feats += [self.backbone(v) for v in batch.views[len(feats):2]]
        aux, logs = self.aux(feats[0], feats[1], batch.aug[0], batch.aug[1])
        out.logs.update(logs, base_loss=out.loss.detach(), aux_loss=aux.detach())
        out.loss = out.loss + self.cfg.model.aux_weight * aux.to(out.loss.dtype)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called once per optimizer step after it, before the deferred writes; default: nothing."""

    def on_epoch_start(self, ctx: "EpochContext") -> None:
        """Before the first step of every epoch (also after a resume at an epoch's start). Whatever it
        computes must go to registered state, so a resume mid-epoch restores it; default: nothing."""

    def eval_backbone(self) -> nn.Module:
        return self.backbone

    @classmethod
    def eval_recipe(cls, train_recipe: str, image_size: int):
        """Recipe of the kNN / linear-eval loader: center crop, RGB (CMC overrides)."""
        return "eval"

    # -- deferred writes ---------------------------------------------------------------------
    def defer(self, fn: Callable, *args) -> None:
        """Run fn(*args) after this step's optimizer step and after_step (bank / queue writes)."""
        self._deferred.append((fn, args))

    @torch.no_grad()
    def run_deferred(self) -> None:
        todo, self._deferred = self._deferred, []
        for fn, args in todo:
            fn(*args)

    def discard_deferred(self) -> None:
        """Drop the deferred writes of a skipped (non-finite) step."""
        self._deferred = []

    # -- registered state --------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every registered state tensor of the method and its submodules, by qualified name."""
        out = {}
        for prefix, mod in self.named_modules():
            for n in getattr(mod, "_state_names", ()):
                out[f"{prefix}.{n}" if prefix else n] = getattr(mod, n)
        return out

    def state_digest(self) -> str:
        """A hash of all registered state (bytes): equal on every rank when the state is in sync."""
        h = hashlib.sha256()
        for k, t in sorted(self.state_tensors().items()):
            h.update(k.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # -- optimizers --------------------------------------------------------------------------
    def extra_optimizers(self) -> list[ExtraOptimizer]:
        """Further optimizers (default: the online probe's, when attached)."""
        if self.probe is None:
            return []
        lr = float(self.cfg.optim.probe_lr)
        return [ExtraOptimizer("probe", list(self.probe.parameters()),
                               lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0),
                               np.full(self.total_steps, lr))]

    def main_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the main optimizer: all but those of the extra optimizers."""
        taken = {id(p) for e in self.extra_optimizers() for p in e.params}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in taken]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The main optimizer's groups: weight decay (and LARS adaptation) on weights, not on biases and
        norm parameters (1-d tensors). Override for per-part learning rates."""
        decay, no_decay = [], []
        for p in self.main_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
                {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]

    def attach_probe(self, num_classes: int) -> None:
        """The online linear probe on `eval_backbone()`'s pooled features (built after the method, so
        the method's own initialisation is unchanged)."""
        if num_classes < 2:
            raise ValueError(f"online probe: the data has {num_classes} classes")
        self.probe = nn.Linear(self.eval_backbone().feat_dim, num_classes)


def register_state(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """A persistent buffer that is method state (see Method.state_tensors): checkpointed, restored by
    --resume, kept identical on every rank by the method's gathered writes."""
    module.register_buffer(name, tensor, persistent=True)
    if "_state_names" not in module.__dict__:
        module._state_names = []
    module._state_names.append(name)


@dataclass
class EpochContext:
    """What Method.on_epoch_start gets: the epoch, the step, and a feature pass over the train split."""
    epoch: int
    step: int
    features: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """features(module=None, normalize=True, gather=True) -> (features, labels, global indices): the
    train split through the eval recipe and `module` (default: the eval backbone), every rank's shard
    gathered and sorted by index (`gather=False`: this rank's shard)."""
    device: torch.device


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
    """MoCo's key queue: a (K, d) registered-state buffer and its write pointer."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        register_state(self, "keys", l2n(torch.randn(size, dim)))
        register_state(self, "ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, k: torch.Tensor) -> None:
        """Enqueue the keys of all processes (gathered here), oldest overwritten first. The write wraps
        round the end of the ring, so a batch of any size works: a batch shortened at read time (a
        corrupt member skipped) or a queue that is no multiple of the global batch. More keys than the
        queue holds: the newest `size` stay, where a sequential write would have left them."""
        k = all_gather_nograd(k.detach().to(self.keys.dtype))
        n, size = k.shape[0], self.keys.shape[0]
        p = self.ptr  # stays on the device: reading it would be a host sync per step
        start = p
        if n > size:
            k, start = k[n - size:], (p + (n - size)) % size
        idx = (start + torch.arange(k.shape[0], device=k.device)) % size
        self.keys[idx] = k
        self.ptr.copy_((p + n) % size)

"""The training loop: build (accelerator, data, method, optimizers, schedules) -> train -> close.

The trainer is a thin builder: the data (loader, recipe, DataInfo; images or clips) comes from
train/data.py, the method from its registry, its optimizers from the method (param_groups,
extra_optimizers). Epoch start: method.on_epoch_start with a feature pass. One step: next Batch ->
trimmed to the smallest rank's -> forward (autocast) -> finite check on all ranks -> backward -> clip
-> LR from the per-step arrays -> optimizer steps -> method.after_step (EMA) -> the method's deferred
writes (banks, queues) -> log -> checkpoint. All randomness the loop consumes flows from checkpointed
state: the pipeline's augmentations are a pure function of (seed, epoch, index, view) and its position
is in loader.state_dict(); torch / numpy / python RNG states (negatives sampling) are saved per rank.
On CPU, with deterministic algorithms, a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import torch.nn.functional as F

from pipeline.loaders.batch import Batch

from . import checkpoint as ckpt
from .config import Config
from .data import build_data
from .distributed import all_gather_host_ints, all_gather_nograd, all_reduce_flag, all_reduce_sum
from .knn import extract, knn_classify, split_holdout
from .methods import get_method
from .methods.base import EpochContext
from .models import export_backbone
from .observe import Metrics, progress, write_report, write_run_config
from .optim import build_optimizer, check_schedule, lr_at, lr_schedule, peak_lr

class NonFiniteLoss(RuntimeError):
    pass


@dataclass(kw_only=True)
class State:
    step: int = 0
    nan_skips: int = 0
    history: dict = field(default_factory=dict)
    probe: list = field(default_factory=lambda: [0, 0])
    """Online probe: correct and counted training samples of this rank in the current epoch."""


def _accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    mp = cfg.run.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    elif mp == "fp64":
        mp = "no"  # accelerate has no float64 mode: the trainer casts the model and the views itself
    log_with = None
    try:
        import tensorboard  # noqa: F401
        log_with = "tensorboard"
    except ImportError:
        pass
    # broadcast_buffers=False: memory banks and queues are kept identical on every rank by the
    # methods themselves (gathered writes); broadcasting an N x d bank every step would be waste.
    # `accelerate launch --multi_gpu` on a machine without CUDA starts torchrun workers (WORLD_SIZE > 1)
    # but accelerate would then run each one alone; cpu=True makes it a gloo process group.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu, mixed_precision=mp, log_with=log_with, project_dir=cfg.run.out,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


class Trainer:
    """build (accelerator, data, method, optimizers, schedules) -> train() -> close()."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.acc = _accelerator(cfg)
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.run_dir = Path(cfg.run.out)
        self._prepare_run_dir()
        if cfg.run.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        method_cls = get_method(cfg.run.method)
        # the indexed device (cuda:<local rank>): an unindexed 'cuda' put every rank's decoding on GPU 0
        self.data = build_data(cfg, method_cls, self.rank, self.world, str(self.device))
        self.loader = self.data.loader
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{cfg.data.data}/train has fewer samples than one global batch "
                             f"({cfg.data.batch_size} x {self.world})")
        self.total_steps = cfg.run.epochs * self.steps_per_epoch
        # Same seed on every rank: identical initial weights, banks and queues.
        torch.manual_seed(cfg.run.seed)
        self.method = method_cls(cfg, self.data.info, self.total_steps)
        if cfg.run.online_probe and self.data.info.num_classes >= 2:
            self.method.attach_probe(self.data.info.num_classes)
        self.dtype = torch.float64 if cfg.run.mixed_precision == "fp64" else None
        if self.dtype is not None:
            self.method.to(self.dtype)
        self.lr = lr_schedule(cfg, self.steps_per_epoch, self.world)
        check_schedule(self.lr, self.total_steps, "lr")
        opt = build_optimizer(cfg, self.method.param_groups(cfg.optim.weight_decay), peak_lr(cfg, self.world))
        self.extras = self.method.extra_optimizers()
        for e in self.extras:
            check_schedule(e.lr, self.total_steps, f"{e.name} lr")
        self.model, self.opt, *extra_opts = self.acc.prepare(self.method, opt, *[e.make(e.params) for e in self.extras])
        self.extra_opts = dict(zip([e.name for e in self.extras], extra_opts))
        self.main_params = self.method.main_parameters()
        # Per-rank streams from here on (memory-bank negatives differ between ranks).
        torch.manual_seed(cfg.run.seed * 1000 + self.rank + 1)
        np.random.seed((cfg.run.seed * 1000 + self.rank + 1) % 2**32)
        self.state = State()
        self._first_bad = self._bad_loss = self._probe_counts = None  # device-side, see _step
        self.metrics = Metrics(self.run_dir, self.acc.is_main_process)
        if cfg.run.resume:
            self._resume()
        if self.acc.is_main_process:
            write_run_config(self.run_dir, cfg.to_dict(), {
                "device": str(self.device), "device_name": torch.cuda.get_device_name() if
                torch.cuda.is_available() else "cpu", "world_size": self.world,
                "mixed_precision": self.acc.mixed_precision, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "num_samples": self.data.info.num_samples,
                "recipe": self.data.recipe_name})
        self.acc.init_trackers("pretrain", config={k: v for k, v in _flat(cfg.to_dict()).items()
                                                   if isinstance(v, (int, float, str, bool))})

    # -- run directory and resume -------------------------------------------------------------
    def _prepare_run_dir(self):
        r = self.cfg.run
        if self.acc.is_main_process:
            if r.overwrite and self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            exists = self.run_dir.exists() and any(self.run_dir.iterdir())
            if exists and not r.resume:
                raise FileExistsError(f"{self.run_dir} is not empty: pass --resume to continue it or "
                                      "--overwrite to start over")
            if r.resume and ckpt.latest_checkpoint(self.run_dir) is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir}/checkpoints")
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()

    def _resume(self):
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir}/checkpoints")
        state, rank_state = ckpt.load_checkpoint(path)
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"{path}: total_steps {state['total_steps']} != {self.total_steps}; resume needs "
                             "the same epochs, batch size and data")
        self.acc.unwrap_model(self.model).load_state_dict(state["model"], strict=True)
        self.opt.load_state_dict(state["optimizer"])
        saved = state.get("extra_optimizers", {})
        if saved.keys() != self.extra_opts.keys():
            raise ValueError(f"{path} holds optimizers {sorted(saved)}, this run has {sorted(self.extra_opts)}; "
                             "resume with the same method and --online-probe setting")
        for name, o in self.extra_opts.items():
            o.load_state_dict(saved[name])
        if self.acc.scaler is not None and state.get("scaler") is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.state = State(step=state["step"], nan_skips=state["nan_skips"], history=state["history"],
                           probe=state.get("probe", [0, 0]))
        self.loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        self.metrics.truncate_after(self.state.step)
        self.acc.print(f"resumed from {path} at step {self.state.step} (epoch {self.loader.epoch}, "
                       f"batch {self.loader.batch})")

    def save(self) -> Path:
        st = self.state
        self._check_finite()  # a checkpoint never holds parameters updated from a non-finite loss
        self._fold_probe()
        method = self.acc.unwrap_model(self.model)
        self._check_state_in_sync(method)
        state = {"model": method.state_dict(), "optimizer": self.opt.state_dict(),
                 "extra_optimizers": {k: o.state_dict() for k, o in self.extra_opts.items()},
                 "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                 "step": st.step, "nan_skips": st.nan_skips, "history": st.history, "probe": list(st.probe),
                 "total_steps": self.total_steps}
        rank_state = {"rng": ckpt.rng_state(), "loader": self.loader.state_dict()}
        self._saved_step = st.step
        return ckpt.save_checkpoint(self.run_dir, st.step, state, rank_state, self.cfg.run.keep_ckpts)

    def _check_state_in_sync(self, method) -> None:
        """Registered state (banks, queues, prototypes) must be identical on every rank: a checkpoint
        holds rank 0's copy only, so a drift would be silently lost; it fails here instead."""
        if self.world == 1:
            return
        digest = torch.tensor(list(bytes.fromhex(method.state_digest())), dtype=torch.uint8, device=self.device)
        digests = all_gather_nograd(digest).view(self.world, -1)
        if not bool((digests == digests[0]).all()):
            raise RuntimeError(f"step {self.state.step}: the method's registered state "
                               f"({', '.join(method.state_tensors())}) differs between ranks")

    # -- loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, st = self.cfg, self.state
        stop_at = min(cfg.run.max_steps or self.total_steps, self.total_steps)
        bar = progress(stop_at, st.step, cfg.run.progress and self.acc.is_main_process)
        unwrapped = self.acc.unwrap_model(self.model)
        self.model.train()
        global_batch = cfg.data.batch_size * self.world
        while st.step < stop_at and self.loader.epoch < cfg.run.epochs:
            epoch = self.loader.epoch
            if self.loader.batch == 0:
                self._epoch_start(epoch, unwrapped)
            it = iter(self.loader)
            t_prev, wait_s, logged_at = time.perf_counter(), 0.0, st.step
            while st.step < stop_at:
                t0 = time.perf_counter()
                batch = next(it, None)
                if batch is None:
                    break
                t_data = time.perf_counter() - t0
                loss = self._step(batch, unwrapped)
                t_now = time.perf_counter()
                wait_s += t_data
                st.step += 1
                bar.update(1)
                if st.step % cfg.run.log_every == 0 or st.step == 1:
                    # The only host reads of the step's results (loss, finiteness): between log steps
                    # the loop queues work ahead of the GPU. Rates are over the interval, so they
                    # measure the device's pace, not how fast the host enqueues.
                    self._check_finite()
                    n = st.step - logged_at
                    dt = max(t_now - t_prev, 1e-9)
                    row = {"kind": "train", "step": st.step, "epoch": epoch, "loss": self._loss_value(loss),
                           "lr": lr_at(self.lr, st.step - 1), "images_per_s": n * global_batch / dt,
                           "data_wait_pct": 100.0 * wait_s / dt}
                    t_prev, wait_s, logged_at = t_now, 0.0, st.step
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.3g}",
                                    img_s=f"{row['images_per_s']:.0f}", wait=f"{row['data_wait_pct']:.0f}%")
                    self.metrics.log(row)
                    self.acc.log({k: v for k, v in row.items() if k != "kind"}, step=st.step)
                if cfg.run.ckpt_every and st.step % cfg.run.ckpt_every == 0:
                    self.save()
            if self.loader.epoch == epoch and self.loader.batch == self.steps_per_epoch:
                next(it, None)  # stopped on the last batch: let the loader roll over to the next epoch
            if self.loader.batch == 0 and self.loader.epoch == epoch + 1:  # the epoch finished
                self._epoch_end(epoch)
        bar.close()
        self._check_finite()
        if getattr(self, "_saved_step", None) != st.step:  # stopped by --max-steps mid-epoch
            self.save()
        return st.history

    def _epoch_start(self, epoch: int, method) -> None:
        """The method's epoch-start hook, with a feature pass over the train split (eval recipe, every
        rank's shard gathered). Deterministic, so a resume at an epoch's start recomputes the same."""
        def features(module=None, normalize=True, gather=True):
            module = module or method.eval_backbone()
            return extract(module, self.data.eval_loader("train"), self.device, self.acc.autocast,
                           normalize=normalize, gather=gather)
        method.on_epoch_start(EpochContext(epoch=epoch, step=self.state.step, features=features,
                                           device=self.device))

    def _equal_batch(self, batch: Batch) -> Batch:
        """Trim every rank's batch to the smallest one. The loader skips corrupt members, so a rank's
        batch can come out shorter; gathers (SimCLR negatives, global BN, bank updates) need equal
        shapes on every rank, and a mismatch would fail or hang the collective. Every per-sample field
        of the Batch is trimmed alike. Deterministic, so an exact resume still reproduces it."""
        if self.world == 1:
            return batch
        m = min(all_gather_host_ints(len(batch)))  # over gloo: no wait on the GPU's queue
        return batch.take(m)

    def _step(self, batch: Batch, unwrapped) -> torch.Tensor | None:
        """One optimizer step; returns the detached loss, on the device (None if skipped).

        Host syncs: with nan_policy 'skip' the loss must be read before the update (one sync per
        step, inherent to skipping). With 'stop' (the default) finiteness is tracked on the device
        and read at log steps, checkpoints and the end (`_check_finite`): the run stops there, naming
        the first bad step, and no checkpoint is written from parameters a non-finite loss touched.
        """
        st, cfg = self.state, self.cfg
        batch = self._equal_batch(batch).to(self.device, self.dtype)
        with self.acc.autocast():
            total, out = self.model(batch, st.step)
        loss = out.loss
        if cfg.run.nan_policy == "skip":
            bad = all_reduce_flag(not bool(torch.isfinite(total.detach()).item()), self.device)
            if bad:
                last = ckpt.latest_checkpoint(self.run_dir)
                msg = (f"non-finite loss ({loss.item()}) at step {st.step} (epoch {self.loader.epoch}, "
                       f"batch {self.loader.batch}); last good checkpoint: {last or 'none'}")
                if st.nan_skips >= cfg.run.max_nan_skips:
                    raise NonFiniteLoss(msg + f" (after {st.nan_skips} skipped steps)")
                st.nan_skips += 1
                self.acc.print(f"skipping: {msg} [{st.nan_skips}/{cfg.run.max_nan_skips}]")
                unwrapped.discard_deferred()
                self._zero_grad()
                return None
        else:
            self._track_finite(total.detach(), st.step)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.lr, st.step)
        for e in self.extras:
            for g in self.extra_opts[e.name].param_groups:
                g["lr"] = lr_at(e.lr, st.step)
        self.acc.backward(total)
        if cfg.optim.grad_clip:  # the main optimizer's parameters: the probe's gradient does not count
            self.acc.clip_grad_norm_(self.main_params, cfg.optim.grad_clip)
        self.opt.step()
        for o in self.extra_opts.values():
            o.step()
        self._zero_grad()
        unwrapped.after_step(st.step)
        unwrapped.run_deferred()
        if "probe_correct" in out.logs:  # counted on the device, folded into State at saves
            counts = torch.stack([out.logs["probe_correct"], out.logs["probe_count"]]).to(torch.int64)
            self._probe_counts = counts if self._probe_counts is None else self._probe_counts + counts
        return loss.detach()

    def _track_finite(self, total: torch.Tensor, step: int) -> None:
        """First step whose loss was not finite, kept on the device (-1: none)."""
        bad = torch.where(torch.isfinite(total), -1, step).to(torch.int64).reshape(1)
        if self._first_bad is None:
            self._first_bad = bad
        else:
            self._first_bad = torch.where(self._first_bad >= 0, self._first_bad, bad)
        self._bad_loss = total if self._bad_loss is None else torch.where(
            torch.isfinite(self._bad_loss), total, self._bad_loss)

    def _check_finite(self) -> None:
        """Raise NonFiniteLoss if any rank saw a non-finite loss since the start (nan_policy 'stop')."""
        if self._first_bad is None:
            return
        first = self._first_bad
        if self.world > 1:
            first = torch.where(first < 0, torch.iinfo(torch.int64).max, first)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
            first = torch.where(first == torch.iinfo(torch.int64).max, -1, first)
        step = int(first.item())
        if step < 0:
            return
        last = ckpt.latest_checkpoint(self.run_dir)
        raise NonFiniteLoss(f"non-finite loss ({float(self._bad_loss)}) at step {step}, found at step "
                            f"{self.state.step} (epoch {self.loader.epoch}); last good checkpoint: "
                            f"{last or 'none'}")

    def _fold_probe(self) -> None:
        if self._probe_counts is not None:
            c = self._probe_counts.tolist()
            self.state.probe = [self.state.probe[0] + c[0], self.state.probe[1] + c[1]]
            self._probe_counts = None

    def _loss_value(self, loss: torch.Tensor | None) -> float:
        if loss is None:
            return float("nan")
        return float(self.acc.reduce(loss.to(self.dtype or torch.float32), "mean").item())

    def _zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for o in self.extra_opts.values():
            o.zero_grad(set_to_none=True)

    def _epoch_end(self, epoch: int):
        cfg, st = self.cfg, self.state
        row = {"kind": "epoch", "step": st.step, "epoch": epoch}
        self._check_finite()
        self._fold_probe()
        if st.probe[1]:  # the probe's accuracy on this rank's training views over the epoch, all ranks
            c = all_reduce_sum(torch.tensor(st.probe, dtype=torch.float64, device=self.device))
            row["probe_train_top1"] = 100.0 * float(c[0]) / max(float(c[1]), 1.0)
        st.probe = [0, 0]
        if cfg.data.knn_every and (epoch + 1) % cfg.data.knn_every == 0:
            row.update(self.knn())
        monitors = {k: v for k, v in row.items() if k.startswith(("knn", "probe"))}
        self.acc.log(monitors, step=st.step)
        st.history[str(epoch)] = monitors
        self.metrics.log(row)
        self.save()
        if self.acc.is_main_process:
            write_report(self.run_dir)
        if monitors:
            self.acc.print("epoch %d: " % epoch + ", ".join(f"{k} {v:.2f}" for k, v in monitors.items()))

    def knn(self) -> dict:
        """kNN top-1 on val/ (or a held-out slice of train) with the current eval backbone, and the online
        probe's top-1 on the same queries (features as the probe trains on them: not normalised)."""
        d = self.cfg.data
        method = self.acc.unwrap_model(self.model)
        backbone = method.eval_backbone()
        f, y, i = extract(backbone, self.data.eval_loader("train"), self.device, self.acc.autocast, normalize=False)
        if self.data.has_split("val"):
            qf, qy, _ = extract(backbone, self.data.eval_loader("val"), self.device, self.acc.autocast,
                                normalize=False)
            bf, by = f, y
        else:
            bf, by, qf, qy = split_holdout(f, y, i, d.knn_holdout)
        out = knn_classify(F.normalize(bf, dim=1), by, F.normalize(qf, dim=1), qy, tuple(d.knn_k), d.knn_temperature)
        if method.probe is not None:
            with torch.no_grad():
                logits = method.probe(qf.to(method.probe.weight.dtype))
            out["probe_top1"] = 100.0 * float((logits.argmax(1) == qy).float().mean())
        return out

    def close(self):
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            export_backbone(self.acc.unwrap_model(self.model).eval_backbone(),
                            str(self.run_dir / "backbone.safetensors"), extra=self.data.export_meta())
            if (self.run_dir / "metrics.jsonl").exists():
                write_report(self.run_dir)
        self.data.close()
        self.acc.wait_for_everyone()
        self.acc.end_training()  # also destroys the process group


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


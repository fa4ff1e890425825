"""The training loop: build (accelerator, data, method, optimizer, schedules) -> train -> close.

One step: next batch -> forward (autocast) -> finite check on all ranks -> backward -> clip -> LR from
the per-step array -> optimizer step -> method.after_step (EMA / bank / queue) -> log -> checkpoint.
All randomness the loop consumes flows from checkpointed state: the pipeline's augmentations are a
pure function of (seed, epoch, index, view) and its position is in loader.state_dict(); torch /
numpy / python RNG states (negatives sampling) are saved per rank. On CPU, with deterministic
algorithms, a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .distributed import all_gather_nograd, all_reduce_flag
from .knn import extract, knn_classify, split_holdout
from .methods import get_method
from .models import export_backbone
from .observe import Metrics, progress, write_report, write_run_config
from .optim import build_optimizer, check_schedule, lr_at, lr_schedule, peak_lr
from pipeline.loaders.loader import FORMAT_BACKENDS
from pipeline.views.recipes import run_recipe

class NonFiniteLoss(RuntimeError):
    pass


@dataclass(kw_only=True)
class State:
    step: int = 0
    nan_skips: int = 0
    history: dict = field(default_factory=dict)


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
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.acc = _accelerator(cfg)
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.run_dir = Path(cfg.run.out)
        self._prepare_run_dir()
        if cfg.run.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        from pipeline import build_loader
        d = cfg.data
        if not d.data:
            raise ConfigError("--data is required (the converter's --out, holding train/)")
        method_cls = get_method(cfg.run.method)
        recipe = d.recipe or method_cls.recipe
        self.video = uses_clips(cfg, method_cls)
        try:
            spec = (clip_recipe(d, recipe) if self.video else
                    run_recipe(recipe, d.image_size, blur=d.blur, crop_min_scale=d.crop_min_scale))
        except ValueError as e:  # a recipe option the recipe cannot take (--crop-min-scale above its range)
            raise ConfigError(str(e)) from None
        if self.video:  # clips (B x C x T x H x W) from a video split: pipeline/loaders/clips.py
            from pipeline.loaders.clips import build_clip_loader
            self.loader = build_clip_loader(d.data, "train", spec, batch_size=d.batch_size, frames=d.frames,
                                            stride=d.stride, image_size=d.image_size, rank=self.rank,
                                            world_size=self.world, seed=cfg.run.seed, device=self.device.type,
                                            decoder=d.decoder, blur=d.blur)
            spec = self.loader.recipe
        else:
            self.loader = build_loader(d.data, "train", spec, FORMAT_BACKENDS[d.format], batch_size=d.batch_size,
                                       image_size=d.image_size, rank=self.rank, world_size=self.world,
                                       seed=cfg.run.seed, device=self.device.type)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{d.data}/train has fewer samples than one global batch "
                             f"({d.batch_size} x {self.world})")
        self.total_steps = cfg.run.epochs * self.steps_per_epoch
        n_data = self.loader.sampler.num_samples
        # Same seed on every rank: identical initial weights, banks and queues.
        torch.manual_seed(cfg.run.seed)
        self.method = method_cls(cfg, n_data, self.total_steps, [v.num_channels for v in spec.views])
        self.dtype = torch.float64 if cfg.run.mixed_precision == "fp64" else None
        if self.dtype is not None:
            self.method.to(self.dtype)
        self.lr = lr_schedule(cfg, self.steps_per_epoch, self.world)
        check_schedule(self.lr, self.total_steps, "lr")
        opt = build_optimizer(cfg, self.method, peak_lr(cfg, self.world))
        self.model, self.opt = self.acc.prepare(self.method, opt)
        # Per-rank streams from here on (memory-bank negatives differ between ranks).
        torch.manual_seed(cfg.run.seed * 1000 + self.rank + 1)
        np.random.seed((cfg.run.seed * 1000 + self.rank + 1) % 2**32)
        self.eval_recipe = method_cls.eval_recipe(recipe, d.eval_image_size or d.image_size)
        self.state = State()
        self.metrics = Metrics(self.run_dir, self.acc.is_main_process)
        if cfg.run.resume:
            self._resume()
        if self.acc.is_main_process:
            write_run_config(self.run_dir, cfg.to_dict(), {
                "device": str(self.device), "device_name": torch.cuda.get_device_name() if
                torch.cuda.is_available() else "cpu", "world_size": self.world,
                "mixed_precision": self.acc.mixed_precision, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "num_samples": n_data, "recipe": recipe})
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
        if self.acc.scaler is not None and state.get("scaler") is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.state = State(step=state["step"], nan_skips=state["nan_skips"], history=state["history"])
        self.loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        self.metrics.truncate_after(self.state.step)
        self.acc.print(f"resumed from {path} at step {self.state.step} (epoch {self.loader.epoch}, "
                       f"batch {self.loader.batch})")

    def save(self) -> Path:
        st = self.state
        state = {"model": self.acc.unwrap_model(self.model).state_dict(), "optimizer": self.opt.state_dict(),
                 "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                 "step": st.step, "nan_skips": st.nan_skips, "history": st.history,
                 "total_steps": self.total_steps}
        rank_state = {"rng": ckpt.rng_state(), "loader": self.loader.state_dict()}
        self._saved_step = st.step
        return ckpt.save_checkpoint(self.run_dir, st.step, state, rank_state, self.cfg.run.keep_ckpts)

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
            it = iter(self.loader)
            t_prev = time.perf_counter()
            while st.step < stop_at:
                t0 = time.perf_counter()
                batch = next(it, None)
                if batch is None:
                    break
                t_data = time.perf_counter() - t0
                loss = self._step(batch, unwrapped)
                t_now = time.perf_counter()
                dt = t_now - t_prev
                t_prev = t_now
                st.step += 1
                row = {"kind": "train", "step": st.step, "epoch": epoch, "loss": loss,
                       "lr": lr_at(self.lr, st.step - 1), "images_per_s": global_batch / max(dt, 1e-9),
                       "data_wait_pct": 100.0 * t_data / max(dt, 1e-9)}
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.3g}", img_s=f"{row['images_per_s']:.0f}",
                                wait=f"{row['data_wait_pct']:.0f}%")
                if st.step % cfg.run.log_every == 0 or st.step == 1:
                    self.metrics.log(row)
                    self.acc.log({k: v for k, v in row.items() if k != "kind"}, step=st.step)
                if cfg.run.ckpt_every and st.step % cfg.run.ckpt_every == 0:
                    self.save()
            if self.loader.epoch == epoch and self.loader.batch == self.steps_per_epoch:
                next(it, None)  # stopped on the last batch: let the loader roll over to the next epoch
            if self.loader.batch == 0 and self.loader.epoch == epoch + 1:  # the epoch finished
                self._epoch_end(epoch)
        bar.close()
        if getattr(self, "_saved_step", None) != st.step:  # stopped by --max-steps mid-epoch
            self.save()
        return st.history

    def _equal_batch(self, batch: dict) -> dict:
        """Trim every rank's batch to the smallest one. The loader skips corrupt members, so a rank's
        batch can come out shorter; gathers (SimCLR negatives, global BN, bank updates) need equal
        shapes on every rank, and a mismatch would fail or hang the collective. Deterministic, so an
        exact resume still reproduces it."""
        if self.world == 1:
            return batch
        n = len(batch["index"])
        m = int(all_gather_nograd(torch.tensor([n], device=self.device)).min().item())
        if m == n:
            return batch
        return {"views": [v[:m] for v in batch["views"]], "index": batch["index"][:m], "label": batch["label"][:m]}

    def _step(self, batch, unwrapped) -> float:
        st, cfg = self.state, self.cfg
        batch = self._equal_batch(batch)
        views = [v.to(self.device, dtype=self.dtype, non_blocking=True) for v in batch["views"]]
        index = batch["index"].to(self.device)
        with self.acc.autocast():
            loss, _ = self.model(views, index, st.step)
        bad = all_reduce_flag(not bool(torch.isfinite(loss.detach()).item()), self.device)
        if bad:
            last = ckpt.latest_checkpoint(self.run_dir)
            msg = (f"non-finite loss ({loss.item()}) at step {st.step} (epoch {self.loader.epoch}, batch "
                   f"{self.loader.batch}); last good checkpoint: {last or 'none'}")
            if cfg.run.nan_policy == "stop" or st.nan_skips >= cfg.run.max_nan_skips:
                raise NonFiniteLoss(msg + ("" if cfg.run.nan_policy == "stop" else
                                           f" (after {st.nan_skips} skipped steps)"))
            st.nan_skips += 1
            self.acc.print(f"skipping: {msg} [{st.nan_skips}/{cfg.run.max_nan_skips}]")
            unwrapped.discard_pending()
            self.opt.zero_grad(set_to_none=True)
            return float("nan")
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.lr, st.step)
        self.acc.backward(loss)
        if cfg.optim.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        unwrapped.after_step(st.step)
        return float(self.acc.reduce(loss.detach().to(self.dtype or torch.float32), "mean").item())

    def _epoch_end(self, epoch: int):
        cfg, st = self.cfg, self.state
        row = {"kind": "epoch", "step": st.step, "epoch": epoch}
        if cfg.data.knn_every and (epoch + 1) % cfg.data.knn_every == 0:
            row.update(self.knn())
            self.acc.log({k: v for k, v in row.items() if k.startswith("knn")}, step=st.step)
        st.history[str(epoch)] = {k: v for k, v in row.items() if k.startswith("knn")}
        self.metrics.log(row)
        self.save()
        if self.acc.is_main_process:
            write_report(self.run_dir)
        if row.keys() - {"kind", "step", "epoch"}:
            self.acc.print("epoch %d: " % epoch + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                            if k.startswith("knn")))

    def knn(self) -> dict:
        """kNN top-1 on val/ (or a held-out slice of train) with the current eval backbone."""
        d = self.cfg.data
        backbone = self.acc.unwrap_model(self.model).eval_backbone()
        f, y, i = extract(backbone, self._eval_loader("train"), self.device, self.acc.autocast)
        if (Path(d.data) / "val").is_dir():
            qf, qy, _ = extract(backbone, self._eval_loader("val"), self.device, self.acc.autocast)
            bf, by = f, y
        else:
            bf, by, qf, qy = split_holdout(f, y, i, d.knn_holdout)
        return knn_classify(bf, by, qf, qy, tuple(d.knn_k), d.knn_temperature)

    def _eval_loader(self, split: str):
        from pipeline import build_loader
        d = self.cfg.data
        if not hasattr(self, "_eval_loaders"):
            self._eval_loaders = {}
        if split not in self._eval_loaders and self.video:
            from pipeline.loaders.clips import build_clip_loader
            self._eval_loaders[split] = build_clip_loader(
                d.data, split, self.eval_recipe, batch_size=d.batch_size, frames=d.frames, stride=d.stride,
                image_size=d.eval_image_size or d.image_size, rank=self.rank, world_size=self.world,
                seed=self.cfg.run.seed, device=self.device.type, decoder=d.decoder, mode="eval")
        if split not in self._eval_loaders:
            self._eval_loaders[split] = build_loader(
                d.data, split, self.eval_recipe, FORMAT_BACKENDS[d.format], batch_size=d.batch_size,
                image_size=d.eval_image_size or d.image_size, rank=self.rank, world_size=self.world,
                seed=self.cfg.run.seed, device=self.device.type, mode="eval")
        loader = self._eval_loaders[split]
        loader.set_epoch(0)
        return loader

    def close(self):
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            extra = {"recipe": self.cfg.data.recipe or get_method(self.cfg.run.method).recipe,
                     "image_size": str(self.cfg.data.eval_image_size or self.cfg.data.image_size)}
            if self.video:
                extra.update(frames=str(self.cfg.data.frames), stride=str(self.cfg.data.stride))
            export_backbone(self.acc.unwrap_model(self.model).eval_backbone(), str(self.run_dir / "backbone.safetensors"),
                            extra=extra)
            if (self.run_dir / "metrics.jsonl").exists():
                write_report(self.run_dir)
        for ld in [self.loader, *getattr(self, "_eval_loaders", {}).values()]:
            ld.close()
        self.acc.wait_for_everyone()
        self.acc.end_training()  # also destroys the process group


def uses_clips(cfg: Config, method_cls) -> bool:
    """True when the run trains on clips: the method needs them (`clips = True`, e.g. cvrl) or the data's
    manifest says "kind": "video". A video arch on image data (or the reverse) fails here, naming both."""
    from pipeline.format.layout import manifest_kind
    from .config import VIDEO_ARCHS
    d, arch = cfg.data, cfg.model.arch
    try:
        kind = manifest_kind(Path(d.data) / "train")
    except (OSError, ValueError):
        kind = None  # no readable manifest: the loader reports it
    video = kind == "video" or bool(getattr(method_cls, "clips", False))
    if video and kind not in ("video", None):
        raise ConfigError(f"method {cfg.run.method!r} trains on clips but {d.data}/train is a {kind!r} split; "
                          "convert videos with tools/convert_video.py")
    if video and arch not in VIDEO_ARCHS:
        raise ConfigError(f"invalid value for 'arch': {arch!r} on video data; choose from {', '.join(VIDEO_ARCHS)}")
    if not video and arch in VIDEO_ARCHS:
        raise ConfigError(f"invalid value for 'arch': {arch!r} is a video backbone but {d.data}/train holds images")
    return video


def clip_recipe(d, recipe: str):
    """The clip recipe `recipe` at the run's frames / stride / size / blur / --crop-min-scale."""
    from pipeline.loaders.clips import get_clip_recipe
    return get_clip_recipe(recipe, d.image_size, d.frames, d.stride, d.blur, d.crop_min_scale)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


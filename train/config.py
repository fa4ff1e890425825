"""Typed, nested run configuration; the CLI and the config file are generated from these dataclasses.

Every field has a unique name across sections, so the command line and a config file (YAML or JSON)
use the same flat keys: `--batch-size 64` on the CLI, `batch_size: 64` (or `batch-size: 64`) in
`run.yaml`. A config file may also be nested by section (`optim: {lr: 0.1}`). Precedence: dataclass
defaults < method defaults (temperature, lr, ...) < config file < command line. Unknown keys and
invalid values raise `ConfigError` naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from train.models.registry import known_backbones
from train.models.video import VIDEO_ARCHS

ARCHS = known_backbones()  # the backbone registry names the archs


class ConfigError(ValueError):
    """An unknown key or an invalid value in the run configuration."""


def opt(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with its CLI help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(kw_only=True, slots=True)
class RunConfig:
    method: str = opt("simclr", "self-supervised method (see train/methods/)")
    out: str = opt("runs/run", "run directory (checkpoints, metrics.jsonl, config.json, report.png)")
    seed: int = opt(0, "global seed; every random stream of the run derives from it")
    epochs: int = opt(10, "training epochs")
    max_steps: int = opt(0, "stop after this many optimizer steps in total (0: run all epochs); the "
                            "schedules still span all epochs, so a longer run resumes exactly")
    resume: bool = opt(False, "continue from the latest checkpoint in --out (fails if there is none)")
    overwrite: bool = opt(False, "delete an existing --out first (otherwise a non-empty --out without "
                                 "--resume is an error)")
    ckpt_every: int = opt(0, "also checkpoint every N optimizer steps (0: only at epoch ends)")
    keep_ckpts: int = opt(2, "checkpoints kept in --out/checkpoints (the newest ones)")
    log_every: int = opt(10, "write a metrics.jsonl row every N steps")
    mixed_precision: Literal["auto", "no", "bf16", "fp64"] = opt(
        "auto", "'auto': bf16 on CUDA, full precision on CPU; 'fp64': float64 weights, inputs and losses "
                "(for numerical regression tests: a float64 run agrees across CPUs and BLAS code paths)")
    deterministic: bool = opt(True, "torch.use_deterministic_algorithms (CPU runs are bit-exact on resume)")
    nan_policy: Literal["stop", "skip"] = opt(
        "stop", "non-finite loss: 'stop' (names the step and the last checkpoint) or 'skip' the step")
    max_nan_skips: int = opt(10, "with --nan-policy skip, stop after this many skipped steps")
    progress: bool = opt(True, "show a progress bar on the main process")
    online_probe: bool = opt(True, "train a linear classifier on the detached features as the run goes and "
                                   "report its accuracy each epoch beside the kNN monitor (needs labels)")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    data: str = opt("", "converted dataset root (the converter's --out, holding train/ and optionally val/)")
    format: Literal["wds", "ffcv"] = opt("wds", "'wds' (DALI over WebDataset shards) or 'ffcv' (.beton)")
    batch_size: int = opt(256, "batch size per process")
    image_size: int = opt(224, "training crop size")
    recipe: str = opt("", "view recipe (pipeline/views/recipes.py); empty: the method's own")
    blur: bool = opt(True, "keep the recipe's Gaussian blur (SimCLR drops it for CIFAR-size images)")
    crop_min_scale: float = opt(0.0, "lower bound of every random-resized crop's area fraction, in (0, 1] "
                                     "(0: the recipe's own, e.g. simclr 0.08; small datasets use larger, e.g. 0.2-0.3); "
                                     "image and clip recipes")
    knn_every: int = opt(1, "kNN monitor every N epochs (0: never)")
    knn_k: list = opt([20, 200], "neighbour counts of the kNN monitor")
    knn_temperature: float = opt(0.07, "temperature of the kNN vote weights exp(sim / T)")
    knn_holdout: int = opt(10, "without val/: every N-th train sample (by global index) is the kNN query set")
    eval_image_size: int = opt(0, "center crop for kNN / linear eval (0: --image-size)")
    frames: int = opt(8, "video data: frames per clip (T)")
    stride: int = opt(2, "video data: step between the frames of a clip (in source frames)")
    decoder: Literal["pyav", "dali"] = opt(
        "pyav", "video data: frame decoder; 'dali' falls back to PyAV where DALI cannot decode (H.264 on CPU)")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    arch: str = opt("resnet18", "backbone: resnet18, resnet34, resnet50 (torchvision parameter names), vit_tiny, "
                                "vit_small (timm's); video: r3d18, r2plus1d18")
    patch_size: int = opt(0, "ViT patch size (0: 16; 4 or 8 for CIFAR-size images)")
    width: int = opt(64, "width of the first stage (64: standard; CMC halves it per view)")
    cifar_stem: bool = opt(False, "3x3 stride-1 stem without max-pool, for small images")
    sync_bn: bool = opt(False, "batch norm statistics over the global batch (all processes)")
    proj_hidden: int = opt(2048, "hidden width of the projection MLP")
    proj_dim: int = opt(128, "embedding dimension (output of the projection head)")
    pred_hidden: int = opt(4096, "hidden width of BYOL's predictor")
    aux: Literal["none", "augself"] = opt(
        "none", "auxiliary objective added to the method's loss: 'augself' predicts the difference of the two "
                "views' augmentation parameters (crop, colour jitter, flip) from their backbone features")
    aux_weight: float = opt(1.0, "weight of the auxiliary loss (--aux)")
    aux_hidden: int = opt(512, "hidden width of the auxiliary predictors (--aux)")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    optimizer: Literal["sgd", "adamw", "lars"] = opt("sgd", "optimizer")
    lr: float = opt(0.0, "peak learning rate for a global batch of 256, scaled linearly with the "
                         "global batch (0: the method's default)")
    weight_decay: float = opt(-1.0, "weight decay (negative: the method's default)")
    sgd_momentum: float = opt(0.9, "SGD / LARS momentum")
    warmup_epochs: float = opt(-1.0, "linear warm-up length in epochs (negative: the method's default)")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak (cosine decay)")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this (0: no clipping)")
    probe_lr: float = opt(1e-3, "learning rate of the online linear probe (AdamW, constant)")


@dataclass(kw_only=True)
class MethodConfig:
    """Base of each method's own typed keys (declared as a dataclass in the method's file, `Method.Config`).

    A field's metadata may carry `check=(predicate, "what is allowed")`; every such check runs when the
    config is built, so a value out of range fails naming the key. The base itself has no keys."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None and not check[0](getattr(self, f.name)):
                raise ConfigError(f"invalid value for {f.name!r}: {getattr(self, f.name)!r}; must be {check[1]}")


# Keys several methods share, with one help text and one range each (the default is the method's).
def temperature_key(default: float) -> Any:
    return opt(default, "contrastive temperature", check=(lambda v: 0 < v <= 100, "in (0, 100]"))


def temperature_final_key() -> Any:
    return opt(0.0, "cosine-anneal the temperature to this (0: constant)",
               check=(lambda v: 0 <= v <= 100, "in (0, 100] (0: constant)"))


def ema_key(default: float) -> Any:
    return opt(default, "momentum-encoder / target EMA at step 0", check=(lambda v: 0 < v < 1, "in (0, 1)"))


def ema_final_key(default: float = 0.0) -> Any:
    return opt(default, "EMA at the last step, cosine schedule (0: same as --ema)",
               check=(lambda v: 0 <= v <= 1, "in [0, 1] (0: same as --ema)"))


def positive_int_key(default: int, help: str) -> Any:  # noqa: A002 - mirrors argparse
    return opt(default, help, check=(lambda v: v >= 1, ">= 1"))


def fraction_key(default: float, help: str) -> Any:  # noqa: A002
    return opt(default, help, check=(lambda v: 0 <= v < 1, "in [0, 1)"))


@dataclass(kw_only=True)
class RingNegatives(MethodConfig):
    """Wu et al.'s restricted negatives (kernels.ring_nce), for the methods that score a pool of
    candidates: "all" (the method's own loss, numerics unchanged), "ball" (the ring_upper fraction of
    the candidates most similar to each query), "ring" (ranks from ring_lower to ring_upper). Defaults
    from the reference code: inner 1 %, outer 10 %."""
    negatives: Literal["all", "ball", "ring"] = opt("all", "negatives: all candidates, the ball of the most "
                                                           "similar ones, or the ring (ranks ring_lower..ring_upper)")
    ring_lower: float = opt(0.01, "ring: inner fraction of the candidates left out (the most similar)",
                            check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    ring_upper: float = opt(0.1, "ball / ring: outer fraction of the candidates kept",
                            check=(lambda v: 0 < v <= 1, "in (0, 1]"))
    ring_samples: int = opt(0, "ball / ring over a bank or queue: score this many negatives drawn uniformly from "
                               "each query's window (0: every member; IR-Ring's reference draws 4095)",
                            check=(lambda v: v >= 0, ">= 0"))
    ring_anneal_epochs: float = opt(0.0, "ball / ring: anneal the outer fraction linearly from --ring-upper-start "
                                         "to --ring-upper over this many epochs (0: no annealing)",
                                    check=(lambda v: v >= 0, ">= 0"))
    ring_upper_start: float = opt(1.0, "ball / ring: outer fraction at epoch 0 when annealing",
                                  check=(lambda v: 0 < v <= 1, "in (0, 1]"))

    def __post_init__(self):
        super().__post_init__()
        if self.negatives == "ring" and not self.ring_lower < self.ring_upper:
            raise ConfigError(f"ring_lower ({self.ring_lower}) must be below ring_upper ({self.ring_upper})")
        if self.ring_anneal_epochs and self.ring_upper_start < self.ring_upper:
            raise ConfigError(f"ring_upper_start ({self.ring_upper_start}) must be >= ring_upper "
                              f"({self.ring_upper}): the window narrows as it anneals")

    def window(self, epoch: float = float("inf")) -> tuple[float, float] | None:
        """(lower, upper) rank fractions for kernels.ring_nce at `epoch` (fractional: the annealed
        outer fraction); None for all negatives."""
        if self.negatives == "all":
            return None
        upper = self.ring_upper
        if self.ring_anneal_epochs and epoch < self.ring_anneal_epochs:
            upper = self.ring_upper_start + (self.ring_upper - self.ring_upper_start) * epoch / self.ring_anneal_epochs
        return (0.0 if self.negatives == "ball" else self.ring_lower), upper


@dataclass(kw_only=True, slots=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    """The chosen method's own keys: an instance of its `Method.Config` (train/methods/<name>.py)."""

    def __post_init__(self):
        r, d, m, o = self.run, self.data, self.model, self.optim
        checks = [
            (r.epochs >= 1, "epochs", "must be >= 1"),
            (r.max_steps >= 0, "max_steps", "must be >= 0"),
            (r.ckpt_every >= 0, "ckpt_every", "must be >= 0"),
            (r.keep_ckpts >= 1, "keep_ckpts", "must be >= 1"),
            (r.log_every >= 1, "log_every", "must be >= 1"),
            (not (r.resume and r.overwrite), "resume", "cannot be combined with --overwrite"),
            (d.batch_size >= 2, "batch_size", "must be >= 2"),
            (d.image_size >= 8, "image_size", "must be >= 8"),
            (d.knn_every >= 0, "knn_every", "must be >= 0"),
            (0 <= d.crop_min_scale <= 1, "crop_min_scale", "must be in (0, 1] (0: the recipe's own)"),
            (all(isinstance(k, int) and k >= 1 for k in d.knn_k), "knn_k", "must be positive ints"),
            (d.knn_temperature > 0, "knn_temperature", "must be > 0"),
            (d.knn_holdout >= 2, "knn_holdout", "must be >= 2"),
            (m.width >= 4, "width", "must be >= 4"),
            (m.arch in ARCHS, "arch", f"choose from {', '.join(ARCHS)}"),
            (m.patch_size >= 0 and (m.patch_size == 0 or m.arch.startswith("vit")), "patch_size",
             "must be >= 0 and is for ViT archs only"),
            (not (m.cifar_stem and m.arch.startswith("vit")), "cifar_stem",
             "is for ResNets; a ViT on small images takes --patch-size 4 or 8"),
            (d.frames >= 1, "frames", "must be >= 1"),
            (d.stride >= 1, "stride", "must be >= 1"),
            (m.proj_dim >= 2 and m.proj_hidden >= 2 and m.pred_hidden >= 2, "proj_dim",
             "head widths must be >= 2"),
            (0 < m.aux_weight <= 100, "aux_weight", "must be in (0, 100]"),
            (m.aux_hidden >= 2, "aux_hidden", "must be >= 2"),
            (0 <= o.lr <= 100, "lr", "must be in (0, 100] (a peak rate for a global batch of 256; 0: the "
                                    "method's default)"),
            (o.weight_decay < 1, "weight_decay", "must be in [0, 1) (negative: the method's default)"),
            (0 <= o.sgd_momentum < 1, "sgd_momentum", "must be in [0, 1)"),
            (0 <= o.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (o.grad_clip >= 0, "grad_clip", "must be >= 0"),
            (0 < o.probe_lr <= 10, "probe_lr", "must be in (0, 10]"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"invalid value for {key!r}: {msg}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("run", "data", "model", "optim", "method")


def _section_classes(method_config: type | None) -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {sec: (method_config or MethodConfig) if sec == "method" else hints[sec] for sec in SECTIONS}


def _fields(method_config: type | None = None) -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Flat key -> (section, field, type) for every leaf field; the `method` section is the chosen
    method's own Config class (none: no method keys)."""
    out = {}
    for sec, cls in _section_classes(method_config).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in out:
                raise TypeError(f"config key {f.name!r} of {cls.__name__} is also a {out[f.name][0]} key")
            out[f.name] = (sec, f, hints[f.name])
    return out


def _coerce(key: str, hint, value):
    """Check and convert `value` (from YAML/JSON or a CLI string) to the field's type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"invalid value for {key!r}: {value!r}; choose from {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"invalid value for {key!r}: {value!r} is not a boolean")
    if hint in (list,) or origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"invalid value for {key!r}: {value!r} is not a list")
        try:
            return [int(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value for {key!r}: {value!r} is not a list of ints") from None
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"invalid value for {key!r}: {value!r} is not an int")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value for {key!r}: {value!r} is not an int") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"invalid value for {key!r}: {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value for {key!r}: {value!r} is not a number") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"invalid value for {key!r}: {value!r} is not a string")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _flatten_file(d: dict, path: str) -> dict:
    """Accept flat keys or {section: {key: value}}; dashes and underscores are equivalent."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    flat = {}
    for k, v in d.items():
        k = str(k).replace("-", "_")
        if k in SECTIONS and isinstance(v, dict):
            for k2, v2 in v.items():
                flat[str(k2).replace("-", "_")] = v2
        else:
            flat[k] = v
    return flat


def load_file(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    return _flatten_file(data, str(path))


# Keys that only mean something for one kind of data: set explicitly for the other kind, they fail.
MODALITY_KEYS = {"frames": "video", "stride": "video", "decoder": "video", "format": "image",
                 "cifar_stem": "image"}


def build(values: dict, method=None, catalog=()) -> Config:
    """A Config from flat key/value pairs (config file and flags). `method`: the chosen method's class
    (train/methods; its `defaults` for common keys go under `values`, its `Config` is the method
    section); `catalog`: every method class, so that another method's key is named as such. Fails on
    an unknown key, a key of another method, a key that does not apply to the data's kind (video or
    images, read from DATA/train's manifest), an out-of-range value, and a placeholder (lr 0, negative
    weight decay or warm-up) the method's defaults did not resolve."""
    method_config = getattr(method, "Config", None)
    fields = _fields(method_config)
    name = values.get("method", RunConfig().method)
    if method is not None and getattr(method, "name", name) != name:
        raise ConfigError(f"method {name!r} was given the config of {method.name!r}")
    others = {k: c.name for c in catalog for k in _method_keys(c) if k not in fields}
    stray = sorted(k for k in values if k not in fields and k in others)
    if stray:
        uses = ", ".join(sorted(_method_keys(method))) if method is not None else ""
        raise ConfigError(f"{', '.join(repr(k) for k in stray)} does not apply to method {name!r} (it uses: "
                          f"{uses or 'no method keys'})")
    unknown = sorted(k for k in values if k not in fields)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    merged = dict(getattr(method, "defaults", {}))
    bad_defaults = sorted(k for k in merged if k not in fields or fields[k][0] == "method")
    if bad_defaults:
        raise TypeError(f"{name}: defaults {bad_defaults} are not common keys (method keys have their "
                        "defaults in the method's Config)")
    merged.update(values)
    sections: dict[str, dict] = {s: {} for s in SECTIONS}
    for k, v in merged.items():
        sec, _, hint = fields[k]
        sections[sec][k] = _coerce(k, hint, v)
    classes = _section_classes(method_config)
    cfg = Config(**{s: classes[s](**sections[s]) for s in SECTIONS})
    if method is not None:
        _check_resolved(cfg)
        _check_modality(cfg, values, bool(getattr(method, "clips", False)))
    return cfg


def _method_keys(method) -> list[str]:
    cls = getattr(method, "Config", None)
    return [f.name for f in dataclasses.fields(cls)] if cls is not None else []


def _check_resolved(cfg: Config) -> None:
    """Every placeholder default of a common key must have been replaced by the method's defaults, the
    config file or the command line (the method's own keys have real defaults in its Config)."""
    o, name = cfg.optim, cfg.run.method
    unresolved = [
        (o.lr > 0, "lr", "--lr (> 0, the peak rate for a global batch of 256)"),
        (o.weight_decay >= 0, "weight_decay", "--weight-decay (in [0, 1))"),
        (o.warmup_epochs >= 0, "warmup_epochs", "--warmup-epochs (>= 0)"),
    ]
    for ok, key, what in unresolved:
        if not ok:
            raise ConfigError(f"invalid value for {key!r}: method {name!r} has no default and none was given; "
                              f"pass {what}")


def data_kind(data: str) -> str | None:
    """'video' or 'image' from DATA/train's manifest; None when there is no readable manifest (the
    loader then reports it)."""
    if not data:
        return None
    from pipeline.format.layout import manifest_kind
    try:
        kind = manifest_kind(Path(data) / "train")
    except (OSError, ValueError):
        return None
    return "video" if kind == "video" else "image"


def _check_modality(cfg: Config, values: dict, clips: bool) -> None:
    """A video method, or video data, trains on clips: image-only keys set explicitly fail, and the
    reverse; the backbone must match the data."""
    d, arch, name = cfg.data, cfg.model.arch, cfg.run.method
    kind = data_kind(d.data)
    if clips and kind == "image":
        raise ConfigError(f"method {name!r} trains on clips but {d.data}/train holds images; convert videos with "
                          "tools/convert_video.py")
    kind = "video" if clips else kind
    if kind is None:
        return
    wrong = sorted(k for k in values if MODALITY_KEYS.get(k, kind) != kind)
    if wrong:
        raise ConfigError(f"{', '.join(repr(k) for k in wrong)} does not apply to {kind} data"
                          + (f" ({d.data}/train)" if d.data else f" (method {name!r} trains on clips)"))
    if kind == "video" and arch not in VIDEO_ARCHS:
        raise ConfigError(f"invalid value for 'arch': {arch!r} on video data; choose from {', '.join(VIDEO_ARCHS)}")
    if kind == "image" and arch in VIDEO_ARCHS:
        raise ConfigError(f"invalid value for 'arch': {arch!r} is a video backbone but {d.data}/train holds images")


def from_dict(d: dict, method=None, catalog=()) -> Config:
    """Inverse of Config.to_dict (nested), used to reload RUN_DIR/config.json (`method`: its class)."""
    flat = {}
    for sec in SECTIONS:
        flat.update(d.get(sec, {}))
    return build(flat, method, catalog)


def make_parser(description: str = "", method=None, catalog=()) -> argparse.ArgumentParser:
    """The CLI of a chosen `method` class: the common keys, with the method's defaults shown, and the
    method's own keys. Other methods' keys stay accepted (hidden), so that build() names them."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML/JSON file with the same keys as these flags")
    groups: dict[str, argparse._ArgumentGroup] = {}
    fields = _fields(getattr(method, "Config", None))
    defaults = getattr(method, "defaults", {})
    mname = getattr(method, "name", None)
    hidden = {}
    for c in catalog:
        for name, (sec, f, hint) in _fields(c.Config).items():
            if sec == "method" and name not in fields:
                hidden.setdefault(name, (sec, f, hint))
    for name, (sec, f, hint) in [*fields.items(), *hidden.items()]:
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if name in defaults:
            default = f"{defaults[name]} ({mname}'s)"
        helptext = argparse.SUPPRESS if name in hidden else f"{f.metadata.get('help', '')} (default: {default})"
        title = f"method ({mname})" if sec == "method" and mname else sec
        group = groups.get(sec) or groups.setdefault(sec, p.add_argument_group(title))
        if hint is bool:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, nargs="?", const=True,
                               metavar="BOOL", help=helptext)
        elif typing.get_origin(hint) is Literal and name not in hidden:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS,
                               choices=list(typing.get_args(hint)), help=helptext)
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=helptext)
    return p


def parse(argv: list[str] | None = None, lookup=None, catalog=(), description: str = "") -> Config:
    """CLI + optional --config file -> Config. `lookup(name)` returns the method class (and fails
    listing the known ones); `catalog` lists every method class (see build)."""
    # The method first (flag over file), so that --help can show that method's keys and defaults.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    file_values = load_file(known.config) if known.config else {}
    name = str(known.method or file_values.get("method", RunConfig().method))
    try:
        method = lookup(name) if lookup else None
    except KeyError as e:
        raise ConfigError(str(e).strip("'\"")) from None
    args = vars(make_parser(description, method, catalog).parse_args(argv))
    args.pop("config")
    values = dict(file_values)
    values.update(args)
    # Flags arrive as strings; file values are typed; _coerce handles both.
    return build(values, method, catalog)

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


ARCHS = ("resnet18", "resnet34", "resnet50", "r3d18", "r2plus1d18")
VIDEO_ARCHS = ("r3d18", "r2plus1d18")


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
    arch: str = opt("resnet18", "backbone: resnet18, resnet34, resnet50; video: r3d18, r2plus1d18 (torchvision "
                                "parameter names)")
    width: int = opt(64, "width of the first stage (64: standard; CMC halves it per view)")
    cifar_stem: bool = opt(False, "3x3 stride-1 stem without max-pool, for small images")
    sync_bn: bool = opt(False, "batch norm statistics over the global batch (all processes)")
    proj_hidden: int = opt(2048, "hidden width of the projection MLP")
    proj_dim: int = opt(128, "embedding dimension (output of the projection head)")
    pred_hidden: int = opt(4096, "hidden width of BYOL's predictor")


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


@dataclass(kw_only=True, slots=True)
class MethodConfig:
    temperature: float = opt(0.0, "contrastive temperature (0: the method's default)")
    temperature_final: float = opt(0.0, "cosine-anneal the temperature to this (0: constant)")
    ema: float = opt(0.0, "momentum-encoder / target EMA at step 0 (0: the method's default)")
    ema_final: float = opt(0.0, "EMA at the last step, cosine schedule (0: same as --ema)")
    queue_size: int = opt(0, "MoCo queue length (0: the method's default); any size: writes wrap round the ring")
    nce_k: int = opt(0, "negatives drawn from the memory bank per sample (0: the method's default)")
    nce_mode: Literal["softmax", "nce"] = opt("softmax", "memory-bank loss: softmax (InfoNCE) or CMC's NCE")
    bank_momentum: float = opt(0.5, "memory-bank update momentum")
    cmc_negatives: Literal["bank", "batch"] = opt("bank", "CMC negatives: memory bank or in-batch")
    cmc_objective: Literal["core", "full"] = opt(
        "full", "CMC with > 2 views: 'core' (view 0 against each other) or 'full' (all pairs)")


@dataclass(kw_only=True, slots=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self):
        r, d, m, o, me = self.run, self.data, self.model, self.optim, self.method
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
            (d.frames >= 1, "frames", "must be >= 1"),
            (d.stride >= 1, "stride", "must be >= 1"),
            (m.proj_dim >= 2 and m.proj_hidden >= 2 and m.pred_hidden >= 2, "proj_dim",
             "head widths must be >= 2"),
            (0 <= o.lr <= 100, "lr", "must be in (0, 100] (a peak rate for a global batch of 256; 0: the "
                                    "method's default)"),
            (o.weight_decay < 1, "weight_decay", "must be in [0, 1) (negative: the method's default)"),
            (0 <= o.sgd_momentum < 1, "sgd_momentum", "must be in [0, 1)"),
            (0 <= o.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (o.grad_clip >= 0, "grad_clip", "must be >= 0"),
            (0 <= me.temperature <= 100 and 0 <= me.temperature_final <= 100, "temperature",
             "must be in (0, 100] (0: the method's default)"),
            (0 <= me.ema < 1 and 0 <= me.ema_final <= 1, "ema", "must be in [0, 1)"),
            (me.queue_size >= 0 and me.nce_k >= 0, "queue_size", "must be >= 0"),
            (0 <= me.bank_momentum < 1, "bank_momentum", "must be in [0, 1)"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"invalid value for {key!r}: {msg}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("run", "data", "model", "optim", "method")


def _fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat key -> (section, field) for every leaf field."""
    out = {}
    hints = typing.get_type_hints(Config)
    for sec in SECTIONS:
        cls = hints[sec]
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"duplicate config key {f.name}"
            out[f.name] = (sec, f)
    return out


def _hint(section: str, name: str):
    cls = typing.get_type_hints(Config)[section]
    return typing.get_type_hints(cls)[name]


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


def build(values: dict, defaults: dict | None = None, reads: frozenset | None = None) -> Config:
    """A Config from flat key/value pairs over optional flat `defaults`. Unknown keys fail. With `reads`
    (the `method` section keys the chosen method uses): a `method` key in `values` the method does not
    use fails, and so does a placeholder (lr 0, negative weight decay or warm-up, temperature / EMA /
    queue / negatives 0) left unresolved after the method's defaults merge."""
    fields = _fields()
    if reads is not None:
        method = values.get("method", RunConfig().method)
        stray = sorted(k for k in values if k in fields and fields[k][0] == "method" and k not in reads)
        if stray:
            raise ConfigError(f"{', '.join(repr(k) for k in stray)} does not apply to method {method!r} (it uses: "
                              f"{', '.join(sorted(reads)) or 'no method keys'})")
    sections: dict[str, dict] = {s: {} for s in SECTIONS}
    merged = dict(defaults or {})
    merged.update(values)
    unknown = sorted(k for k in merged if k not in fields)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    for k, v in merged.items():
        sec, _ = fields[k]
        sections[sec][k] = _coerce(k, _hint(sec, k), v)
    hints = typing.get_type_hints(Config)
    cfg = Config(**{s: hints[s](**sections[s]) for s in SECTIONS})
    if reads is not None:
        _check_resolved(cfg, reads)
    return cfg


def _check_resolved(cfg: Config, reads: frozenset) -> None:
    """Every placeholder default the method relies on must have been replaced by its defaults, the
    config file or the command line."""
    o, me, name = cfg.optim, cfg.method, cfg.run.method
    unresolved = [
        (o.lr > 0, "lr", "--lr (> 0, the peak rate for a global batch of 256)"),
        (o.weight_decay >= 0, "weight_decay", "--weight-decay (in [0, 1))"),
        (o.warmup_epochs >= 0, "warmup_epochs", "--warmup-epochs (>= 0)"),
        ("temperature" not in reads or me.temperature > 0, "temperature", "--temperature (in (0, 100])"),
        ("ema" not in reads or 0 < me.ema < 1, "ema", "--ema (in (0, 1))"),
        ("queue_size" not in reads or me.queue_size >= 1, "queue_size", "--queue-size (>= 1)"),
        ("nce_k" not in reads or me.nce_k >= 1, "nce_k", "--nce-k (>= 1)"),
    ]
    for ok, key, what in unresolved:
        if not ok:
            raise ConfigError(f"invalid value for {key!r}: method {name!r} has no default and none was given; "
                              f"pass {what}")


def from_dict(d: dict) -> Config:
    """Inverse of Config.to_dict (nested), used to reload RUN_DIR/config.json."""
    flat = {}
    for sec in SECTIONS:
        flat.update(d.get(sec, {}))
    return build(flat)


def make_parser(description: str = "", method: str | None = None, defaults: dict | None = None,
                reads: frozenset | None = None) -> argparse.ArgumentParser:
    """The CLI. For a chosen `method`: its defaults are the ones shown, and `--help` lists the common keys
    and the method keys it `reads` only (the others stay accepted, so that build() names them)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML/JSON file with the same keys as these flags")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (sec, f) in _fields().items():
        hint = _hint(sec, name)
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if defaults and name in defaults:
            default = f"{defaults[name]} ({method}'s)"
        helptext = f"{f.metadata.get('help', '')} (default: {default})"
        if sec == "method" and reads is not None and name not in reads:
            helptext = argparse.SUPPRESS
        title = f"method ({method})" if sec == "method" and method else sec
        group = groups.get(sec) or groups.setdefault(sec, p.add_argument_group(title))
        if hint is bool:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, nargs="?", const=True,
                               metavar="BOOL", help=helptext)
        elif typing.get_origin(hint) is Literal:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS,
                               choices=list(typing.get_args(hint)), help=helptext)
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=helptext)
    return p


def parse(argv: list[str] | None = None, method_defaults=None, description: str = "",
          method_reads=None) -> Config:
    """CLI + optional --config file -> Config. `method_defaults(method_name) -> dict` supplies the
    chosen method's defaults, applied under the config file and the flags; `method_reads(method_name)`
    the `method` keys it uses (see build)."""
    # The method first (flag over file), so that --help can show that method's keys and defaults.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    file_values = load_file(known.config) if known.config else {}
    method = str(known.method or file_values.get("method", RunConfig().method))
    defaults = method_defaults(method) if method_defaults else {}
    reads = method_reads(method) if method_reads else None
    args = vars(make_parser(description, method, defaults, reads).parse_args(argv))
    args.pop("config")
    values = dict(file_values)
    values.update(args)
    # Flags arrive as strings; file values are typed; _coerce handles both.
    return build(values, defaults, reads)

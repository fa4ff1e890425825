# How a kernel call gets executed: backend selection ("auto" | "triton" | "torch"), running one
# @triton.jit body either compiled (CUDA, autotuned) or through the Triton interpreter (CPU tensors),
# and the row-chunk budget of the chunked torch paths.
#
# Why not just set TRITON_INTERPRET=1: triton 3.9 reads that knob when `@triton.jit` decorates a
# function (triton/runtime/jit.py: `if knobs.runtime.interpret: return InterpretedFunction(...)`),
# including triton.language's own jit-written helpers (tl.sum, tl.max, tl.zeros, ...), so a
# process-wide env var decides once, when triton is first imported (often by torch before us), for
# every tensor. Instead each kernel keeps its plain Python function and builds both forms lazily: a
# compiled JITFunction for CUDA tensors and an InterpretedFunction for CPU tensors. While an
# interpreted kernel runs, `JITFunction.__call__` (which in compiled mode only ever raises "Cannot
# call @triton.jit'd outside of the scope of a kernel") is pointed at the interpreter, so the
# library helpers run interpreted as they would under TRITON_INTERPRET=1. Compiled kernels never go
# through that method and every patch is undone after the launch, so they are unaffected. CPU-only
# machines thus run the real kernel code with no setup, CUDA machines compile for real, and
# TRITON_INTERPRET=1 forces the interpreter on CUDA tensors too (useful for debugging).
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction

BACKENDS = ("auto", "triton", "torch")

# Element budget of one (rows x columns) block of logits in the chunked torch paths: each chunk holds
# a few buffers of this many elements, so peak extra memory is O(CHUNK_ELEMS + (N + K) * d) whatever
# N and K are. 4M fp32 elements = 16 MiB per buffer. Tests patch this to tiny values.
CHUNK_ELEMS = 1 << 22

# The Triton kernels keep a whole feature row in registers (BLOCK_D = next_pow2(d)); past 256 they
# would spill, so larger d must use backend="torch" (said in the error rather than switched silently).
MAX_TRITON_DIM = 256


# Public entry points are opaque to torch.compile: dynamo would otherwise try to trace the chunk
# loops (unrolling them into huge graphs) or the interpreter plumbing. A compiled model around them
# simply breaks its graph at the loss, which is where the fused kernel takes over anyway.
opaque_to_compile = torch.compiler.disable


# Compile options passed on every CUDA launch. FMA contraction is triton 3.9's default, which 3.10
# flips; saying it keeps the numerics fixed across versions (and silences 3.9's warning about it).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """True when the call should run the Triton kernels (compiled on CUDA, interpreted on CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if backend == "auto":
        # INFOVIEW_KERNELS=torch|triton redirects every "auto" call (debugging on a GPU; on CPU,
        # running the kernels' CUDA-side host logic under the interpreter, as the sync tests do).
        backend = os.environ.get("INFOVIEW_KERNELS", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"INFOVIEW_KERNELS={backend!r}: expected one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return tensors[0].is_cuda


def check_triton_inputs(d: int, *tensors: torch.Tensor) -> None:
    if d > MAX_TRITON_DIM:
        raise ValueError(f"Triton kernels support feature dim <= {MAX_TRITON_DIM}, got {d}; "
                         "use backend='torch'")
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"Triton kernels take fp32/bf16/fp16 features, got {t.dtype}; "
                            "use backend='torch' (e.g. for float64 gradcheck)")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the torch paths: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def rows_per_chunk(n_cols: int) -> int:
    """Rows of a logit block so that rows * n_cols stays within CHUNK_ELEMS (at least one row)."""
    return max(1, CHUNK_ELEMS // max(1, n_cols))


PRECISIONS = ("auto", "ieee", "tf32", "bf16", "fp16")
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dot_dtype(precision: str, *tensors: torch.Tensor) -> tuple[torch.dtype, str]:
    """The precision contract of every kernel: (dtype the dot operands are rounded to, tl.dot
    input_precision). Dots always accumulate in fp32; LSE, softmax weights and gradients are fp32.

    "auto": under torch.autocast for the tensors' device, fp32 inputs are rounded to the autocast
    dtype (bf16 / fp16) and the dots run on tensor cores: the embeddings stay fp32 (l2n normalises
    in fp32) and the kernel, not the caller, does the rounding. Outside autocast, bf16 / fp16 inputs
    keep their dtype; fp32 inputs follow torch.get_float32_matmul_precision(): "highest" (torch's
    default) gives IEEE fp32 dots, "high" / "medium" tf32 dots, as torch's own matmul would. fp64
    inputs are never rounded (torch path only).
    "ieee" / "tf32": fp32 operands (16-bit inputs are upcast, exactly), IEEE or tf32 dots.
    "bf16" / "fp16": operands rounded to that dtype.
    Why the kernel rounds rather than the caller: gradients come back in the input's dtype (fp32),
    not rounded through a 16-bit cast, and the chunked torch path follows the same contract (operands
    rounded, products summed in fp32) in forward and backward alike, autocast or not.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    dtypes = {t.dtype for t in tensors}
    if torch.float64 in dtypes:
        if precision not in ("auto", "ieee"):
            raise TypeError(f"precision={precision!r} with float64 inputs; use 'auto'")
        return torch.float64, "ieee"
    if precision in _LOW:
        return _LOW[precision], "ieee"  # tl.dot ignores input_precision for 16-bit operands
    if precision in ("ieee", "tf32"):
        return torch.float32, precision
    device_type = tensors[0].device.type
    if torch.float32 in dtypes:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type), "ieee"
        return torch.float32, ("ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32")
    if len(dtypes) != 1:
        raise TypeError(f"inputs mix 16-bit dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop(), "ieee"


def no_autocast(device: torch.device):
    """The kernels' own dtype contract (dot_dtype) replaces autocast inside their autograd functions:
    without this the chunked torch path would run its matmuls in bf16 in forward (under autocast) and
    in fp32 in backward (autograd runs backward outside the autocast region)."""
    return torch.autocast(device.type, enabled=False)


def interpreted(t: torch.Tensor) -> bool:
    return not t.is_cuda or triton.knobs.runtime.interpret


_INTERPRETER_LOCK = threading.Lock()  # the interpreter patches triton.language module-wide


def _call_interpreted(self: JITFunction, *args, **kwargs):
    return _interpreted(self.fn).rewrite()(*args, **kwargs)


@functools.cache
def _interpreted(fn: Callable) -> InterpretedFunction:
    return InterpretedFunction(fn)


@contextlib.contextmanager
def _library_helpers_interpreted():
    """Run triton.language's jit-written helpers (all in triton/language/standard.py) interpreted.

    triton.language.core is patched to the interpreter's semantics once, outside the launch's own
    patch of triton.language, so the two scopes unwind in LIFO order and every attribute is put back
    (InterpretedFunction.__call__ would re-patch core on each helper call and never restore it, which
    breaks later compiled launches in the same process).
    """
    with _INTERPRETER_LOCK:
        original = JITFunction.__call__
        core_scope = _patch_lang(triton.language.standard.zeros.fn)
        JITFunction.__call__ = _call_interpreted
        try:
            yield
        finally:
            JITFunction.__call__ = original
            core_scope.restore()


# -- choosing a config on CUDA ---------------------------------------------------------------------
# Why not triton.autotune: its key holds the exact sizes, so every new batch size (a trimmed last
# batch, eval) re-tunes, per rank, in the middle of a step (long enough to trip NCCL's watchdog), and
# ranks timing the same configs can pick different ones, so their numerics differ. Here a choice is
# keyed by the kernel, the dtypes, the constexprs and the key sizes rounded up to a power of two;
# configs whose shared-memory estimate exceeds the device's limit are never compiled; and the choice
# is the same on every rank (the timings are summed over the process group before the argmin) and
# across runs when INFOVIEW_TUNE_CACHE names a JSON file (read at the first launch, written by rank
# 0 after each new choice). INFOVIEW_TUNE=off skips the timing: the first admissible config is used,
# which is deterministic with no collective at all.
SMEM_LIMIT = 227 * 1024  # H100 / H200 shared memory per block (opt-in maximum)


def bucket(n: int) -> int:
    """Sizes sharing a tuning choice: n rounded up to a power of two."""
    return 1 if n <= 1 else triton.next_power_of_2(int(n))


def tile_config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps,
                         num_stages=num_stages)


def dot_smem_bytes(elem: int, block_m: int, block_n: int, block_d: int, stages: int) -> int:
    """Upper estimate of the shared memory of a kernel that holds a (block_m x block_d) tile and
    streams (block_n x block_d) tiles through `stages` buffers into tl.dot, with a (block_m x
    block_n) operand for a second dot: checked against real sm_90 compiles of every config in
    tests/test_kernels_backend.py (always at least the compiled size)."""
    return elem * (block_d * (stages * block_n + block_m) + block_m * block_n) + 1024


# Tiles of the tl.dot kernels (nt_xent, info_nce) as (BLOCK_M, BLOCK_N, warps, stages), per operand
# class ("16bit", "tf32", "ieee"), BLOCK_D (<= 128 or 256) and kernel role: "lse" (a logsumexp
# pass), "acc" (a BLOCK_M x BLOCK_D fp32 accumulator next to the logit tile: backward, softmax
# sums), "acc_idx" (the same with gathered row / column indices, the local-anchor backward). Read
# off sm_90 compiles of a 19-tile grid (triton 3.9, its ptxas with triton's flags): each entry fits
# SMEM_LIMIT and spills at most 128 B (the IEEE FMA loops spill a little whatever the tile); the
# grid's other tiles spilled up to 20 KB. tests/test_kernels_backend.py compiles every kernel
# variant with every admitted tile and asserts the limits; `python -m kernels.compile_check`
# prints the table for another toolchain (triton 3.6 ships an older ptxas: numbers move).
_BIG = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)]
DOT_TILES: dict[tuple[str, int, str], list[tuple[int, int, int, int]]] = {
    ("16bit", 128, "lse"): _BIG,
    ("16bit", 128, "acc"): [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 8, 2)],
    ("16bit", 128, "acc_idx"): [(64, 32, 8, 2), (64, 32, 8, 3), (32, 64, 4, 2), (32, 32, 4, 2)],
    ("16bit", 256, "lse"): _BIG,
    ("16bit", 256, "acc"): [(64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 3)],
    ("16bit", 256, "acc_idx"): [(32, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 3), (16, 64, 4, 2)],
    ("tf32", 128, "lse"): _BIG,
    ("tf32", 128, "acc"): [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 2), (64, 32, 8, 2)],
    ("tf32", 128, "acc_idx"): [(64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2)],
    ("tf32", 256, "lse"): [(128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 8, 2)],
    ("tf32", 256, "acc"): [(32, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 3)],
    ("tf32", 256, "acc_idx"): [(32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("ieee", 128, "lse"): [(32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 2, 2)],
    ("ieee", 128, "acc"): [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2)],
    ("ieee", 128, "acc_idx"): [(16, 32, 4, 2), (32, 16, 4, 2)],
    ("ieee", 256, "lse"): [(16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 2, 2)],
    ("ieee", 256, "acc"): [(16, 16, 2, 2)],  # 16 x 32 and 32 x 16 spilled 7.5-10.8 KB
    ("ieee", 256, "acc_idx"): [(16, 16, 2, 2)],
}
DOT_CONFIGS = [tile_config(*t) for t in dict.fromkeys(t for ts in DOT_TILES.values() for t in ts)]


def dot_class(constexprs: dict[str, Any], elem: int, role: str) -> tuple[str, int, str]:
    cls = "16bit" if elem == 2 else constexprs["PRECISION"]
    if role == "acc" and (constexprs.get("ROW_IDX") or constexprs.get("COL_IDX")):
        role = "acc_idx"
    return cls, 128 if constexprs["BLOCK_D"] <= 128 else 256, role


def admit_dot(role: str) -> Callable:
    """The `admit` of a dot kernel of this role: its DOT_TILES entry, within the smem estimate."""
    def admit(cfg: triton.Config, constexprs: dict[str, Any], elem: int) -> bool:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if (bm, bn, cfg.num_warps, cfg.num_stages) not in DOT_TILES[dot_class(constexprs, elem, role)]:
            return False
        return dot_smem_bytes(elem, bm, bn, constexprs["BLOCK_D"], cfg.num_stages) <= SMEM_LIMIT
    admit.role = role
    return admit


def dot_meta(x: torch.Tensor, precision: str) -> dict[str, Any]:
    """Launch constexprs of the dot kernels for operands x (already rounded to their dot dtype)."""
    return dict(BLOCK_D=max(16, triton.next_power_of_2(x.shape[1])),
                UPCAST=interpreted(x) and x.dtype != torch.float32,  # the interpreter has no bf16 dot
                PRECISION=precision, device_tensor=x)


_TUNED: dict[str, dict] = {}
_TUNE_FILE_LOADED: set[str] = set()


def _tune_mode() -> str:
    mode = os.environ.get("INFOVIEW_TUNE", "bench")
    if mode not in ("bench", "off"):
        raise ValueError(f"INFOVIEW_TUNE={mode!r}: expected 'bench' or 'off'")
    return mode


def _tune_cache_path() -> Path | None:
    path = os.environ.get("INFOVIEW_TUNE_CACHE")
    return Path(path) if path else None


def _load_tune_cache(path: Path) -> None:
    if str(path) in _TUNE_FILE_LOADED:
        return
    _TUNE_FILE_LOADED.add(str(path))
    if path.exists():
        try:
            _TUNED.update(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise RuntimeError(f"INFOVIEW_TUNE_CACHE={path} is not a readable JSON file ({e}); "
                               "delete it to re-tune") from e


def _save_tune_cache(path: Path) -> None:
    if _rank() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_TUNED, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _config_dict(cfg: triton.Config) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


class TritonKernel:
    """A @triton.jit body that runs compiled on CUDA (a tuned config, see above) and interpreted on CPU.

    `cpu_config` fixes the meta-parameters for the interpreter: no tuning there (each config would
    re-run the numpy emulation) and small blocks so tests cover several programs and ragged edges.
    `admit(config, constexprs, elem_bytes)` says whether a config can run well for these constexprs
    (shared-memory estimate within SMEM_LIMIT, no register spills at this BLOCK_D; None: all can). Kernels that write their inputs in place must be given a single
    config, because timing configs re-launches the kernel.
    """

    def __init__(self, fn: Callable, *, configs: Sequence[triton.Config], key: Sequence[str],
                 cpu_config: dict[str, Any], admit: Callable | None = None,
                 dtype_arg: str | None = None):
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)
        self.cpu_config = dict(cpu_config)
        self.admit = admit
        self.params = list(inspect.signature(fn).parameters)
        self.dtype_arg = dtype_arg or self.params[0]  # the tensor whose dtype sizes the tiles
        self._jitted = None

    # -- config choice ------------------------------------------------------------------------------
    def candidates(self, constexprs: dict[str, Any], elem_bytes: int) -> list[triton.Config]:
        """The configs that can launch (and run without spills) for these constexprs."""
        if self.admit is None:
            return list(self.configs)
        fits = [c for c in self.configs if self.admit(c, constexprs, elem_bytes)]
        if not fits:
            raise RuntimeError(f"{self.fn.__name__}: no config admitted for {constexprs} "
                               f"({elem_bytes}-byte operands); add a smaller config")
        return fits

    def tune_key(self, named: dict[str, Any], constexprs: dict[str, Any]) -> str:
        """Kernel, device, triton version, key sizes (bucketed), tensor dtypes and constexprs."""
        sizes = [f"{k}={bucket(named[k])}" for k in self.key]
        dtypes = [f"{k}:{str(v.dtype).removeprefix('torch.')}" for k, v in named.items()
                  if isinstance(v, torch.Tensor)]
        consts = [f"{k}={v}" for k, v in sorted(constexprs.items())]
        dev = named[self.dtype_arg].device
        return "|".join([self.fn.__name__, torch.cuda.get_device_name(dev), triton.__version__,
                         *sizes, *dtypes, *consts])

    def _choose(self, grid, named: dict[str, Any], args, kwargs) -> triton.Config:
        path = _tune_cache_path()
        if path is not None:
            _load_tune_cache(path)
        key = self.tune_key(named, kwargs)
        if key in _TUNED:
            d = _TUNED[key]
            return triton.Config(d["kwargs"], num_warps=d["num_warps"], num_stages=d["num_stages"])
        cands = self.candidates(kwargs, named[self.dtype_arg].element_size())
        if len(cands) == 1 or _tune_mode() == "off":
            best = cands[0]
        else:
            times = torch.tensor([self._time(grid, c, args, kwargs) for c in cands],
                                 dtype=torch.float64, device=named[self.dtype_arg].device)
            if _distributed():  # same choice on every rank: argmin of the summed timings
                torch.distributed.all_reduce(times)
            best = cands[int(torch.argmin(times))]
        _TUNED[key] = _config_dict(best)
        if path is not None:
            _save_tune_cache(path)
        return best

    def _time(self, grid, cfg: triton.Config, args, kwargs) -> float:
        try:
            return triton.testing.do_bench(lambda: self._launch(grid, cfg, args, kwargs), warmup=5,
                                           rep=20, return_mode="median")
        except triton.runtime.errors.OutOfResources:
            return float("inf")

    def _launch(self, grid, cfg: triton.Config, args, kwargs) -> None:
        self._jitted[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages, **COMPILE_OPTIONS)

    def __call__(self, grid, *args, device_tensor: torch.Tensor, config: triton.Config | None = None,
                 **kwargs) -> None:
        """`config` fixes the CUDA config (no tuning): for kernels that must share one tile shape
        with each other, e.g. passes that recompute the same scores bit for bit."""
        if interpreted(device_tensor):
            with _library_helpers_interpreted():
                _interpreted(self.fn)[grid](*args, **kwargs, **self.cpu_config)
            return
        if self._jitted is None:
            self._jitted = triton.jit(self.fn)
        named = dict(zip(self.params, args)) | kwargs
        with torch.cuda.device(device_tensor.device):  # triton launches on the current device
            if config is not None:
                cfg = config
            elif len(self.configs) == 1:
                cfg = self.configs[0]
            else:
                cfg = self._choose(grid, named, args, kwargs)
            self._launch(grid, cfg, args, kwargs)


def triton_kernel(*, configs: Sequence[triton.Config], key: Sequence[str],
                  cpu_config: dict[str, Any], admit: Callable | None = None,
                  dtype_arg: str | None = None) -> Callable[[Callable], TritonKernel]:
    """Decorator: `@triton_kernel(configs=..., key=..., cpu_config=...)` in place of `@triton.jit`."""
    return lambda fn: TritonKernel(fn, configs=configs, key=key, cpu_config=cpu_config, admit=admit,
                                   dtype_arg=dtype_arg)

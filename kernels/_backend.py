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
import threading
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


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision dots, matching torch's default (allow_tf32 is off for matmul);
    # bf16/fp16 inputs ignore this and use tensor cores with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


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


class TritonKernel:
    """A @triton.jit body that runs compiled on CUDA (autotuned over `configs`) and interpreted on CPU.

    `cpu_config` fixes the meta-parameters for the interpreter: no autotuning there (each config
    would re-run the numpy emulation) and small blocks so tests cover several programs and ragged
    edges. Kernels that write their inputs in place must be given a single config, because
    autotuning re-launches the kernel once per config.
    """

    def __init__(self, fn: Callable, *, configs: Sequence[triton.Config], key: Sequence[str],
                 cpu_config: dict[str, Any]):
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)
        self.cpu_config = dict(cpu_config)
        self._compiled = None

    def __call__(self, grid, *args, device_tensor: torch.Tensor, **kwargs) -> None:
        if interpreted(device_tensor):
            with _library_helpers_interpreted():
                _interpreted(self.fn)[grid](*args, **kwargs, **self.cpu_config)
            return
        if self._compiled is None:
            jitted = triton.jit(self.fn)
            self._compiled = (triton.autotune(self.configs, key=self.key)(jitted)
                              if len(self.configs) > 1 else jitted)
        with torch.cuda.device(device_tensor.device):  # triton launches on the current device
            if len(self.configs) > 1:
                self._compiled[grid](*args, **kwargs, **COMPILE_OPTIONS)
            else:
                (cfg,) = self.configs
                self._compiled[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, **COMPILE_OPTIONS)


def triton_kernel(*, configs: Sequence[triton.Config], key: Sequence[str],
                  cpu_config: dict[str, Any]) -> Callable[[Callable], TritonKernel]:
    """Decorator: `@triton_kernel(configs=..., key=..., cpu_config=...)` in place of `@triton.jit`."""
    return lambda fn: TritonKernel(fn, configs=configs, key=key, cpu_config=cpu_config)

"""Backend selection, interpreter wiring, and that every Triton kernel compiles for a real GPU.

The cross-compile test needs no GPU: triton ships ptxas, so each kernel, launched the way the
public functions launch it, is compiled to a Hopper (sm_90) cubin with its first CUDA autotune
config. That checks the code path the interpreter cannot (bf16 tl.dot, loop-carried types,
shared-memory fit).
"""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
import triton
from triton.runtime.jit import JITFunction

import kernels

backend_mod = importlib.import_module("kernels._backend")


def small_calls(dtype):
    """Run every public function once (forward and backward) on tiny CPU inputs."""
    g = torch.Generator().manual_seed(0)

    def unit(n, d=32):
        return F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)

    z = unit(24).requires_grad_()
    kernels.nt_xent(z, 0.1, backend="triton").backward()
    q, k = unit(16).requires_grad_(), unit(16).requires_grad_()
    kernels.info_nce(q, k, unit(40), temperature=0.1, backend="triton").backward()
    kernels.info_nce(q, k, temperature=0.1, backend="triton").backward()
    bank = unit(100)
    pos, neg = torch.randint(0, 100, (8,), generator=g), torch.randint(0, 100, (8, 50), generator=g)
    for mode in ("softmax", "nce"):
        kernels.bank_nce(q[:8], bank, pos, neg, 0.1, mode, backend="triton").loss.backward()
    kernels.bank_update(bank, pos, unit(8), 0.5, backend="triton")


def test_auto_uses_chunked_torch_on_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("auto launched a Triton kernel for CPU tensors")

    monkeypatch.setattr(backend_mod.TritonKernel, "__call__", refuse)
    z = torch.randn(8, 4, requires_grad=True)
    kernels.nt_xent(z, 0.5).backward()
    assert z.grad is not None
    with pytest.raises(AssertionError, match="auto launched"):
        kernels.nt_xent(z, 0.5, backend="triton")


def test_backend_argument_is_checked():
    z = torch.randn(8, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.nt_xent(z, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="feature dim"):
        kernels.nt_xent(torch.randn(8, 300), 0.5, backend="triton")


def test_interpreter_patches_are_undone():
    import triton.language as tl

    # The interpreter swaps triton.language's builtins for numpy ones while a kernel runs; a leftover
    # swap would break every later compiled launch in the process.
    before = {m: dict(vars(m)) for m in (tl, tl.core, tl.math, tl.core.tensor)}
    original = JITFunction.__call__
    kernels.nt_xent(torch.randn(8, 4), 0.5, backend="triton")
    assert JITFunction.__call__ is original
    for namespace, attrs in before.items():
        now = vars(namespace)
        assert [name for name, value in attrs.items() if now.get(name) is not value] == []


def test_every_kernel_compiles_for_sm90(monkeypatch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = {}
    original = backend_mod.TritonKernel.__call__

    def record(self, grid, *args, device_tensor, **kwargs):
        launches.setdefault(self.fn.__name__, (self, args, kwargs))
        return original(self, grid, *args, device_tensor=device_tensor, **kwargs)

    monkeypatch.setattr(backend_mod.TritonKernel, "__call__", record)
    small_calls(torch.bfloat16)
    assert len(launches) == 7, sorted(launches)

    def arg_type(value):
        if isinstance(value, torch.Tensor):
            return "*" + {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64",
                          torch.int32: "i32"}[value.dtype]
        return "fp32" if isinstance(value, float) else "i32"

    for name, (kernel, args, kwargs) in sorted(launches.items()):
        params = list(inspect.signature(kernel.fn).parameters)
        cfg = kernel.configs[0]
        constexprs = {**kwargs, **cfg.kwargs}
        # The interpreter upcasts bf16 for tl.dot; on the GPU the kernel takes bf16 directly.
        constexprs = {k: (False if k == "UPCAST" else v) for k, v in constexprs.items()}
        signature = {p: "constexpr" if p in constexprs else arg_type(v)
                     for p, v in zip(params, list(args) + [constexprs.get(p) for p in params[len(args):]])}
        source = ASTSource(fn=triton.jit(kernel.fn), signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                           **backend_mod.COMPILE_OPTIONS})
        assert compiled.asm["cubin"], name
        assert compiled.metadata.shared <= 227 * 1024, name  # H100/H200 shared memory per block

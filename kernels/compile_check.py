"""Cross-compile every Triton kernel variant, with every config the tuner can pick, for a GPU that
is not here (default sm_90: H100 / H200), and read the compiler's resource report.

    python -m kernels.compile_check            # table of every (variant, config): smem, regs, spills
    python -m kernels.compile_check --csv out.csv

Triton ships ptxas, so no GPU or driver is needed. The variants are found by running the public
functions on tiny CPU inputs with a hook that records each kernel launch (arguments and
constexprs) instead of running it, over every dtype / precision (bf16, fp32-tf32, fp32-IEEE), both row
widths the tile tables distinguish (BLOCK_D 128 and 256), every anchor / queue / bank mode and with
and without gradients. Each variant is then compiled with each config `TritonKernel.candidates`
admits for it; the -v log of triton's own ptxas run gives registers and spill bytes, triton's
metadata the shared memory. This is what the interpreter cannot check (bf16 tl.dot, tensor-core instructions, register
pressure, shared-memory fit) and the best GPU check a CPU-only CI has.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import triton

import kernels

from . import _backend

# Spill stores (bytes per thread) tolerated in an admitted config: tensor-core and bank kernels
# 128 B (the tile tables were chosen so), the IEEE fp32 FMA path 512 B (it spills a little at any
# tile; it is the path asked for explicitly, not the default).
SPILL_LIMIT = 128
SPILL_LIMIT_IEEE = 512
DIMS = (128, 256)
CASES = (("bf16", torch.bfloat16, "auto"), ("tf32", torch.float32, "tf32"),
         ("ieee", torch.float32, "ieee"))


@dataclass
class Variant:
    """One compiled form of a kernel: its runtime-argument types and constexprs."""
    kernel: _backend.TritonKernel
    signature: dict[str, str]
    constexprs: dict[str, Any]
    elem: int
    case: str = ""
    calls: list[str] = field(default_factory=list)
    config: triton.Config | None = None  # fixed by the launcher (ring_nce): the only one compiled

    def spill_limit(self) -> int:
        return SPILL_LIMIT_IEEE if self.constexprs.get("PRECISION") == "ieee" and self.elem == 4 \
            else SPILL_LIMIT

    def __getstate__(self):  # workers re-import the kernel by name (the decorator keeps fn's name)
        state = dict(self.__dict__)
        state["kernel"] = (self.kernel.fn.__module__, self.kernel.fn.__name__)
        return state

    def __setstate__(self, state):
        module, name = state["kernel"]
        self.__dict__.update(state, kernel=getattr(importlib.import_module(module), name))

    @property
    def name(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items())
                         if k not in ("UPCAST",))
        return f"{self.kernel.fn.__name__}[{self.case}:{flags}]"


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                      torch.int64: "i64", torch.int32: "i32"}[value.dtype]
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    raise TypeError(f"kernel argument of type {type(value)}")


def _calls(dtype, d: int, precision: str) -> list[tuple[str, Any]]:
    """Every public entry point once per launch-relevant mode, on tiny inputs."""
    g = torch.Generator().manual_seed(0)

    def unit(n, grad=False):
        x = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
        return x.requires_grad_(grad)

    def nt(anchors):
        z = unit(24, True)
        kernels.nt_xent(z, 0.1, anchors=anchors, precision=precision, backend="triton").backward()

    def info(queue, grad_k):
        q, k = unit(16, True), unit(16, grad_k)
        kernels.info_nce(q, k, None if not queue else unit(40), temperature=0.1,
                         precision=precision, backend="triton").backward()

    def bank(mode, grad, z):
        bank_rows = unit(100)
        pos = torch.randint(0, 100, (8,), generator=g)
        neg = torch.randint(0, 100, (8, 50), generator=g)
        q = unit(8, grad)
        out = kernels.bank_nce(q, bank_rows, pos, neg, 0.1, mode, z, backend="triton")
        if grad:
            out.loss.backward()

    def update():
        bank_rows = unit(100)
        kernels.bank_update(bank_rows, torch.randint(0, 100, (8,), generator=g), unit(8), 0.5,
                            backend="triton")

    def ring(lower, in_batch):
        q, k = unit(16, True), unit(16, True)
        c = torch.cat([q, k]) if in_batch else unit(40)
        excl = torch.arange(16) if in_batch else None
        kernels.ring_nce(q, k, c, 0.1, lower, 0.5, exclude=excl, precision=precision,
                         backend="triton").backward()

    def local(clip, reg):
        src, trg = unit(8, True), unit(40, True).reshape(8, 5, d)
        out = kernels.local_nce(src, trg, clip, return_reg=reg, precision=precision, backend="triton")
        (sum(out) if reg else out).backward()

    def info_targets():
        q, k = unit(16, True), unit(40, True)
        kernels.info_nce(q, k, temperature=0.1, targets=torch.arange(16) * 2, precision=precision,
                         backend="triton").backward()

    out = [("nt_xent", lambda: nt(None)), ("nt_xent anchors=slice", lambda: nt(slice(4, 12))),
           ("nt_xent anchors=index", lambda: nt(torch.tensor([1, 5, 7, 20])))]
    out += [(f"info_nce queue={qu} grad_k={gk}", lambda qu=qu, gk=gk: info(qu, gk))
            for qu in (True, False) for gk in (True, False)]
    out += [(f"local_nce clip={c} reg={r}", lambda c=c, r=r: local(c, r)) for c in (None, 10.0) for r in (False, True)]
    out.append(("info_nce targets", info_targets))
    out += [("ring_nce ring in-batch", lambda: ring(0.1, True)), ("ring_nce ball queue", lambda: ring(0.0, False))]
    if precision in ("auto", "ieee"):  # the bank kernels have no dot: once per dtype is enough
        out += [(f"bank_nce {m} grad={gr} Z={z}", lambda m=m, gr=gr, z=z: bank(m, gr, z))
                for m in ("softmax", "nce") for gr in (True, False)
                for z in ((None, 100.0) if m == "nce" else (None,))]
        out.append(("bank_update", update))
    return out


def launch_variants(dims=DIMS, cases=CASES) -> list[Variant]:
    """The distinct (kernel, signature, constexprs) the public functions launch."""
    found: dict[tuple, Variant] = {}
    original = _backend.TritonKernel.__call__
    current: dict[str, str] = {}

    def record(self, grid, *args, device_tensor, config=None, **kwargs):
        params = self.params
        constexprs = {k: v for k, v in kwargs.items()}
        constexprs["UPCAST"] = False if "UPCAST" in constexprs else None  # the GPU takes bf16 dots
        constexprs = {k: v for k, v in constexprs.items() if v is not None}
        named = dict(zip(params, args))
        if "SCORES_T" in constexprs:  # ring_nce's column pass: the layout CUDA launches take
            ring = importlib.import_module("kernels.ring_nce")
            constexprs["SCORES_T"] = ring.compiled_scores_t(constexprs["PRECISION"],
                                                            named[self.dtype_arg].element_size())
        signature = {p: _arg_type(v) for p, v in named.items()}
        signature.update({p: "constexpr" for p in constexprs})
        elem = named[self.dtype_arg].element_size()
        key = (self.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())))
        v = found.setdefault(key, Variant(self, signature, constexprs, elem, current["case"], config=config))
        v.calls.append(current["call"])
        # Not run: only the launch's types and constexprs matter here, and the outputs (torch.empty)
        # feed nothing that branches on values. So no interpreter is needed (triton 3.6's breaks on
        # numpy >= 2.4, the GPU machine's) and the discovery takes a second.

    _backend.TritonKernel.__call__ = record
    try:
        for d in dims:
            for case, dtype, precision in cases:
                for name, call in _calls(dtype, d, precision):
                    current.update(case=f"{case},d={d}", call=name)
                    call()
    finally:
        _backend.TritonKernel.__call__ = original
    return list(found.values())


def parse_ptxas(text: str) -> dict[str, int]:
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    if not regs:
        raise RuntimeError(f"no register count in the ptxas log: {text[-500:]!r}")
    return {"regs": max(regs), "spill_bytes": max(spills, default=0)}


def compile_config(variant: Variant, cfg: triton.Config, arch: int = 90) -> dict[str, Any]:
    """Compile one (variant, config) for sm_<arch> and report its resources. The register and spill
    counts come from the ptxas run triton itself makes (its flags, its -v log), so they are the
    compiled kernel's, not a re-run's."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    constexprs = {**variant.constexprs, **cfg.kwargs}
    signature = {**variant.signature, **{k: "constexpr" for k in cfg.kwargs}}
    knobs = triton.knobs
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        # always_compile: a cached kernel would skip ptxas and leave no log
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
        src = ASTSource(fn=triton.jit(variant.kernel.fn), signature=signature, constexprs=constexprs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": cfg.num_warps,
                                               "num_stages": cfg.num_stages,
                                               **_backend.COMPILE_OPTIONS})
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    seconds = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    return {"variant": variant.name, "config": _config_name(cfg), "shared": compiled.metadata.shared,
            **parse_ptxas(log.getvalue()), "wgmma": "wgmma" in ptx, "mma": "mma" in ptx,
            "compile_s": round(seconds, 2)}


def _config_name(cfg: triton.Config) -> str:
    kw = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{kw},w={cfg.num_warps},s={cfg.num_stages}"


def admitted(variant: Variant) -> list[triton.Config]:
    k = variant.kernel
    if variant.config is not None:
        return [variant.config]
    if len(k.configs) == 1:
        return list(k.configs)
    return k.candidates(variant.constexprs, variant.elem)


def _compile_task(task) -> dict[str, Any]:
    variant, kw = task
    cfg = triton.Config(kw["kwargs"], num_warps=kw["num_warps"], num_stages=kw["num_stages"])
    row = compile_config(variant, cfg)
    row["spill_limit"] = variant.spill_limit()
    row["smem_estimate"] = _estimate(variant, cfg)
    return row


def _estimate(variant: Variant, cfg: triton.Config) -> int | str:
    if variant.kernel.admit is None or not hasattr(variant.kernel.admit, "role"):
        return ""
    kw = cfg.kwargs
    return _backend.dot_smem_bytes(variant.elem, kw["BLOCK_M"], kw["BLOCK_N"],
                                   variant.constexprs["BLOCK_D"], cfg.num_stages)


def run(jobs: int = 1, quick: bool = False, arch: int = 90, largest: bool = False) -> list[dict[str, Any]]:
    """Compile every (variant, admitted config); `quick`: bf16 at BLOCK_D 128 only; `largest`: only the
    first admitted config of each variant (the tables list the largest tile and the most stages first,
    so it is the one nearest the shared-memory and register limits; the test suite's sweep)."""
    if arch != 90:
        raise ValueError("the tile tables and limits are for sm_90; pass --arch 90")
    variants = launch_variants(dims=(128,), cases=CASES[:1]) if quick else launch_variants()
    tasks = [(v, _backend._config_dict(c)) for v in variants for c in admitted(v)[:1 if largest else None]]
    if jobs <= 1:
        return [_compile_task(t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    # spawn: the parent may hold a CUDA context (tools/gpu_check.py); compiling needs none
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_task, tasks, chunksize=4))


def over_limits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["shared"] > _backend.SMEM_LIMIT or r["spill_bytes"] > r["spill_limit"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90)")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--quick", action="store_true", help="bf16 at BLOCK_D 128 only (a smoke run)")
    parser.add_argument("--largest", action="store_true",
                        help="only the largest admitted config of each variant (what make test compiles)")
    args = parser.parse_args(argv)
    rows = run(args.jobs, args.quick, args.arch, args.largest)
    for row in rows:
        print(" ".join(f"{k}={row[k]}" for k in row), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    bad = over_limits(rows)
    print(f"{len(rows)} compiles, {len(bad)} over the limits (triton {triton.__version__})",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Microbenchmarks of the fused contrastive kernels against eager PyTorch and torch.compile.

    python -m kernels.bench                       # all kernels, all modes, small grid
    python -m kernels.bench --grid full --kernels nt_xent,info_nce --modes fwd_bwd

Grid: provider x mode (fwd, bwd, fwd_bwd) x size. Providers on CUDA: "fused" (the Triton kernels),
"eager" (the *_ref functions, which materialise the logits / gathers like the original code), and
"compile" (torch.compile of those same eager functions). On CPU the default providers are "chunked"
(the chunked torch path of the same public functions) and "eager"; "compile" can be added with
--providers. bank_nce is timed together with bank_update, as a CMC step (NCE loss + memory update),
and its eager baseline is CMC's index_select + bmm + index_copy_. ring_nce (window (0.01, 0.1)) is
compared with the N x K logits + topk + logsumexp a user would write. local_nce (N = B images, K = L
locations, AMDIM's tanh clip 10 and score regulariser, loss + 4e-2 reg) is compared with AMDIM's own
formulation (the B x B x L scores, masked sum-exp), not with local_nce_ref, which materialises every
positive's logits (B L x (B-1) L: ~20x slower still).

Each row (median time, peak extra memory, device, versions, date) is appended to
<out>/<kernel>.csv as soon as it is measured (a later failure loses nothing; a row that fails says
why in `status`), and <out>/<kernel>.png plots this run's rows. With --gemm-tflops / --copy-gbps
(measured rates: tools/gpu_check.py passes its probe's) each row also gets its floor,
max(FLOPs / GEMM rate, bytes / copy rate), and `floor_pct` = 100 * floor / median time.
torch.compile compiles once per size (dynamic=False) and is reused for every mode.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton

from . import bank_nce, bank_nce_ref, bank_update, info_nce, info_nce_ref, local_nce, nt_xent, nt_xent_ref, ring_nce
from .ring_nce import window

KERNELS = ("nt_xent", "info_nce", "bank_nce", "ring_nce", "local_nce")
MODES = ("fwd", "bwd", "fwd_bwd")
IMAGENET = 1_281_167

# Sizes per kernel: N = instances (nt_xent scores M = 2N rows) or batch, K = queue / negatives,
# bank = memory-bank rows. "full" is the GPU grid; "target" the sizes the project's speed targets
# name (first entry) and a wider one (tools/gpu_check.py times these); "target1" the first alone;
# "small" fits a laptop CPU; "tiny" is a smoke test.
GRIDS: dict[str, dict[str, list[dict[str, int]]]] = {
    "nt_xent": {
        "tiny": [dict(N=64, d=32)],
        "small": [dict(N=n, d=128) for n in (512, 2048, 4096)],
        "full": [dict(N=n, d=d) for d in (128, 256) for n in (1024, 4096, 8192, 16384, 32768, 65536)],
        "target": [dict(N=8192, d=128), dict(N=32768, d=128), dict(N=8192, d=256)],
    },
    "info_nce": {
        "tiny": [dict(N=32, K=256, d=32)],
        "small": [dict(N=n, K=k, d=128) for n, k in ((256, 4096), (1024, 16384), (4096, 16384))],
        "full": [dict(N=n, K=k, d=d) for d in (128, 256) for n in (1024, 8192, 65536)
                 for k in (4096, 16384, 65536)],
        "target": [dict(N=8192, K=65536, d=128), dict(N=8192, K=65536, d=256)],
    },
    "bank_nce": {
        "tiny": [dict(N=8, K=128, d=32, bank=1000)],
        "small": [dict(N=n, K=k, d=128, bank=100_000) for n, k in ((64, 1024), (256, 4096),
                                                                     (256, 8192))],
        "full": [dict(N=n, K=k, d=d, bank=IMAGENET) for d in (128, 256) for n in (256, 1024)
                 for k in (4096, 16384, 65536)],
        "target": [dict(N=256, K=16384, d=128, bank=IMAGENET), dict(N=1024, K=65536, d=128, bank=IMAGENET)],
    },
    "ring_nce": {  # Ring window (0.01, 0.1) over K candidates, the paper's default
        "tiny": [dict(N=16, K=256, d=32)],
        "small": [dict(N=256, K=k, d=128) for k in (16384, 65536)],
        "full": [dict(N=n, K=k, d=d) for d in (128, 256) for n in (256, 1024) for k in (16384, 65536)],
        "target": [dict(N=256, K=65536, d=128), dict(N=1024, K=65536, d=128)],
    },
    "local_nce": {  # N = B images, K = L locations (7 x 7 = 49: AMDIM's 1 -> 7 task)
        "tiny": [dict(N=16, K=9, d=32)],
        "small": [dict(N=128, K=49, d=256), dict(N=128, K=25, d=256)],
        "full": [dict(N=n, K=k, d=d) for d in (128, 256) for n in (128, 512, 2048) for k in (25, 49)],
        "target": [dict(N=128, K=49, d=256), dict(N=1024, K=49, d=256)],
    },
}
for _grids in GRIDS.values():
    _grids["target1"] = _grids["target"][:1]

TEMPERATURE = 0.07
MOMENTUM = 0.5
FIELDS = ["date", "device", "torch", "triton", "kernel", "provider", "mode", "dtype", "N", "K", "d",
          "bank", "median_ms", "peak_mib", "floor_ms", "floor_pct", "status"]


def work(kernel: str, mode: str, case: dict, elem: int) -> tuple[float, float]:
    """(FLOPs, bytes) the fused kernels must do at least: the dots (a d-long dot is 2d FLOPs) and
    each input read once, each output written once (fp32 LSE / gradients)."""
    d = case["d"]
    if kernel == "nt_xent":
        m = 2 * case["N"]
        dots = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}[mode] * m * m  # bwd: recompute + weighted sum
        io = {"fwd": m * d * elem + 4 * m, "bwd": m * d * (elem + 4) + 4 * m,
              "fwd_bwd": m * d * (elem + 4) + 8 * m}[mode]
    elif kernel == "local_nce":
        b, n = case["N"], case["N"] * case["K"]
        dots = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}[mode] * b * n
        io = (b + n) * d * elem + {"fwd": 0, "bwd": (b + n) * d * 4, "fwd_bwd": (b + n) * d * 4}[mode]
    elif kernel in ("info_nce", "ring_nce"):
        n, k = case["N"], case["K"]
        dots = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}[mode] * n * k
        io = (k + 2 * n) * d * elem + {"fwd": 0, "bwd": 2 * n * d * 4, "fwd_bwd": 2 * n * d * 4}[mode]
    else:  # bank_nce + bank_update: the B x (K+1) gathered rows are the work; backward is a scale
        b, k = case["N"], case["K"]
        dots = b * (k + 1) if mode != "bwd" else 0
        io = (b * (k + 1) * d * elem + 2 * b * d * elem) if mode != "bwd" else 2 * b * d * 4
    return 2.0 * d * dots, float(io)


def _unit(n: int, d: int, dtype, device, requires_grad=False) -> torch.Tensor:
    x = F.normalize(torch.randn(n, d, device=device), dim=1).to(dtype)
    return x.requires_grad_(requires_grad)


def _cmc_step(q, bank, pos, neg, Z):
    """CMC's NCEAverage + NCECriterion step: index_select + bmm scores, then index_copy_ update."""
    loss = bank_nce_ref(q, bank, pos, neg, TEMPERATURE, "nce", Z).loss
    with torch.no_grad():
        rows = torch.index_select(bank, 0, pos)
        rows.mul_(MOMENTUM).add_(q.detach() * (1 - MOMENTUM))
        bank.index_copy_(0, pos, rows.div(rows.pow(2).sum(1, keepdim=True).pow(0.5)))
    return loss


RING = (0.01, 0.1)


def _ring_eager(q, k, c, temperature, lower, upper):
    """What a user writes: the N x K logits, topk of the window's end, drop the inner ranks."""
    lo, hi = window(c.shape[0], lower, upper)
    s = q @ c.T / temperature
    top = torch.topk(s, hi, dim=1).values[:, lo:]
    s_pos = (q * k).sum(1) / temperature
    return (torch.logsumexp(torch.cat([s_pos[:, None], top], 1), 1) - s_pos).mean()


LOCAL_CLIP, LOCAL_REG = 10.0, 4e-2


def _amdim_eager(src, trg, clip, reg_weight):
    """AMDIM's formulation (costs.py, NCE_MI_MULTI): the B x B x L scores, positives read off the
    diagonal by a mask, negatives' sum-exp under a max shift, the unclipped scores' mean square."""
    b, n_loc, _ = trg.shape
    raw = (src @ trg.reshape(b * n_loc, -1).T).view(b, b, n_loc)
    reg = (raw ** 2).mean()
    s = clip * torch.tanh(raw / clip)
    pos_mask = torch.eye(b, dtype=s.dtype, device=s.device)[:, :, None].expand(b, b, n_loc)
    pos = (pos_mask * s).sum(1)                                        # (B, L)
    neg = ((1 - pos_mask) * s - clip * pos_mask).reshape(b, -1)
    shift = neg.max(1, keepdim=True)[0]
    neg_sumexp = ((1 - pos_mask).reshape(b, -1) * torch.exp(neg - shift)).sum(1, keepdim=True)
    lse = torch.log(torch.exp(pos - shift) + neg_sumexp)
    return -(pos - shift - lse).mean() + reg_weight * reg


def _local_step(backend):
    def step(src, trg, clip, reg_weight):
        loss, reg = local_nce(src, trg, clip, return_reg=True, backend=backend)
        return loss + reg_weight * reg
    return step


def _fused_step(backend):
    def step(q, bank, pos, neg, Z):
        loss = bank_nce(q, bank, pos, neg, TEMPERATURE, "nce", Z, backend=backend).loss
        bank_update(bank, pos, q.detach(), MOMENTUM, backend=backend)
        return loss
    return step


def build(kernel: str, provider: str, case: dict, dtype, device):
    """(loss closure, tensors whose .grad to reset) for one kernel / provider / size."""
    if provider == "fused" and device.type != "cuda":
        raise ValueError("provider 'fused' needs CUDA (on CPU it would time the interpreter); "
                         "use 'chunked'")
    backend = {"fused": "triton", "chunked": "torch"}.get(provider)
    if kernel == "nt_xent":
        z = _unit(2 * case["N"], case["d"], dtype, device, True)
        ours = lambda: nt_xent(z, TEMPERATURE, backend=backend)  # noqa: E731
        eager, args, kwargs, grads = nt_xent_ref, (z, TEMPERATURE), {}, [z]
    elif kernel == "info_nce":
        q = _unit(case["N"], case["d"], dtype, device, True)
        k = _unit(case["N"], case["d"], dtype, device, True)
        queue = _unit(case["K"], case["d"], dtype, device)
        ours = lambda: info_nce(q, k, queue, temperature=TEMPERATURE, backend=backend)  # noqa: E731
        eager, args, kwargs, grads = info_nce_ref, (q, k, queue), dict(temperature=TEMPERATURE), [q, k]
    elif kernel == "bank_nce":
        q = _unit(case["N"], case["d"], dtype, device, True)
        bank = _unit(case["bank"], case["d"], dtype, device)
        pos = torch.randint(0, case["bank"], (case["N"],), device=device)
        neg = torch.randint(0, case["bank"], (case["N"], case["K"]), device=device)
        Z = float(case["bank"])  # fixed Z: every provider does the same work on every call
        ours = lambda: _fused_step(backend)(q, bank, pos, neg, Z)  # noqa: E731
        eager, args, kwargs, grads = _cmc_step, (q, bank, pos, neg, Z), {}, [q]
    elif kernel == "ring_nce":
        q = _unit(case["N"], case["d"], dtype, device, True)
        k = _unit(case["N"], case["d"], dtype, device, True)
        cands = _unit(case["K"], case["d"], dtype, device)
        ours = lambda: ring_nce(q, k, cands, TEMPERATURE, *RING, backend=backend)  # noqa: E731
        eager, args, kwargs, grads = _ring_eager, (q, k, cands, TEMPERATURE, *RING), {}, [q, k]
    elif kernel == "local_nce":
        g = torch.Generator(device=device).manual_seed(0)
        src = (torch.randn(case["N"], case["d"], device=device, generator=g) / case["d"] ** 0.5).to(dtype)
        trg = (torch.randn(case["N"], case["K"], case["d"], device=device, generator=g)).to(dtype)
        src.requires_grad_(), trg.requires_grad_()
        ours = lambda: _local_step(backend)(src, trg, LOCAL_CLIP, LOCAL_REG)  # noqa: E731
        eager, args, kwargs, grads = _amdim_eager, (src, trg, LOCAL_CLIP, LOCAL_REG), {}, [src, trg]
    else:
        raise ValueError(f"unknown kernel {kernel!r}; known: {KERNELS}")
    if provider == "eager":
        return (lambda: eager(*args, **kwargs)), grads
    if provider == "compile":
        # A fresh dynamo cache per size: otherwise the grid's shapes exhaust the recompile limit
        # (cache_size_limit) and later sizes silently run eager. Built once per size; every mode
        # calls the same compiled function (the backward graph is compiled at the first backward).
        torch._dynamo.reset()
        compiled = torch.compile(eager, dynamic=False)
        return (lambda: compiled(*args, **kwargs)), grads
    if backend is None:
        raise ValueError(f"unknown provider {provider!r}")
    return ours, grads


def _mode_closure(loss_fn: Callable, mode: str) -> Callable:
    if mode == "fwd":
        return loss_fn
    if mode == "fwd_bwd":
        return lambda: loss_fn().backward()
    loss = loss_fn()  # bwd: one graph, backward replayed
    return lambda: loss.backward(retain_graph=True)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _release_freed_memory_to_os() -> None:
    # glibc keeps freed heap blocks for reuse, and RSS would then miss allocations that reuse them.
    # A fixed 64 KiB mmap threshold sends every larger block (all logit / gather buffers) to its own
    # mmap, returned to the OS on free, so RSS follows live tensor memory. (M_MMAP_THRESHOLD = -3)
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)


def _cpu_peak_mib(fn: Callable) -> float:
    """Peak resident memory of the process during one call, above its resident memory at the start
    (Linux): writing 5 to /proc/self/clear_refs resets the VmHWM high-water mark to the current RSS,
    then VmHWM - VmRSS(start) after the call. torch has no CPU allocator statistics; this counts
    every byte the call touches (tensors, autograd buffers, allocator slack), not just tensors.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_bytes("VmRSS")
    fn()
    return max(0, _proc_status_bytes("VmHWM") - base) / 2**20


def _cpu_median_ms(fn: Callable, grads, min_reps=3, max_reps=10, budget_s=3.0) -> float:
    fn()  # warm-up (and torch.compile's compilation)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(fn: Callable, grads, device) -> tuple[float, float]:
    """(median ms, peak extra MiB) of fn on device."""
    if device.type == "cuda":
        ms = triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = _cpu_median_ms(fn, grads)
    for g in grads:
        g.grad = None
    return ms, _cpu_peak_mib(fn)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def run(kernel: str, grid: str, modes, providers, dtype, device, out: Path | None = None,
        rates: dict | None = None) -> list[dict]:
    """Measure the grid; each row is appended to out/<kernel>.csv as soon as it is measured."""
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    elem = torch.empty(0, dtype=dtype).element_size()
    for case in GRIDS[kernel][grid]:
        for provider in providers:
            base = dict(date=stamp, device=device_name(device), torch=torch.__version__,
                        triton=triton.__version__, kernel=kernel, provider=provider,
                        dtype=str(dtype).removeprefix("torch."), N=case["N"], K=case.get("K", ""),
                        d=case["d"], bank=case.get("bank", ""), floor_ms="", floor_pct="")
            try:
                torch.manual_seed(0)
                loss_fn, grads = build(kernel, provider, case, dtype, device)  # compiles once
            except Exception as e:  # noqa: BLE001 - recorded in the row, the grid goes on
                loss_fn, error = None, _status(e)
            for mode in modes:
                row = dict(base, mode=mode)
                try:
                    if loss_fn is None:
                        raise _Recorded(error)
                    ms, mib = measure(_mode_closure(loss_fn, mode), grads, device)
                    row.update(median_ms=f"{ms:.4g}", peak_mib=f"{mib:.4g}", status="ok")
                    if rates:
                        flops, nbytes = work(kernel, mode, case, elem)
                        floor = max(flops / (rates["gemm_tflops"] * 1e9),
                                    nbytes / (rates["copy_gbps"] * 1e6))
                        row.update(floor_ms=f"{floor:.4g}", floor_pct=f"{100 * floor / ms:.3g}")
                except Exception as e:  # noqa: BLE001
                    row.update(median_ms="nan", peak_mib="nan", status=_status(e))
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                if out is not None:
                    append_csv(out / f"{kernel}.csv", [row])
                print(" ".join(f"{k}={row[k]}" for k in ("kernel", "provider", "mode", "N", "K",
                                                        "d", "median_ms", "peak_mib", "floor_pct",
                                                        "status")), flush=True)
            loss_fn = grads = None
    return rows


class _Recorded(Exception):
    pass


def _status(e: BaseException) -> str:
    if isinstance(e, _Recorded):
        return str(e)
    if isinstance(e, torch.OutOfMemoryError):
        return "oom"
    text = f"error: {type(e).__name__}: {e}".replace("\n", " ")
    return text[:200]


def append_csv(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()


def plot(path: Path, kernel: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(2, len(modes), figsize=(4.5 * len(modes), 7), squeeze=False)
    for col, mode in enumerate(modes):
        for provider in providers:
            sel = [r for r in rows if r["mode"] == mode and r["provider"] == provider]
            labels = [f"N={r['N']}" + (f"\nK={r['K']}" if r["K"] != "" else "") + f"\nd={r['d']}"
                      for r in sel]
            for ax, field in zip(axes[:, col], ("median_ms", "peak_mib")):
                ax.plot(labels, [float(r[field]) for r in sel], marker="o", label=provider)
        axes[0, col].set_title(f"{kernel} {mode}")
        axes[0, col].set_ylabel("median time (ms)")
        axes[1, col].set_ylabel("peak extra memory (MiB)")
        for ax, field in zip(axes[:, col], ("median_ms", "peak_mib")):
            if all(float(r[field]) > 0 for r in rows if r["mode"] == mode):
                ax.set_yscale("log")  # sizes span decades; a 0 (tiny sizes) forces linear
            ax.tick_params(axis="x", labelsize=7)
            ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['device']}, {rows[0]['dtype']}, torch {rows[0]['torch']}, "
                 f"triton {rows[0]['triton']}, {rows[0]['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _csv_list(choices):
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}")
        return items
    return parse


def main(argv=None) -> list[dict]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("tiny", "small", "full", "target", "target1"), default="small",
                        help="size grid: small (CPU-sized, default), full (GPU grid), target (the speed "
                             "targets' sizes), target1 (their first), tiny")
    parser.add_argument("--kernels", type=_csv_list(KERNELS), default=list(KERNELS),
                        help=f"comma list from {','.join(KERNELS)} (default: all)")
    parser.add_argument("--modes", type=_csv_list(MODES), default=list(MODES),
                        help=f"comma list from {','.join(MODES)} (default: all)")
    parser.add_argument("--providers", type=_csv_list(("fused", "chunked", "eager", "compile")),
                        default=["fused", "eager", "compile"] if cuda else ["chunked", "eager"],
                        help="comma list (default: fused,eager,compile on CUDA; chunked,eager on CPU)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32",
                        help="input dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); on a shared machine 1 "
                             "avoids OpenMP threads waiting on descheduled siblings")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="directory for <kernel>.csv (appended) and <kernel>.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    parser.add_argument("--tf32", action="store_true",
                        help="fp32 dots in tf32 for every provider (torch.set_float32_matmul_precision"
                             "('high')); default: IEEE fp32, torch's default")
    parser.add_argument("--gemm-tflops", type=float, default=None,
                        help="measured GEMM rate of this dtype, for the floor column")
    parser.add_argument("--copy-gbps", type=float, default=None,
                        help="measured device copy rate (bytes read + written), for the floor column")
    args = parser.parse_args(argv)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    rates = (dict(gemm_tflops=args.gemm_tflops, copy_gbps=args.copy_gbps)
             if args.gemm_tflops and args.copy_gbps else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        _release_freed_memory_to_os()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    args.out.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for kernel in args.kernels:
        rows = run(kernel, args.grid, args.modes, args.providers, dtype, device, args.out, rates)
        if not args.no_plot and any(r["status"] == "ok" for r in rows):
            plot(args.out / f"{kernel}.png", kernel, [r for r in rows if r["status"] == "ok"])
        all_rows += rows
    return all_rows


if __name__ == "__main__":
    main()

"""Everything that needs a GPU, in one prepared run (driven by tools/gpu_check.sh).

    bash tools/gpu_check.sh                          # on a CUDA machine: all stages, ~8 minutes
    python -m tools.gpu_check --out DIR --stages probe,correctness --budget-s 300
    python -m tools.gpu_check --dry-run --out DIR    # CPU: every stage at toy sizes (CI runs this)

Stages, in order (each writes its rows as it goes; an error in one is recorded and the next runs):
  probe        versions, device, measured copy GB/s (bytes read + written) and GEMM TFLOP/s
               (bf16, tf32, fp32): the rates of the kernel floors
  correctness  the kernels at large shapes against float64 (the chunked torch path on float64
               copies of the rounded inputs): nt_xent M=65,536 d=128; info_nce N=8,192 K=65,536
               d=128 / 256; bank_nce B=1,024 K=65,536 over 1.28M rows; a bank of more than 2^31
               elements; d not a power of two; strided inputs; bit-identical reruns
  kernels      kernels.bench on the target sizes: fused vs eager vs torch.compile (compile once,
               at the target size, bf16), fwd / bwd / fwd_bwd, bf16 and fp32, with the floor
               max(FLOPs / GEMM rate, bytes / copy rate) from the probe
  train        training steps per method (ResNet-50, 2 x 224 views, batch 256, bf16 autocast;
               CVRL: R(2+1)D-18 clips), the fused kernels against the chunked torch path
  compile      kernels.compile_check with this machine's triton / ptxas: smem, registers, spills
               of every kernel variant and admitted config (CPU work, in parallel)
  tests        pytest -m gpu over the kernel tests
  dali         if nvidia.dali imports: the DALI GPU view pipeline (images/s, CPU cores used) against
               its CPU path on a synthetic JPEG set, and a short SimCLR ResNet-50 run's data wait

Output (at most 8 files, the device tool's limit): gpu_check.json (everything, with device,
versions, date), kernels_bench.csv (every kernels.bench row, a `kernel` column per row),
train_steps.csv, compile_check.csv, tests.txt, and the log is the script's stdout. Without CUDA and without
--dry-run it stops at once with exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Order = priority inside the budget: what only the GPU can show first (correctness at scale, the
# speed targets, training steps); the compile table and the pytest subset (which repeat smaller
# checks) after; DALI last (it needs carried parts).
STAGES = ("probe", "correctness", "kernels", "train", "compile", "tests", "dali")
NO_CUDA = 2  # exit code without a GPU (and without --dry-run)


class Run:
    """Shared state of one check: device, sizes (full or dry), budget, results (saved as they come)."""

    def __init__(self, out: Path, dry: bool, budget_s: float):
        self.out, self.dry, self.budget_s = out, dry, budget_s
        self.t0 = time.monotonic()
        self.device = torch.device("cpu" if dry else "cuda")
        self.results: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "dry_run": dry, "stages": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_check.json")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, run: Run, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() (CUDA events through triton's do_bench on the GPU)."""
    if run.device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- probe ---------------------------------------------------------------------------------------
def _sig(x: float, digits: int = 3) -> float:
    """Round to significant figures, not decimals: a CPU dry run's bf16 GEMM is ~0.01 TFLOP/s and must not print 0."""
    return float(f"{x:.{digits}g}")


def stage_probe(run: Run) -> dict:
    import numpy as np
    import triton
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "numpy": np.__version__, "cuda": torch.version.cuda, "host": platform.node(),
            "cpu_count": os.cpu_count()}
    if run.device.type == "cuda":
        p = torch.cuda.get_device_properties(run.device)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["driver"] = f"nvidia-smi failed: {e}"
    else:
        info.update(device=f"cpu {platform.processor() or platform.machine()}")
    nbytes = (2 << 30) if not run.dry else (16 << 20)
    x = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=run.device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), run)
    info["copy_gbps"] = _sig(2 * nbytes / t / 1e9)  # bytes read + written
    x = y = None  # free the copy buffers before the GEMMs
    n = 8192 if not run.dry else 256
    rates = {}
    old = torch.backends.cuda.matmul.allow_tf32
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):
        a = torch.randn(n, n, device=run.device).to(dtype)  # random data: zeros run faster
        b = torch.randn(n, n, device=run.device).to(dtype)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            t = timed(lambda: a @ b, run)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        rates[name] = _sig(2 * n**3 / t / 1e12)
    info["gemm_tflops"] = rates
    log(f"probe: {info.get('device')} copy {info['copy_gbps']} GB/s, GEMM {rates} TFLOP/s")
    return info


# -- compile -------------------------------------------------------------------------------------
def stage_compile(run: Run) -> dict:
    from kernels import compile_check
    path = run.out / "compile_check.csv"
    jobs = 2 if run.dry else max(1, min(12, (os.cpu_count() or 2) - 2))
    argv = ["--csv", str(path), "--jobs", str(jobs)] + (["--quick"] if run.dry else [])
    rc = compile_check.main(argv)
    rows = list(csv.DictReader(path.open()))
    over = [r for r in rows if int(r["shared"]) > 227 * 1024 or int(r["spill_bytes"]) > int(r["spill_limit"])]
    log(f"compile: {len(rows)} compiles, {len(over)} over the limits")
    return {"compiles": len(rows), "over_limits": [f"{r['variant']} {r['config']}" for r in over][:50],
            "rc": rc}


# -- tests ---------------------------------------------------------------------------------------
GPU_TESTS = ["tests/test_kernels_nt_xent.py", "tests/test_kernels_info_nce.py", "tests/test_kernels_local_nce.py", "tests/test_kernels_bank.py",
             "tests/test_kernels_precision.py", "tests/test_kernels_backend.py"]


def stage_tests(run: Run) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TESTS]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(60, min(300, run.left())))
    text = r.stdout + r.stderr
    (run.out / "tests.txt").write_text(text[-200_000:])
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    log(f"tests: rc={r.returncode} {summary}")
    return {"rc": r.returncode, "summary": summary}


# -- correctness ---------------------------------------------------------------------------------
def _unit(n, d, dtype, device, gen, grad=False):
    x = torch.randn(n, d, device=device, generator=gen)
    x = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return x.requires_grad_(grad)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


# Tolerances against float64 on the same rounded operands: only the fp32 accumulation order differs
# for the loss; a gradient returned in bf16 (bf16 inputs) carries one bf16 rounding (2^-9 relative
# per element, under 4e-3 of the largest).
LOSS_TOL = 2e-4
GRAD_TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 2e-4}


def _check(rows, name, loss, ref, grads=(), ref_grads=(), tol=LOSS_TOL, **shape):
    err = abs(float(loss) - float(ref)) / max(1e-30, abs(float(ref)))
    gtol = max((GRAD_TOL[g.dtype] for g in grads), default=tol)
    gerr = max((_rel(g, r) for g, r in zip(grads, ref_grads)), default=0.0)
    ok = math.isfinite(err) and math.isfinite(gerr) and err <= tol and gerr <= gtol
    rows.append(dict(check=name, **shape, loss_rel_err=err, grad_rel_err=gerr, tol=tol, grad_tol=gtol, ok=ok))
    log(f"correctness {name} {shape}: loss {err:.2e} (tol {tol:g}) grad {gerr:.2e} (tol {gtol:g}) "
        f"{'ok' if ok else 'FAIL'}")


def _rounded64(*ts):
    """float64 copies of the operands as the kernels see them (bf16 values exactly), with grads."""
    return [t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def stage_correctness(run: Run) -> dict:
    import kernels
    from kernels import _backend
    dev = run.device
    seed = int(time.time()) % 2**31  # fresh inputs each run; recorded
    gen = torch.Generator(device=dev).manual_seed(seed)
    backend = "triton"  # compiled on CUDA; the interpreter in a dry run
    if dev.type == "cuda":
        _backend.CHUNK_ELEMS = 1 << 26  # the float64 references: fewer, larger chunks
    big = not run.dry
    T = 0.07
    rows: list[dict] = []

    def nt(m, d, dtype, z=None, tag="nt_xent"):
        z = _unit(m, d, dtype, dev, gen, True) if z is None else z
        loss = kernels.nt_xent(z, T, backend=backend)
        loss.backward()
        (rz,) = _rounded64(z)
        ref = kernels.nt_xent(rz, T, backend="torch")
        ref.backward()
        _check(rows, tag, loss, ref, [z.grad], [rz.grad], M=m, d=d, dtype=str(dtype))
        return loss.detach(), z.grad.clone()

    def info(n, k, d, dtype):
        q, kk = _unit(n, d, dtype, dev, gen, True), _unit(n, d, dtype, dev, gen, True)
        queue = _unit(k, d, dtype, dev, gen)
        loss = kernels.info_nce(q, kk, queue, temperature=T, backend=backend)
        loss.backward()
        rq, rk, rqu = _rounded64(q, kk, queue)
        ref = kernels.info_nce(rq, rk, rqu, temperature=T, backend="torch")
        ref.backward()
        _check(rows, "info_nce", loss, ref, [q.grad, kk.grad], [rq.grad, rk.grad], N=n, K=k, d=d,
               dtype=str(dtype))

    def bank(b, k, d, n, dtype, mode="nce"):
        q = _unit(b, d, dtype, dev, gen, True)
        rows_ = _unit(n, d, dtype, dev, gen)
        pos = torch.randint(0, n, (b,), device=dev, generator=gen)
        neg = torch.randint(0, n, (b, k), device=dev, generator=gen)
        out = kernels.bank_nce(q, rows_, pos, neg, T, mode, float(n) if mode == "nce" else None,
                               backend=backend)
        out.loss.backward()
        rq, rb = _rounded64(q, rows_)
        ref = kernels.bank_nce(rq, rb, pos, neg, T, mode, float(n) if mode == "nce" else None,
                               backend="torch").loss
        ref.backward()
        _check(rows, f"bank_nce {mode}", out.loss, ref, [q.grad], [rq.grad], B=b, K=k, d=d, bank=n,
               dtype=str(dtype))

    def ring(n, k, d, dtype, lower, upper, in_batch=False):
        """ring_nce against the float64 torch path on the same rounded operands; in_batch: the
        candidates get gradients (the column pass), each anchor's own column excluded."""
        q, kk = _unit(n, d, dtype, dev, gen, True), _unit(n, d, dtype, dev, gen, True)
        c = _unit(k, d, dtype, dev, gen, in_batch)
        excl = torch.arange(n, device=dev) if in_batch else None
        loss = kernels.ring_nce(q, kk, c, T, lower, upper, exclude=excl, backend=backend)
        loss.backward()
        rq, rk, rc = _rounded64(q, kk, c)
        ref = kernels.ring_nce(rq, rk, rc, T, lower, upper, exclude=excl, backend="torch")
        ref.backward()
        grads, refs = [q.grad, kk.grad] + ([c.grad] if in_batch else []), [rq.grad, rk.grad] + ([rc.grad] if in_batch else [])
        _check(rows, f"ring_nce ({lower}, {upper}){' in-batch' if in_batch else ''}", loss, ref, grads, refs,
               N=n, K=k, d=d, dtype=str(dtype))

    def local(b, n_loc, d, dtype, clip):
        """local_nce (clip, reg, loss + 4e-2 reg) against the float64 torch path on the same rounded
        operands; the scores are scaled by 1/sqrt(d) as AMDIM does."""
        src = (_unit(b, d, dtype, dev, gen) * d ** 0.25).requires_grad_()
        trg = (_unit(b * n_loc, d, dtype, dev, gen) * d ** 0.25).reshape(b, n_loc, d).requires_grad_()
        lo, rg = kernels.local_nce(src, trg, clip, return_reg=True, backend=backend)
        loss = lo + 4e-2 * rg
        loss.backward()
        rs, rt = _rounded64(src, trg)
        rl, rr = kernels.local_nce(rs, rt, clip, return_reg=True, backend="torch")
        ref = rl + 4e-2 * rr
        ref.backward()
        _check(rows, f"local_nce clip={clip}", loss, ref, [src.grad, trg.grad], [rs.grad, rt.grad], B=b,
               L=n_loc, d=d, dtype=str(dtype))

    def info_targets(n, m, d, dtype):
        q, kk = _unit(n, d, dtype, dev, gen, True), _unit(m, d, dtype, dev, gen, True)
        t = torch.randint(0, m, (n,), device=dev, generator=gen)
        loss = kernels.info_nce(q, kk, temperature=T, targets=t, backend=backend)
        loss.backward()
        rq, rk = _rounded64(q, kk)
        ref = kernels.info_nce(rq, rk, temperature=T, targets=t, backend="torch")
        ref.backward()
        _check(rows, "info_nce targets", loss, ref, [q.grad, kk.grad], [rq.grad, rk.grad], N=n, K=m, d=d,
               dtype=str(dtype))

    bf16, fp32 = torch.bfloat16, torch.float32
    local(512 if big else 12, 49 if big else 9, 256 if big else 32, bf16, 10.0)
    local(128 if big else 10, 25 if big else 7, 128 if big else 24, fp32, None)
    info_targets(4096 if big else 20, 32768 if big else 90, 128 if big else 32, bf16)
    ring(1024 if big else 24, 65536 if big else 300, 128 if big else 32, bf16, 0.01, 0.1)
    ring(256 if big else 16, 16384 if big else 200, 128 if big else 24, fp32, 0.0, 0.1, in_batch=True)
    nt(65536 if big else 96, 128 if big else 32, bf16)
    with torch.autocast(dev.type, dtype=bf16):  # the trainer's case: fp32 embeddings, autocast on
        z = _unit(16384 if big else 64, 128 if big else 32, fp32, dev, gen, True)
        loss = kernels.nt_xent(z, T, backend=backend)
    loss.backward()
    (rz,) = _rounded64(z.detach().bfloat16())
    rz.requires_grad_()
    ref = kernels.nt_xent(rz, T, backend="torch")
    ref.backward()
    _check(rows, "nt_xent autocast(fp32 in)", loss, ref, [z.grad], [rz.grad], M=z.shape[0],
           d=z.shape[1], dtype="float32+autocast")
    nt(8192 if big else 64, 128 if big else 32, fp32)
    for d in ((128, 256) if big else (32,)):
        info(8192 if big else 24, 65536 if big else 200, d, bf16)
    bank(1024 if big else 8, 65536 if big else 100, 128 if big else 32, 1_281_167 if big else 1000, bf16)
    bank(256 if big else 8, 16384 if big else 100, 128 if big else 32, 1_281_167 if big else 1000, bf16,
         "softmax")
    # d not a power of two, and strided rows (a slice of a wider buffer)
    for d in ((96, 200) if big else (24,)):
        nt(4099 if big else 50, d, bf16, tag="nt_xent odd d")
    wide = _unit(8192 if big else 64, 320 if big else 48, bf16, dev, gen)
    zs = wide[:, :128 if big else 32].detach().requires_grad_()
    assert zs.stride(0) != zs.shape[1]
    nt(zs.shape[0], zs.shape[1], bf16, z=zs, tag="nt_xent strided")
    # bit-identical reruns (same inputs, same config: deterministic kernels, no atomics)
    z = _unit(16384 if big else 64, 128 if big else 32, bf16, dev, gen, True)
    outs = []
    for _ in range(2):
        z.grad = None
        loss = kernels.nt_xent(z, T, backend=backend)
        loss.backward()
        outs.append((loss.detach().clone(), z.grad.clone()))
    same = torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    rows.append(dict(check="nt_xent rerun bit-identical", M=z.shape[0], ok=bool(same)))
    log(f"correctness rerun bit-identical: {same}")
    _huge_bank(run, rows, gen, backend)
    return {"seed": seed, "checks": rows, "all_ok": all(r["ok"] for r in rows)}


def _huge_bank(run: Run, rows: list, gen, backend: str) -> None:
    """A bank of more than 2^31 elements (int64 offsets): rows past 2^31 / d are scored and updated.
    Reference: the same loss and update on a compact copy of just the rows touched."""
    import kernels
    dev = run.device
    d = 128 if not run.dry else 16
    n = (2**31 // d + 4096) if not run.dry else 3000
    b, k = (256, 4096) if not run.dry else (8, 64)
    bank = torch.empty(n, d, dtype=torch.bfloat16, device=dev)
    hi = n - 8192 if not run.dry else n - 500  # draw indices from the far end, past 2^31 elements
    bank[hi:] = _unit(n - hi, d, torch.bfloat16, dev, gen)
    q = _unit(b, d, torch.bfloat16, dev, gen, True)
    pos = torch.randint(hi, n, (b,), device=dev, generator=gen)
    neg = torch.randint(hi, n, (b, k), device=dev, generator=gen)
    loss = kernels.bank_nce(q, bank, pos, neg, 0.07, "softmax", backend=backend).loss
    loss.backward()
    used = torch.unique(torch.cat([pos, neg.flatten()]))
    small = bank[used].double()
    remap = lambda t: torch.searchsorted(used, t)  # noqa: E731
    rq = q.detach().double().requires_grad_()
    ref = kernels.bank_nce(rq, small, remap(pos), remap(neg), 0.07, "softmax", backend="torch").loss
    ref.backward()
    _check(rows, "bank_nce > 2^31 elements", loss, ref, [q.grad], [rq.grad], B=b, K=k, d=d, bank=n)
    x = _unit(b, d, torch.float32, dev, gen)
    before = bank[used].clone()
    kernels.bank_update(bank, pos, x, 0.5, backend=backend)
    want = kernels.bank_update_ref(before.float(), remap(pos), x, 0.5, upcast=True)
    err = _rel(bank[used].float(), want.float())
    rows.append(dict(check="bank_update > 2^31 elements", bank=n, d=d, grad_rel_err=err, tol=1e-2,
                     ok=err <= 1e-2))  # bf16 storage: one rounding of the result
    log(f"correctness bank_update > 2^31 elements: {err:.2e}")
    del bank


# -- kernel benchmarks ---------------------------------------------------------------------------
def stage_kernels(run: Run) -> dict:
    from kernels import bench
    probe = run.results["stages"].get("probe", {}).get("result", {})
    rates = probe.get("gemm_tflops", {})
    grid = "tiny" if run.dry else "target"
    providers = ["chunked", "eager"] if run.dry else ["fused", "eager"]
    summary = []
    for dtype, rate_key in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        r = (dict(gemm_tflops=rates[rate_key], copy_gbps=probe["copy_gbps"])
             if rate_key in rates and "copy_gbps" in probe else None)
        for kernel in bench.KERNELS:
            if run.left() < 60:
                summary.append(f"{kernel} {dtype}: skipped, time budget")
                continue
            # one CSV for all kernels (the device tool returns 8 files): bench writes rows as measured
            # into a scratch folder, each row is appended to kernels_bench.csv as the kernel ends
            scratch = run.out.parent / "gpu_check_bench"
            scratch.mkdir(parents=True, exist_ok=True)
            rows = bench.run(kernel, grid, list(bench.MODES), providers, dtype, run.device, scratch, r)
            if dtype == torch.bfloat16 and not run.dry:  # torch.compile once per kernel, at the target
                rows += bench.run(kernel, "target1", list(bench.MODES), ["compile"], dtype, run.device,
                                  scratch, r)
            bench.append_csv(run.out / "kernels_bench.csv", rows)
            summary += _speedups(rows)
    for line in summary:
        log(f"kernels: {line}")
    return {"summary": summary}


def _speedups(rows: list[dict]) -> list[str]:
    """'kernel dtype size mode: fused x ms, eager / fused = r, compile / fused = r, floor %' lines."""
    by = {}
    for r in rows:
        if r["status"] == "ok":
            by.setdefault((r["kernel"], r["dtype"], r["N"], r["K"], r["d"], r["mode"]), {})[r["provider"]] = r
    out = []
    for key, prov in by.items():
        mine = prov.get("fused") or prov.get("chunked")
        if mine is None:
            continue
        ms = float(mine["median_ms"])
        parts = [f"{'fused' if 'fused' in prov else 'chunked'} {ms:.3g} ms"]
        for other in ("eager", "compile"):
            if other in prov:
                parts.append(f"{other}/ours {float(prov[other]['median_ms']) / ms:.2f}x")
        if mine.get("floor_pct"):
            parts.append(f"{mine['floor_pct']}% of floor")
        out.append(f"{key[0]} {key[1]} N={key[2]} K={key[3]} d={key[4]} {key[5]}: " + ", ".join(parts))
    return out


# -- training steps ------------------------------------------------------------------------------
TRAIN_FIELDS = ["date", "device", "torch", "method", "arch", "batch", "views", "image_size", "kernels",
                "median_step_ms", "images_per_s", "peak_gib", "status"]


def _method_setup(name: str, dry: bool):
    from train.methods import build_config, get_method
    cls = get_method(name)
    if cls.clips:
        common = dict(arch="r2plus1d18", image_size=112, frames=16, batch_size=32) if not dry else \
            dict(arch="r3d18", width=8, image_size=16, frames=4, batch_size=4)
    else:
        common = dict(arch="resnet50", image_size=224, batch_size=256) if not dry else \
            dict(arch="resnet18", width=8, cifar_stem=True, image_size=32, batch_size=8, proj_hidden=32,
                 proj_dim=16)
    import dataclasses
    own = {f.name for f in dataclasses.fields(cls.Config)}
    extra = {k: v for k, v in dict(queue_size=65536 if not dry else 64, nce_k=16384 if not dry else 32,
                                   pred_hidden=4096 if not dry else 32).items() if k in own}
    cfg = build_config({"method": name, **common, **extra})
    return cls, cfg


def _train_steps(run: Run, name: str, kernels_mode: str, steps: int, warmup: int) -> dict:
    from pipeline.loaders.batch import Batch
    from train.methods.base import DataInfo
    from train.optim import build_optimizer, peak_lr
    cls, cfg = _method_setup(name, run.dry)
    dev = run.device
    os.environ["INFOVIEW_KERNELS"] = kernels_mode
    channels = (1, 2) if cls.multiview_encoder else (3, 3)
    n_data = 1_281_167 if not run.dry else 512
    torch.manual_seed(0)
    method = cls(cfg, DataInfo(n_data, channels, num_classes=1000 if not run.dry else 10, clips=cls.clips),
                 1000).to(dev)
    method.attach_probe(1000 if not run.dry else 10)
    method.to(dev)
    opt = build_optimizer(cfg, method.param_groups(cfg.optim.weight_decay), peak_lr(cfg, 1))
    extras = [e.make(e.params) for e in method.extra_optimizers()]
    B, S = cfg.data.batch_size, cfg.data.image_size
    shape = (B, None, cfg.data.frames, S, S) if cls.clips else (B, None, S, S)
    views = [torch.rand(*[c if s is None else s for s in shape], device=dev) for c in channels]
    index = torch.randperm(n_data, device=dev)[:B]
    label = torch.randint(0, 10, (B,), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for step in range(warmup + steps):
        batch = Batch(views=views, index=(index + step) % n_data, label=label)
        run.sync()
        t = time.perf_counter()
        with autocast:
            total, _ = method(batch, step)
        total.backward()
        opt.step()
        for o in extras:
            o.step()
        opt.zero_grad(set_to_none=True)
        for o in extras:
            o.zero_grad(set_to_none=True)
        method.after_step(step)
        method.run_deferred()
        run.sync()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return dict(method=name, arch=cfg.model.arch, batch=B, views=len(views), image_size=S,
                kernels=kernels_mode, median_step_ms=round(ms, 2),
                images_per_s=round(B * 1e3 / ms, 1), peak_gib=round(peak, 2), status="ok")


def stage_train(run: Run) -> dict:
    from kernels.bench import device_name
    from train.methods import known
    path = run.out / "train_steps.csv"
    base = dict(date=run.results["date"], device=device_name(run.device), torch=torch.__version__)
    rows = []
    methods = known() if not run.dry else ["simclr", "mocov2", "instdisc"]
    steps, warmup = (8, 3) if not run.dry else (2, 1)
    for name in methods:
        for mode in ("auto", "torch"):
            if run.left() < 30:
                row = dict(base, method=name, kernels=mode, status="skipped: time budget")
            else:
                try:
                    row = dict(base, **_train_steps(run, name, mode, steps, warmup))
                except Exception as e:  # noqa: BLE001 - recorded, the next method runs
                    row = dict(base, method=name, kernels=mode, status=f"error: {type(e).__name__}: {e}"[:300])
                finally:
                    os.environ.pop("INFOVIEW_KERNELS", None)
                    if run.device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            new = not path.exists()
            with path.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=TRAIN_FIELDS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)
            log(f"train {name} kernels={mode}: {row.get('median_step_ms', '')} ms/step "
                f"{row.get('images_per_s', '')} img/s {row['status']}")
    return {"rows": rows}


# -- DALI ----------------------------------------------------------------------------------------
def stage_dali(run: Run) -> dict:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"nvidia.dali does not import ({e}); carry it (tools/gpu_check.sh --help)"}
    from pipeline import build_loader
    from pipeline.convert import ConvertConfig, convert
    from pipeline.synthetic.images import make
    work = Path(os.environ.get("INFOVIEW_GPU_WORK", "/tmp/infoview_gpu_check"))
    data = work / "data"
    n_per, classes = (100, 30) if not run.dry else (6, 4)  # ImageNet-like sides, 150-800 px
    if not (data / "train" / "manifest.json").exists():
        make(work / "src", classes=classes, train_per_class=n_per, val_per_class=1, seed=0, progress=False)
        convert(ConvertConfig(src=str(work / "src"), out=str(data), split="train", shard_size=256,
                              workers=min(8, os.cpu_count() or 2), progress=False))
    size, batch = (224, 256) if not run.dry else (32, 8)
    out = {}
    for label, device, threads in (("gpu", str(run.device), 8), ("cpu", "cpu", os.cpu_count() or 2)):
        if run.dry and label == "gpu":
            device, graph = "cpu", "fused"  # the GPU graph's code with CPU operators
        else:
            graph = None
        loader = build_loader(data, "train", "simclr", "dali", batch_size=batch, image_size=size, device=device,
                              num_threads=threads, dali_graph=graph)
        it = iter(loader)
        next(it)
        n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
        limit = 20 if not run.dry else 3
        for _ in range(limit):
            b = next(it, None)
            if b is None:
                break
            n += len(b)
        run.sync()
        wall = time.perf_counter() - t0
        out[label] = dict(images_per_s=round(n / wall, 1), cpu_cores_used=round((time.process_time() - cpu0) / wall, 2),
                          threads=threads, batches=limit)
        loader.close()
        log(f"dali {label}: {out[label]}")
    if "gpu" in out and "cpu" in out:
        out["gpu_over_cpu"] = round(out["gpu"]["images_per_s"] / max(out["cpu"]["images_per_s"], 1e-9), 2)
    out["data_wait"] = _data_wait(run, data)
    return out


def _data_wait(run: Run, data: Path) -> dict:
    """A short SimCLR run through the real trainer and loader: the data-wait share of step time."""
    from train.methods import parse_config
    from train.trainer import Trainer
    args = ["--method", "simclr", "--data", str(data), "--epochs", "100", "--log-every", "5", "--knn-every", "0",
            "--progress", "false", "--out", str(run.out.parent / "gpu_check_run")]
    args += (["--arch", "resnet50", "--image-size", "224", "--batch-size", "256", "--max-steps", "40"]
             if not run.dry else ["--arch", "resnet18", "--width", "8", "--cifar-stem", "--image-size", "32",
                                  "--batch-size", "8", "--max-steps", "6", "--proj-hidden", "32", "--proj-dim", "16"])
    cfg = parse_config(args)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = [json.loads(x) for x in (Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()]
    warm = 10 if not run.dry else 1  # cuDNN autotuning, allocator growth and the tuner's timing
    train = [r for r in rows if r["kind"] == "train" and r["step"] > warm]
    waits = [r["data_wait_pct"] for r in train]
    res = {"data_wait_pct": round(statistics.mean(waits), 2) if waits else None,
           "images_per_s": round(statistics.mean(r["images_per_s"] for r in train), 1) if train else None}
    log(f"dali data wait: {res}")
    return res


# -- driver --------------------------------------------------------------------------------------
RUNNERS = {"probe": stage_probe, "compile": stage_compile, "tests": stage_tests,
           "correctness": stage_correctness, "kernels": stage_kernels, "train": stage_train, "dali": stage_dali}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: results/gpu; a dry run: results/gpu-dry, ignored by git)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma list from {','.join(STAGES)} (default: all, in that order)")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="stop starting new work after this many seconds (default 480: a rerun still "
                             "fits a 15-minute device lease)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: every stage at toy sizes on the CPU (checks the script itself)")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device. This script measures the GPU path and needs one; "
              "on a CPU machine run `python -m tools.gpu_check --dry-run` to check the script itself.",
              file=sys.stderr)
        return NO_CUDA
    args.out = args.out or ROOT / "results" / ("gpu-dry" if args.dry_run else "gpu")
    run = Run(args.out, args.dry_run, args.budget_s)
    failed = []
    for name in stages:
        if run.left() <= 0:
            run.results["stages"][name] = {"skipped": "time budget"}
            continue
        log(f"== {name} ({run.left():.0f} s left)")
        t = time.monotonic()
        try:
            result = RUNNERS[name](run)
            run.results["stages"][name] = {"result": result, "seconds": round(time.monotonic() - t, 1)}
        except Exception as e:  # noqa: BLE001 - recorded, the next stage runs
            failed.append(name)
            run.results["stages"][name] = {"error": f"{type(e).__name__}: {e}",
                                           "traceback": traceback.format_exc()[-4000:],
                                           "seconds": round(time.monotonic() - t, 1)}
            log(f"{name} FAILED: {type(e).__name__}: {e}")
        finally:
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
        run.save()
    corr = run.results["stages"].get("correctness", {}).get("result", {})
    if corr and not corr.get("all_ok", True):
        failed.append("correctness (a check failed)")
    log(f"done in {time.monotonic() - run.t0:.0f} s; results in {args.out}"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Backend selection, interpreter wiring, and that every Triton kernel compiles for a real GPU.

The cross-compile tests need no GPU: triton ships ptxas, so every kernel variant, launched the way
the public functions launch it, is compiled to a Hopper (sm_90) cubin with every config the tuner
may pick (kernels.compile_check). That checks what the interpreter cannot: bf16 / tf32 tl.dot on
tensor cores, loop-carried types, shared-memory fit, registers and spills.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
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


@pytest.fixture(scope="module")
def sm90_compiles():
    """Every kernel variant the public functions launch (bf16, fp32-tf32, fp32-IEEE; BLOCK_D 128 and
    256; every anchor / queue / bank mode; with and without gradients) compiled for sm_90 with the
    largest config the tuner admits for it (kernels.compile_check), in two processes. The largest
    (first) admitted tile is the one nearest the smem / register limits; every admitted config
    (~2.3x the compiles, ~3 min here) is `python -m kernels.compile_check --jobs 2`, and
    tools/gpu_check.sh runs that on the GPU machine."""
    compile_check = importlib.import_module("kernels.compile_check")
    return compile_check.run(jobs=2, largest=True)


def test_every_admitted_config_fits_sm90(sm90_compiles):
    compile_check = importlib.import_module("kernels.compile_check")
    rows = sm90_compiles
    kernel_names = {r["variant"].split("[")[0] for r in rows}
    assert len(kernel_names) == 14, sorted(kernel_names)
    bad = [(r["variant"], r["config"], r["shared"], r["spill_bytes"]) for r in compile_check.over_limits(rows)]
    assert bad == [], bad


def test_smem_estimate_bounds_the_compiled_size(sm90_compiles):
    """The pruning estimate is an upper bound: a config it admits never needs more than it said."""
    dot = [r for r in sm90_compiles if r["smem_estimate"] != ""]
    assert dot and all(r["shared"] <= r["smem_estimate"] for r in dot), \
        [(r["variant"], r["config"], r["shared"], r["smem_estimate"]) for r in dot if r["shared"] > r["smem_estimate"]]


def test_16bit_and_tf32_dots_use_tensor_cores(sm90_compiles):
    """bf16 / tf32 operands compile to MMA instructions (wgmma for warp-group tiles); IEEE fp32 to FMA."""
    for r in sm90_compiles:
        v = r["variant"]
        if "bank" in v:
            continue
        if "PRECISION=ieee" in v and v.split("[")[1].startswith("ieee"):
            assert not r["mma"], (v, r["config"])
        else:
            assert r["mma"], (v, r["config"])
    wg = [r for r in sm90_compiles if "bank" not in r["variant"] and "w=8" in r["config"]
          and "BLOCK_M=128" in r["config"] and not r["variant"].split("[")[1].startswith("ieee")]
    assert wg and all(r["wgmma"] for r in wg)


def test_every_variant_has_an_admitted_config():
    compile_check = importlib.import_module("kernels.compile_check")
    for v in compile_check.launch_variants():
        assert compile_check.admitted(v), v.name


def test_config_choice_is_bucketed_pruned_and_cached(monkeypatch, tmp_path):
    """Sizes in one power-of-two bucket share a choice; configs over the smem estimate are never
    timed; INFOVIEW_TUNE=off takes the first admissible; INFOVIEW_TUNE_CACHE round-trips choices."""
    nt = importlib.import_module("kernels.nt_xent")
    k = nt._nt_xent_bwd_kernel
    named = {"z_ptr": torch.empty(3, 128, dtype=torch.bfloat16), "n_rows": 5000, "n_cols": 8000, "D": 128}
    cx = {"BLOCK_D": 128, "ROW_IDX": False, "COL_IDX": False, "UPCAST": False, "PRECISION": "ieee"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    key_a = k.tune_key(named, cx)
    assert key_a == k.tune_key({**named, "n_rows": 8191, "n_cols": 4097}, cx)
    assert key_a != k.tune_key({**named, "n_rows": 8193}, cx)
    wide = {**cx, "BLOCK_D": 256}
    fp32 = k.candidates({**wide, "PRECISION": "tf32"}, 4)
    assert fp32 and all(backend_mod.dot_smem_bytes(4, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 256, c.num_stages)
                        <= backend_mod.SMEM_LIMIT for c in fp32)
    assert len(fp32) < len(k.configs)
    assert backend_mod.bucket(1) == 1 and backend_mod.bucket(1000) == 1024 and backend_mod.bucket(1024) == 1024


def test_tune_cache_file_round_trips(monkeypatch, tmp_path):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("INFOVIEW_TUNE_CACHE", str(path))
    monkeypatch.setattr(backend_mod, "_TUNED", {"k1": {"kwargs": {"BLOCK_M": 64}, "num_warps": 4, "num_stages": 2}})
    monkeypatch.setattr(backend_mod, "_TUNE_FILE_LOADED", set())
    backend_mod._save_tune_cache(path)
    monkeypatch.setattr(backend_mod, "_TUNED", {})
    backend_mod._load_tune_cache(path)
    assert backend_mod._TUNED["k1"]["num_warps"] == 4
    path.write_text("{not json")
    monkeypatch.setattr(backend_mod, "_TUNE_FILE_LOADED", set())
    with pytest.raises(RuntimeError, match="delete it to re-tune"):
        backend_mod._load_tune_cache(path)
    monkeypatch.setenv("INFOVIEW_TUNE", "sometimes")
    with pytest.raises(ValueError, match="INFOVIEW_TUNE"):
        backend_mod._tune_mode()

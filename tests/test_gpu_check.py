"""tools/gpu_check.sh, the prepared GPU run, checked where CI can: it stops at once without CUDA,
its dry run goes through every stage at toy sizes, and with the packages the GPU machine lacks
made unimportable (DALI, ffcv, webdataset, simplejpeg, PyAV) every stage but dali still runs."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")

BLOCK = '''
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ffcv", "webdataset", "simplejpeg", "av"} or name.startswith("nvidia.dali"):
            raise ImportError(f"{name} is blocked (simulating the GPU machine)")
        return None
sys.meta_path.insert(0, _Block())
'''


def _env(extra_path=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHON": sys.executable}
    if extra_path:
        env["PYTHONPATH"] = f"{extra_path}:{ROOT}"
    return env


def test_without_cuda_it_stops_at_once_and_says_why():
    r = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no CUDA device" in r.stderr and "--dry-run" in r.stderr


def test_dry_run_goes_through_every_stage(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], cwd=ROOT,
                       env={**_env(), "OUT": str(out), "INFOVIEW_GPU_WORK": str(tmp_path / "work")},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads((out / "gpu_check.json").read_text())
    stages = res["stages"]
    assert list(stages) == ["probe", "correctness", "kernels", "train", "compile", "tests", "dali"]
    assert all("result" in v for v in stages.values()), {k: v.get("error") for k, v in stages.items()}
    assert stages["probe"]["result"]["copy_gbps"] > 0 and stages["probe"]["result"]["gemm_tflops"]["bf16"] > 0
    assert stages["correctness"]["result"]["all_ok"]
    assert stages["compile"]["result"]["compiles"] > 10
    assert stages["dali"]["result"]["data_wait"]["data_wait_pct"] is not None
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    for name in ("kernels_bench.csv", "train_steps.csv", "compile_check.csv"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "kernels_bench.csv") as f:
        benched = {row["kernel"] for row in csv.DictReader(f)}
    from kernels.bench import KERNELS
    assert benched == set(KERNELS), benched


def test_stages_run_without_the_packages_the_gpu_machine_lacks(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--dry-run", "--out", str(out), "--stages",
                        "probe,correctness,kernels,train,dali"], cwd=ROOT, env=_env(tmp_path / "site"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    stages = json.loads((out / "gpu_check.json").read_text())["stages"]
    assert all("result" in stages[s] for s in ("probe", "correctness", "kernels", "train")), stages
    assert "does not import" in stages["dali"]["result"]["skipped"]

"""Smoke test of `python -m kernels.bench`: the tiny grid writes appendable CSVs and PNGs."""
from __future__ import annotations

import csv
import importlib

import pytest

bench = importlib.import_module("kernels.bench")


def test_tiny_grid_writes_csv_and_png(tmp_path):
    argv = ["--grid", "tiny", "--modes", "fwd,fwd_bwd", "--out", str(tmp_path)]
    if not bench.torch.cuda.is_available():
        argv += ["--providers", "chunked,eager"]
    rows = bench.main(argv)
    assert {r["kernel"] for r in rows} == set(bench.KERNELS)
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows)
    bench.main(argv + ["--kernels", "bank_nce", "--no-plot"])  # second run appends
    for kernel in bench.KERNELS:
        with open(tmp_path / f"{kernel}.csv") as f:
            written = list(csv.DictReader(f))
        assert list(written[0]) == bench.FIELDS
        assert len(written) == (8 if kernel == "bank_nce" else 4)
        assert written[0]["torch"] == bench.torch.__version__ and written[0]["device"]
        assert (tmp_path / f"{kernel}.png").stat().st_size > 0


def test_cli_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--kernels", "simclr"])
    assert "unknown ['simclr']" in capsys.readouterr().err


def test_rows_are_written_as_measured_and_errors_are_recorded(tmp_path, monkeypatch):
    """A failing measurement (any exception, not only OOM) becomes a row with its status; the rows
    before and after it are in the CSV; each (size, provider) is built once for all modes."""
    calls = {"build": 0, "measure": 0}
    real_build, real_measure = bench.build, bench.measure

    def build(*a, **k):
        calls["build"] += 1
        return real_build(*a, **k)

    def measure(fn, grads, device):
        calls["measure"] += 1
        if calls["measure"] == 2:
            raise RuntimeError("boom\nsecond line")
        return real_measure(fn, grads, device)

    monkeypatch.setattr(bench, "build", build)
    monkeypatch.setattr(bench, "measure", measure)
    rows = bench.run("nt_xent", "tiny", list(bench.MODES), ["chunked"], bench.torch.float32,
                     bench.torch.device("cpu"), tmp_path, dict(gemm_tflops=1.0, copy_gbps=10.0))
    assert calls["build"] == 1 and calls["measure"] == 3
    assert [r["status"] for r in rows] == ["ok", "error: RuntimeError: boom second line", "ok"]
    with open(tmp_path / "nt_xent.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["status"] for r in written] == [r["status"] for r in rows]
    assert float(written[0]["floor_ms"]) > 0 and float(written[0]["floor_pct"]) > 0


def test_floor_work_counts():
    """FLOPs and bytes of the floor: nt_xent fwd is one M x M x d product, fwd_bwd three."""
    f, b = bench.work("nt_xent", "fwd", dict(N=64, d=32), 2)
    assert f == 2 * 32 * 128 * 128 and b == 128 * 32 * 2 + 4 * 128
    f3, _ = bench.work("nt_xent", "fwd_bwd", dict(N=64, d=32), 2)
    assert f3 == 3 * f
    f, b = bench.work("bank_nce", "fwd", dict(N=8, K=100, d=16, bank=1000), 4)
    assert f == 2 * 16 * 8 * 101 and b == 8 * 101 * 16 * 4 + 2 * 8 * 16 * 4

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

"""Shared fixtures: a small synthetic ImageNet-layout tree (with the bad-input zoo) and its conversion."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def synth_src(tmp_path_factory) -> tuple[Path, dict]:
    """6 classes x 12 train images (+ the bad-input zoo), 3 val images per class (flat + csv)."""
    from pipeline.synthetic.images import make, write_bad_files
    src = tmp_path_factory.mktemp("synth")
    make(src, classes=6, train_per_class=12, val_per_class=3, seed=1, progress=False)
    zoo = write_bad_files(src / "train", seed=1)
    (src / "train" / "n99999999_empty").mkdir()  # an empty class folder: keeps its index, is reported
    return src, zoo


@pytest.fixture(scope="session")
def converted(synth_src, tmp_path_factory):
    from pipeline.convert import ConvertConfig, convert
    src, zoo = synth_src
    out = tmp_path_factory.mktemp("conv")
    manifest = convert(ConvertConfig(src=str(src), out=str(out), split="train", shard_size=16, workers=2,
                                     progress=False))
    return out / "train", manifest, zoo

"""No host syncs in the steady-state step: the ops that make CUDA wait for the GPU's queue (a
tensor read on the host: item / bool / float / int, nonzero, unique, masked_select) are counted
with a dispatch mode on CPU, where the same Python runs. Kernels run with INFOVIEW_KERNELS=triton,
so their CUDA-side host logic (not the chunked CPU path) is what is counted.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train_helpers import finish, image_methods, make_method, tiny_config

SYNC_OPS = ("_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
            "masked_select", "_assert_async")


class SyncCounter(TorchDispatchMode):
    """Records every op that reads a tensor back to the host (a sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS and not _in_torch_optim():
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _in_torch_optim() -> bool:
    """torch's optimizers read their `step` counter with .item(); on CUDA that tensor lives on the
    host (not capturable, not fused), so it is no device read: not counted."""
    import traceback
    return any("/torch/optim/" in f.filename for f in traceback.extract_stack(limit=12))


def test_counter_sees_reads():
    """Positive control: the counter catches what the old code did (bool of a tensor, nonzero,
    unique, item)."""
    x = torch.tensor([0.0, 2.0])
    with SyncCounter() as counter:
        bool(x.any())
        x.nonzero()
        torch.unique(x, return_inverse=True)
        x.sum().item()
    assert counter.calls == ["_local_scalar_dense", "nonzero", "_unique2", "_local_scalar_dense"]


@pytest.fixture
def kernels_as_on_cuda(monkeypatch):
    monkeypatch.setenv("INFOVIEW_KERNELS", "triton")


def _batch(method_cls, n=8, size=32, seed=0):
    from pipeline.loaders.batch import Batch
    g = torch.Generator().manual_seed(seed)
    channels = [3] * 2
    views = [torch.rand(n, c, size, size, generator=g) for c in channels]
    return Batch(views=views, index=torch.randperm(64, generator=g)[:n],
                 label=torch.randint(0, 4, (n,), generator=g))


@pytest.mark.parametrize("method", image_methods())
def test_method_step_reads_nothing_back(method, kernels_as_on_cuda):
    """forward + backward + after_step + deferred writes of every method, after its first step
    (InstDisc's NCE estimates Z once there, a read by design)."""
    from train.methods import get_method
    cls = get_method(method)
    cfg = tiny_config(method, {"arch": "resnet18", "width": 8, "cifar_stem": True, "proj_hidden": 32,
                               "pred_hidden": 32, "proj_dim": 16}, queue_size=32, nce_k=16)
    channels = [3, 3] if cls.recipe != "cmc_lab" else [1, 2]
    torch.manual_seed(0)
    m = make_method(cfg, 64, 10, channels)
    m.attach_probe(4)
    for step in range(2):
        b = _batch(cls, seed=step)
        b.views = [v[:, :c] for v, c in zip(b.views, channels)]
        counter = SyncCounter()
        with counter:
            total, _ = m(b, step)
            total.backward()
            finish(m, step)
        if step >= 1:
            assert counter.calls == [], f"{method} step {step}: host reads {counter.calls}"


def test_photometric_decides_on_the_host():
    """Flip, jitter (means taken on the device), grayscale, RandAugment, blur, solarize: all from
    the numpy records, no tensor read back; and the same pixels as the affine evaluated directly."""
    from pipeline.views import torch_ops
    from pipeline.views.params import sample_params
    from pipeline.views.recipes import get_recipe
    for name in ("simclr", "infomin"):
        spec = get_recipe(name, 32)
        n = 12
        params = sample_params(spec, 0, 0, np.arange(n), np.full(n, 48), np.full(n, 40))
        img = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8)
        for v, view in enumerate(spec.views):
            counter = SyncCounter()
            with counter:
                out = torch_ops.photometric(img, params[v], view)
            assert counter.calls == [], (name, v, counter.calls)
            assert out.shape == (n, 3, 32, 32) and torch.isfinite(out).all()


def test_color_affine_parts_is_the_affine():
    from pipeline.views import torch_ops
    from pipeline.views.params import sample_params
    from pipeline.views.recipes import get_recipe
    spec = get_recipe("simclr", 32)
    n = 64
    rec = sample_params(spec, 3, 1, np.arange(n), np.full(n, 48), np.full(n, 40))[0]
    mean = torch.rand(n, 3, dtype=torch.float64)
    A0, b0 = torch_ops.color_affine(rec, mean)
    A, B = torch_ops.color_affine_parts(rec)
    assert torch.equal(A, A0)
    torch.testing.assert_close(torch.bmm(B, mean[:, :, None]).squeeze(-1), b0, rtol=1e-12, atol=1e-12)


def test_kernels_read_nothing_back(kernels_as_on_cuda):
    """nt_xent (default labels, sparse labels, a slice of anchors), info_nce, bank_nce (given Z),
    bank_update: their CUDA-path host code issues no read."""
    import kernels
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1).requires_grad_()
    labels = torch.arange(24) % 12
    bank = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    counter = SyncCounter()
    with counter:
        kernels.nt_xent(z, 0.2).backward()
        kernels.nt_xent(z, 0.2, labels=labels * 1000, anchors=slice(0, 12)).backward()
        kernels.info_nce(z[:8], z[8:16], z[16:], temperature=0.2).backward()
        q = z[:6]
        out = kernels.bank_nce(q, bank, torch.arange(6), torch.randint(0, 50, (6, 10), generator=g),
                               0.2, "nce", torch.tensor(50.0))
        out.loss.backward()
        kernels.bank_update(bank, torch.tensor([1, 3, 3, 7]), z[:4].detach(), 0.5)
    assert counter.calls == [], counter.calls


@pytest.mark.parametrize("seed", range(3))
def test_dense_groups_keep_the_equalities(seed):
    import importlib
    nt = importlib.import_module("kernels.nt_xent")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-5, 10**9, (40,), generator=g)
    labels[::3] = labels[0]  # repeats
    groups = nt.dense_groups(labels)
    assert torch.equal(groups[:, None] == groups[None, :], labels[:, None] == labels[None, :])
    assert groups.min() == 0 and groups.max() == torch.unique(labels).numel() - 1
    with pytest.raises(TypeError, match="integer"):
        nt.dense_groups(labels.double())


@pytest.mark.parametrize("method", ["simclr", "mocov2", "instdisc"])
def test_trainer_steps_between_log_steps_read_nothing(converted, tmp_path, method, kernels_as_on_cuda):
    """The whole loop (next batch, forward, backward, optimizer, EMA / queue / bank writes, finite
    tracking, probe counts): runs of 3 and 7 steps with no log step between them make the same number
    of host reads; the extra steps add none."""
    from train.methods import parse_config
    from train.trainer import Trainer
    split_dir, _, _ = converted
    counts = []
    for steps in (3, 7):
        cfg = parse_config(["--method", method, "--data", str(split_dir.parent), "--arch", "resnet18",
                            "--width", "8", "--cifar-stem", "--image-size", "32", "--proj-hidden", "32",
                            "--proj-dim", "16", "--batch-size", "8", "--epochs", "1", "--max-steps",
                            str(steps), "--log-every", "1000", "--knn-every", "0", "--progress", "false",
                            "--online-probe", "true", "--out", str(tmp_path / f"{method}{steps}"),
                            *(["--queue-size", "32"] if method == "mocov2" else []),
                            *(["--nce-k", "16"] if method == "instdisc" else [])])
        trainer = Trainer(cfg)
        counter = SyncCounter()
        try:
            with counter:
                trainer.train()
        finally:
            trainer.close()
        counts.append(len(counter.calls))
    assert counts[0] == counts[1], counts

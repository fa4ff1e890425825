"""The trainer's methods consume `build_loader` batches of every training recipe (the pipeline issue's
"the trainer can consume build_loader for every recipe"): a method built for the recipe's views takes a
few optimizer steps on real batches with finite losses and gradients reaching the backbone."""

from __future__ import annotations

import pytest
import torch

from pipeline import build_loader
from pipeline.views.recipes import RECIPES
from train_helpers import call, finish, make_method, tiny_config

# recipe -> a method that trains on it (CMC needs the split colour views; the others take RGB views)
PAIRS = {"instdisc": "instdisc", "simclr": "simclr", "mocov2": "mocov2", "byol": "byol", "infomin": "infomin", "cmc_lab": "cmc",
         "cmc_ycbcr": "cmc", "cmc_ydbdr": "cmc", "multicrop": "simclr"}


def test_every_training_recipe_is_paired():
    assert set(PAIRS) == set(RECIPES) - {"eval"}


@pytest.mark.parametrize("recipe", list(PAIRS))
def test_method_consumes_recipe(converted, recipe):
    method = PAIRS[recipe]
    split_dir = converted[0]
    cfg = tiny_config(method, {"recipe": recipe, "arch": "resnet18", "width": 8, "cifar_stem": True,
                               "proj_hidden": 32, "pred_hidden": 32, "proj_dim": 16}, queue_size=16, nce_k=16)
    loader = build_loader(split_dir.parent, "train", recipe, "dali", batch_size=8, image_size=32, seed=1)
    try:
        batches = [b for _, b in zip(range(2), loader)]
    finally:
        loader.close()
    torch.manual_seed(0)
    m = make_method(cfg, loader.sampler.num_samples, 10, [v.shape[1] for v in batches[0].views])
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
    for step, b in enumerate(batches):
        loss = call(m, b.views, b.index, step)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss), (recipe, step)
        grads = [p.grad for p in m.backbone.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        opt.step()
        finish(m, step)


def test_instdisc_decodes_one_view_only():
    """Instance discrimination contrasts one view against the memory bank: its recipe builds one view,
    so the loader decodes and augments nothing it would throw away."""
    from train.methods import get_method
    from pipeline.views.recipes import get_recipe
    spec = get_recipe(get_method("instdisc").recipe, 32)
    assert len(spec.views) == 1 and spec.views[0].crop.scale == (0.2, 1.0) and spec.views[0].blur is None

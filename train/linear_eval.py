"""Linear probe on frozen features.

    python train/linear_eval.py --backbone RUN_DIR/backbone.safetensors --data OUT --out result.json
    python train/linear_eval.py --random-init --arch resnet18 --data OUT --out random.json

Features of train/ and val/ (or, without val/, every --holdout-th train sample by global index as the
test set) are extracted once through the pipeline's center-crop eval recipe (CMC backbones: the same
colour split as in training), standardised with train statistics, and a softmax classifier is trained
on them with full-batch L-BFGS and a small L2 penalty. Writes {"top1": ..., "top5": ...} (percent) plus
the setup to --out. Also reports kNN (k=20, 200) on the same features.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", help="RUN_DIR/backbone.safetensors (written by pretrain)")
    p.add_argument("--random-init", action="store_true", help="a randomly initialised encoder instead")
    p.add_argument("--arch", default="resnet18",
                   help="with --random-init: resnet18, resnet34, resnet50, vit_tiny, vit_small; video: r3d18, r2plus1d18")
    p.add_argument("--width", type=int, default=64, help="with --random-init: first-stage width")
    p.add_argument("--cifar-stem", action="store_true", help="with --random-init: 3x3 stem, no max-pool")
    p.add_argument("--patch-size", type=int, default=0, help="with --random-init of a ViT: patch size (0: 16)")
    p.add_argument("--data", required=True, help="converted dataset root (train/ and optionally val/)")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--format", choices=["wds", "ffcv"], default="wds")
    p.add_argument("--image-size", type=int, default=0, help="eval crop (0: the backbone's training size, or 224)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--frames", type=int, default=0,
                   help="video data: frames of the eval clip (0: the backbone's training value, or 8)")
    p.add_argument("--stride", type=int, default=0,
                   help="video data: frame step of the eval clip (0: the backbone's training value, or 2)")
    p.add_argument("--holdout", type=int, default=10, help="without val/: every N-th train sample is the test set")
    p.add_argument("--l2", type=float, default=1e-4, help="L2 penalty of the probe")
    p.add_argument("--iters", type=int, default=200, help="L-BFGS iterations")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if bool(a.backbone) == a.random_init:
        p.error("give exactly one of --backbone and --random-init")
    if a.holdout < 2 or a.batch_size < 1 or a.iters < 1 or a.l2 < 0:
        p.error("--holdout >= 2, --batch-size >= 1, --iters >= 1, --l2 >= 0")
    return a


def train_probe(xtr, ytr, num_classes: int, l2: float, iters: int) -> torch.nn.Linear:
    lin = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), ytr) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def topk(logits, y, k):
    k = min(k, logits.shape[1])
    return 100.0 * (logits.topk(k, 1).indices == y[:, None]).any(1).float().mean().item()


def main(argv=None) -> dict:
    a = parse(argv)
    from pipeline import build_loader
    from train.knn import extract, knn_classify, split_holdout
    from train.models import build_backbone, load_backbone
    from pipeline.loaders.loader import FORMAT_BACKENDS

    torch.manual_seed(a.seed)
    if a.random_init:
        size = a.image_size or 224
        vit = {"image_size": size, "patch_size": a.patch_size} if a.arch.startswith("vit") else {}
        net, meta = build_backbone(a.arch, a.width, a.cifar_stem, **vit), {}
    else:
        net = load_backbone(a.backbone)
        from safetensors import safe_open
        with safe_open(a.backbone, "pt") as f:
            meta = f.metadata()
        size = a.image_size or int(meta.get("image_size", 224))
    recipe = "eval"
    if meta.get("channels"):  # CMC: the training recipe's colour split, center-cropped
        from pipeline.views.recipes import center_crop_views, get_recipe
        recipe = center_crop_views(get_recipe(meta["recipe"], size), size)

    from pipeline.format.layout import manifest_kind
    try:  # video data: one centred clip per video (pipeline/loaders/clips.py)
        video = manifest_kind(Path(a.data) / "train") == "video"
    except (OSError, ValueError):
        video = False  # the loader reports the missing / unreadable split
    frames, stride = a.frames or int(meta.get("frames", 8)), a.stride or int(meta.get("stride", 2))

    def feats(split):
        if video:
            from pipeline.loaders.clips import build_clip_loader
            ld = build_clip_loader(a.data, split, "eval", batch_size=a.batch_size, frames=frames, stride=stride,
                                   image_size=size, seed=a.seed, mode="eval")
        else:
            ld = build_loader(a.data, split, recipe, FORMAT_BACKENDS[a.format], batch_size=a.batch_size, image_size=size,
                              seed=a.seed, mode="eval")
        out = extract(net, ld, torch.device("cpu"))
        ld.close()
        return out

    f, y, i = feats("train")
    if (Path(a.data) / "val").is_dir():
        xtr, ytr = f, y
        xte, yte, _ = feats("val")
    else:
        xtr, ytr, xte, yte = split_holdout(f, y, i, a.holdout)
    knn = knn_classify(xtr, ytr, xte, yte)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    c = int(torch.cat([ytr, yte]).max()) + 1
    lin = train_probe((xtr - mu) / sd, ytr, c, a.l2, a.iters)
    with torch.no_grad():
        logits = lin((xte - mu) / sd)
    res = {"top1": topk(logits, yte, 1), "top5": topk(logits, yte, 5), **knn,
           "num_train": int(xtr.shape[0]), "num_test": int(xte.shape[0]), "num_classes": c,
           "encoder": "random-init" if a.random_init else str(a.backbone), "image_size": size}
    if video:
        res.update(frames=frames, stride=stride)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()

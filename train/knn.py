"""kNN monitor (Wu et al. 2018): cosine similarity of frozen features, top-k neighbours vote with
weights exp(sim / T). The bank is the train split through the eval recipe; queries are val/ or,
without it, every `holdout`-th train sample by global index (those are then left out of the bank).
Features are extracted per rank from its shard and gathered, so every rank gets the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import all_gather_varlen


@torch.no_grad()
def extract(backbone: nn.Module, loader, device, autocast=None, normalize: bool = True,
            gather: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float32 features, L2-normalised unless `normalize=False`; labels; global indices) over the
    split: with `gather`, every rank's shard gathered and sorted by index (the same on every rank);
    without, this rank's shard only. The backbone runs in eval mode, on views of its own dtype."""
    was = backbone.training
    backbone.eval()
    dtype = next(backbone.parameters()).dtype
    feats, labels, idx = [], [], []
    for batch in loader:
        views = [v.to(device, dtype=dtype, non_blocking=True) for v in batch.views]
        x = views if hasattr(backbone, "encoders") else views[0]
        if autocast is not None:
            with autocast():
                f = backbone(x)
        else:
            f = backbone(x)
        feats.append(F.normalize(f.float(), dim=1) if normalize else f.float())
        labels.append(batch.label.to(device))
        idx.append(batch.index.to(device))
    backbone.train(was)
    f, y, i = torch.cat(feats), torch.cat(labels), torch.cat(idx)
    if not gather:
        return f, y, i
    f, y, i = all_gather_varlen(f), all_gather_varlen(y), all_gather_varlen(i)
    order = torch.argsort(i)
    return f[order], y[order], i[order]


@torch.no_grad()
def knn_classify(bank_f, bank_y, query_f, query_y, ks=(20, 200), temperature=0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> dict[str, float]:
    """Top-1 accuracy (percent) of the weighted kNN vote for each k."""
    c = int(num_classes or int(torch.cat([bank_y, query_y]).max()) + 1)
    kmax = min(max(ks), bank_f.shape[0])
    correct = {k: 0 for k in ks}
    for s in range(0, query_f.shape[0], chunk):
        sim = query_f[s:s + chunk] @ bank_f.T
        top_s, top_i = sim.topk(kmax, dim=1)
        w = (top_s / temperature).exp()
        votes_y = bank_y[top_i]
        for k in ks:
            kk = min(k, kmax)
            scores = torch.zeros(sim.shape[0], c, device=sim.device)
            scores.scatter_add_(1, votes_y[:, :kk], w[:, :kk])
            correct[k] += int((scores.argmax(1) == query_y[s:s + chunk]).sum())
    n = max(query_f.shape[0], 1)
    return {f"knn@{k}": 100.0 * correct[k] / n for k in ks}


def split_holdout(f, y, idx, holdout: int):
    """(bank_f, bank_y, query_f, query_y) with every holdout-th global index as a query."""
    q = (idx % holdout) == 0
    return f[~q], y[~q], f[q], y[q]

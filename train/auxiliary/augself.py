"""AugSelf (Lee et al. 2021, "Improving transferability of representations via augmentation-aware
self-supervision"): an auxiliary task on the backbone features of two views, usable with any base method.

Per augmentation type an MLP on concat(y1, y2) (symmetrised: also concat(y2, y1) with the reversed
difference) predicts the difference of the two views' applied parameters, read from the batch's
augmentation records (`Batch.aug`, pipeline/views/params.py: the parameters the loader really applied):

  crop   (4)  Δ(centre y, centre x) in units of the source height / width (x mirrored for a flipped
              view) and Δ(height, width) fractions; MSE of tanh(prediction)
  color  (4)  Δ of (b-1, c-1, s-1) / factor range width and hue / hue range (0 where jitter was not
              applied); MSE of tanh(prediction); only when a view has colour jitter
  flip   (1)  whether both views were flipped alike; binary cross-entropy; only when a view flips

Loss = sum of the types' losses (each weight 1, the reference's default). Differences from the
reference: it mirrors the centres of both views by the first view's flip (`center2[f1, 1]`); here each
view's centre is mirrored by its own flip, which is what the parameter means. Its predictor is a 3-layer
MLP of hidden 512; here the project's head MLP (Linear-BN-ReLU twice, Linear) of `--aux-hidden`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import mlp
from ..models.norm import upcast


def _jitter_scale(view) -> torch.Tensor:
    """Range widths of a view's brightness, contrast, saturation factors and hue shift (1 where absent
    or empty, so the normalised difference stays finite)."""
    j = view.jitter
    if j is None:
        return torch.ones(4, dtype=torch.float64)
    w = [(1 + j.brightness) - max(0.0, 1 - j.brightness), (1 + j.contrast) - max(0.0, 1 - j.contrast),
         (1 + j.saturation) - max(0.0, 1 - j.saturation), 2 * j.hue]
    return torch.tensor([v if v > 0 else 1.0 for v in w], dtype=torch.float64)


def crop_params(rec: dict) -> torch.Tensor:
    """(B, 4) centre y, centre x (mirrored when flipped), height, width as fractions of the source."""
    top, left, h, w = rec["crop"].double().unbind(1)
    H, W = rec["size"].double().unbind(1)
    cy, cx = (top + h / 2) / H, (left + w / 2) / W
    cx = torch.where(rec["flip"].bool(), 1 - cx, cx)
    return torch.stack([cy, cx, h / H, w / W], 1)


def color_params(rec: dict, scale: torch.Tensor) -> torch.Tensor:
    """(B, 4) normalised jitter factors: (b-1, c-1, s-1) / range width, hue / hue range; 0 when off."""
    f = rec["jitter"].double() - torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=rec["jitter"].device)
    return torch.where(rec["jitter_on"].bool()[:, None], f / scale.to(f.device), torch.zeros_like(f))


def targets(rec1: dict, rec2: dict, scale1: torch.Tensor, scale2: torch.Tensor) -> dict[str, torch.Tensor]:
    """View 1 minus view 2: crop (B, 4), color (B, 4), flip (B, 1) same-flip indicator."""
    return {"crop": crop_params(rec1) - crop_params(rec2),
            "color": color_params(rec1, scale1) - color_params(rec2, scale2),
            "flip": (rec1["flip"].bool() == rec2["flip"].bool()).double()[:, None]}


class AugSelf(nn.Module):
    """The predictors and the loss; `views` are the recipe's two ViewSpecs (their jitter ranges)."""

    def __init__(self, feat_dim: int, views, hidden: int = 512, sync_bn: bool = False):
        super().__init__()
        if len(views) < 2:
            raise ValueError("AugSelf needs a recipe with two views (it predicts their parameter difference)")
        v1, v2 = views[0], views[1]
        self.types = ["crop"]
        if v1.jitter is not None or v2.jitter is not None:
            self.types.append("color")
        if v1.flip_p > 0 or v2.flip_p > 0:
            self.types.append("flip")
        self.heads = nn.ModuleDict({t: mlp(2 * feat_dim, hidden, 1 if t == "flip" else 4, layers=3, sync_bn=sync_bn)
                                    for t in self.types})
        self.register_buffer("scale1", _jitter_scale(v1), persistent=False)
        self.register_buffer("scale2", _jitter_scale(v2), persistent=False)

    def forward(self, y1: torch.Tensor, y2: torch.Tensor, rec1: dict, rec2: dict) -> tuple[torch.Tensor, dict]:
        d = targets(rec1, rec2, self.scale1, self.scale2)
        z = torch.cat([torch.cat([y1, y2], 1), torch.cat([y2, y1], 1)], 0)
        total, logs = 0.0, {}
        for t in self.types:
            p = upcast(self.heads[t](z))  # bf16 under autocast: the loss in float32
            if t == "flip":
                loss = F.binary_cross_entropy_with_logits(p, torch.cat([d[t], d[t]]).to(p))
            else:
                loss = F.mse_loss(torch.tanh(p), torch.cat([d[t], -d[t]]).to(p))
            logs[f"augself_{t}"] = loss.detach()
            total = total + loss
        return total, logs

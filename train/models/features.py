"""The `forward_features` contract every backbone keeps.

`net.forward_features(x, outputs=("pooled",))` returns a dict {name: tensor} with exactly the requested
names, computing only as far as the last of them needs; `net.feature_names` lists the names a backbone
offers and `net.feature_dims[name]` the channels of each. "pooled" (B, feat_dim) is always offered and
always equals `net(x)`. Per backbone:

- ResNet: "stage1".."stage4" (B, C, H, W), the outputs of layer1..layer4.
- MultiViewEncoder (CMC): takes the list of views; "pooled" is the concatenation, and each encoder's
  own outputs come as "view{i}.{name}" (e.g. "view0.stage3", "view1.pooled").
- VideoResNet: "stage1".."stage4" (B, C, T, H, W) and "frames" (B, T', C), the last stage pooled over
  space only (one feature per remaining time step).
- VisionTransformer: "tokens" (B, N, D), the patch tokens after the final norm; "pooled" is the class
  token after the final norm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def select_outputs(outputs: str | Iterable[str], available: Sequence[str]) -> tuple[str, ...]:
    """The requested output names, de-duplicated in order; one name may be passed as a plain string
    (iterating it would otherwise ask for its letters)."""
    names = tuple(dict.fromkeys((outputs,) if isinstance(outputs, str) else outputs))
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise ValueError(f"unknown outputs {unknown or '(none requested)'}; available: {', '.join(available)}")
    return names

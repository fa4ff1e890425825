"""Backbones to and from backbone.safetensors: the state dict under torchvision's names (ResNets, video
ResNets) or timm's (ViTs) plus the build metadata, written atomically; `load_backbone` rebuilds the network
from that metadata."""

from __future__ import annotations

import os

import torch.nn as nn

from train.models.registry import backbone_from_meta


def export_backbone(backbone: nn.Module, path: str, extra: dict[str, str] | None = None) -> None:
    """Write the backbone's state dict (plain BN names) to safetensors with its build metadata and `extra`
    (which may add keys but not change a build key: the file would no longer rebuild)."""
    from safetensors.torch import save_file
    meta = backbone.meta()
    clash = {k: (meta[k], v) for k, v in (extra or {}).items() if k in meta and meta[k] != v}
    if clash:
        raise ValueError(f"extra metadata would overwrite build keys (built, given): {clash}")
    sd = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    tmp = f"{path}.tmp"
    save_file(sd, tmp, metadata={**meta, **(extra or {})})
    os.replace(tmp, path)


def load_backbone(path: str) -> nn.Module:
    """Rebuild the backbone recorded in a backbone.safetensors and load it strictly."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "arch" not in meta:
        raise ValueError(f"{path} has no build metadata (arch, ...); not written by export_backbone")
    net = backbone_from_meta(meta)
    net.load_state_dict(load_file(path), strict=True)
    return net

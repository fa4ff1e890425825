"""Backbones by name: the image ResNets and CMC's per-view encoders (train/models/resnet.py), the video
ResNets (train/models/video.py) and the ViTs (train/models/vit.py); `backbone_from_meta` rebuilds one
from the metadata it exports.

Each name maps to a builder `fn(arch, BackboneArgs) -> nn.Module`, added with `@register_backbone(...)`;
the builders live here rather than beside their networks so that the model modules never import the
registry (no import loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from train.models.resnet import MultiViewEncoder, ResNet
from train.models.video import build_video_backbone
from train.models.vit import VisionTransformer


@dataclass(frozen=True)
class BackboneArgs:
    """What `build_backbone` hands a builder; each family reads the fields that apply to it."""
    width: int
    cifar_stem: bool
    sync_bn: bool
    channels: list[int] | None
    in_channels: int
    image_size: int
    patch_size: int


Builder = Callable[[str, BackboneArgs], nn.Module]
_BACKBONES: dict[str, Builder] = {}


def register_backbone(*names: str) -> Callable[[Builder], Builder]:
    """Decorator: register `fn(arch, BackboneArgs) -> nn.Module` under each of `names`."""
    def add(fn: Builder) -> Builder:
        taken = [n for n in names if n in _BACKBONES]
        if taken:
            raise ValueError(f"backbones already registered: {', '.join(taken)}")
        _BACKBONES.update(dict.fromkeys(names, fn))
        return fn
    return add


def known_backbones() -> tuple[str, ...]:
    return tuple(_BACKBONES)


def _no_patch_size(arch: str, a: BackboneArgs) -> None:
    if a.patch_size:
        raise ValueError(f"{arch}: patch_size is for ViTs (got {a.patch_size})")


@register_backbone("resnet18", "resnet34", "resnet50")
def _resnet(arch: str, a: BackboneArgs) -> nn.Module:
    _no_patch_size(arch, a)
    if a.channels is None:
        return ResNet(arch, a.width, a.in_channels, a.cifar_stem, a.sync_bn)
    if a.in_channels != 3:
        raise ValueError(f"{arch}: give either channels (one encoder per view) or in_channels, not both")
    return MultiViewEncoder(arch, a.width, a.channels, a.cifar_stem, a.sync_bn)


@register_backbone("r3d18", "r2plus1d18")
def _video(arch: str, a: BackboneArgs) -> nn.Module:
    _no_patch_size(arch, a)
    if a.channels is not None:
        raise ValueError(f"{arch}: one encoder per view (CMC) is not supported for video backbones")
    return build_video_backbone(arch, a.width, a.sync_bn, a.in_channels)


@register_backbone("vit_tiny", "vit_small")
def _vit(arch: str, a: BackboneArgs) -> nn.Module:
    if a.channels is not None:
        raise ValueError(f"{arch}: one encoder per view (CMC) is built from ResNets only")
    if a.cifar_stem:
        raise ValueError(f"{arch}: cifar_stem is a ResNet stem; give a ViT patch_size 4 or 8 for small images")
    return VisionTransformer(arch, a.in_channels, a.image_size, a.patch_size or 16)


def build_backbone(arch: str, width: int = 64, cifar_stem: bool = False, sync_bn: bool = False,
                   channels: list[int] | None = None, *, in_channels: int = 3, image_size: int = 224,
                   patch_size: int = 0) -> nn.Module:
    """The backbone registered as `arch` (see `known_backbones()`).

    ResNets take (B, in_channels, H, W) images, or CMC's list of views when `channels` (one entry per
    view) is given; video archs (r3d18, r2plus1d18) take (B, in_channels, T, H, W) clips. ViTs take
    images too: `patch_size` (0: 16) and `image_size` set the position grid; `width` and `sync_bn`
    do not apply to them (their width comes with the arch, they have no batch norm). `image_size`
    does not apply to the convolutional networks, which take any size.
    """
    if arch not in _BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(_BACKBONES)}")
    args = BackboneArgs(width, cifar_stem, sync_bn, channels, in_channels, image_size, patch_size)
    return _BACKBONES[arch](arch, args)


def backbone_from_meta(meta: dict[str, str]) -> nn.Module:
    """Rebuild (untrained) the backbone whose `meta()` (as exported) this is. Keys a backbone does not
    write fall back to build_backbone's defaults."""
    channels = [int(c) for c in meta["channels"].split(",")] if meta.get("channels") else None
    return build_backbone(meta["arch"], int(meta.get("width", 64)), bool(int(meta.get("cifar_stem", 0))), False,
                          channels, in_channels=int(meta.get("in_channels", 3)) if channels is None else 3,
                          image_size=int(meta.get("vit_image_size", 224)), patch_size=int(meta.get("patch_size", 0)))

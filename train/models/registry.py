"""Backbones by name: the image ResNets (train/models/resnet.py), CMC's per-view encoders and the video
ResNets (train/models/video.py); `backbone_from_meta` rebuilds one from the metadata it exports."""

from __future__ import annotations

import torch.nn as nn

from train.models.resnet import ARCHS, MultiViewEncoder, ResNet
from train.models.video import VIDEO_ARCHS, build_video_backbone


def build_backbone(arch: str, width: int = 64, cifar_stem: bool = False, sync_bn: bool = False,
                   channels: list[int] | None = None) -> nn.Module:
    """A ResNet on RGB, or CMC's MultiViewEncoder when `channels` (one entry per view) is given.
    Video archs (r3d18, r2plus1d18: train/models/video.py) take (B, C, T, H, W) clips."""
    if arch in VIDEO_ARCHS:
        if channels is not None:
            raise ValueError(f"{arch}: one encoder per view (CMC) is not supported for video backbones")
        return build_video_backbone(arch, width, sync_bn)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join([*ARCHS, *VIDEO_ARCHS])}")
    if channels is not None:
        return MultiViewEncoder(arch, width, channels, cifar_stem, sync_bn)
    return ResNet(arch, width, 3, cifar_stem, sync_bn)


def backbone_from_meta(meta: dict[str, str]) -> nn.Module:
    channels = [int(c) for c in meta["channels"].split(",")] if meta.get("channels") else None
    return build_backbone(meta["arch"], int(meta["width"]), bool(int(meta["cifar_stem"])), False, channels)

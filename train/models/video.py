"""Video backbones R3D-18 and R(2+1)D-18 with torchvision.models.video's parameter names.

torchvision does not import with the CPU torch of this environment, so the networks are written here,
module for module as `torchvision.models.video.resnet` (VideoResNet, BasicBlock, Conv3DSimple,
Conv2Plus1D, BasicStem, R2Plus1dStem): the state-dict keys (stem.0, stem.1, layer1.0.conv1.0.weight,
layer2.0.downsample.0/1, ...) and the initialisation are torchvision's, so at width 64 the output of
`train.models.export.export_backbone` loads into `torchvision.models.video.r3d_18()` / `r2plus1d_18()`
(fc excluded, `strict=False`). Parameter counts at width 64 without fc: r3d18 33,166,272 and
r2plus1d18 31,300,125 (torchvision's 33,371,472 and 31,505,325 include the 400-way fc).

Input: (B, C, T, H, W) float clips; forward returns pooled features (B, 8 * width); `forward_features`
also gives the stage maps and per-frame features (train/models/features.py).

`width` scales every stage (64, 128, 256, 512 at width 64) for tiny CPU tests. R(2+1)D's factorised
convolutions keep torchvision's mid-plane rule (mid = in*out*27 // (in*9 + 3*out), which keeps the
parameter count of the 3x3x3 convolution) at every width; its stem's 45 mid-planes scale as
45 * width // 64.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from train.models.features import select_outputs
from train.models.norm import batch_norm

VIDEO_ARCHS = ("r3d18", "r2plus1d18")


def _bn3d(sync: bool):
    return batch_norm(3, sync)


class Conv3DSimple(nn.Conv3d):
    def __init__(self, in_planes, out_planes, midplanes=None, stride=1, padding=1, norm=None):
        super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=padding, bias=False)

    @staticmethod
    def get_downsample_stride(stride):
        return stride, stride, stride


class Conv2Plus1D(nn.Sequential):
    def __init__(self, in_planes, out_planes, midplanes, stride=1, padding=1, norm=nn.BatchNorm3d):
        super().__init__(
            nn.Conv3d(in_planes, midplanes, kernel_size=(1, 3, 3), stride=(1, stride, stride),
                      padding=(0, padding, padding), bias=False),
            norm(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, kernel_size=(3, 1, 1), stride=(stride, 1, 1),
                      padding=(padding, 0, 0), bias=False))

    @staticmethod
    def get_downsample_stride(stride):
        return stride, stride, stride


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, conv_builder, stride=1, downsample=None, norm=nn.BatchNorm3d):
        midplanes = (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)
        super().__init__()
        self.conv1 = nn.Sequential(conv_builder(inplanes, planes, midplanes, stride, norm=norm), norm(planes),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv_builder(planes, planes, midplanes, norm=norm), norm(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(out + residual)


def basic_stem(width: int, in_channels: int, norm) -> nn.Sequential:
    """R3D stem: 3x7x7 conv, stride (1, 2, 2)."""
    return nn.Sequential(nn.Conv3d(in_channels, width, kernel_size=(3, 7, 7), stride=(1, 2, 2),
                                   padding=(1, 3, 3), bias=False),
                         norm(width), nn.ReLU(inplace=True))


def r2plus1d_stem(width: int, in_channels: int, norm) -> nn.Sequential:
    """R(2+1)D stem: 1x7x7 spatial conv to 45 (at width 64) planes, then 3x1x1 temporal conv."""
    mid = max(1, 45 * width // 64)
    return nn.Sequential(nn.Conv3d(in_channels, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3),
                                   bias=False),
                         norm(mid), nn.ReLU(inplace=True),
                         nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0),
                                   bias=False),
                         norm(width), nn.ReLU(inplace=True))


_SPECS = {"r3d18": (Conv3DSimple, basic_stem, (2, 2, 2, 2)),
          "r2plus1d18": (Conv2Plus1D, r2plus1d_stem, (2, 2, 2, 2))}


class VideoResNet(nn.Module):
    """torchvision-compatible VideoResNet trunk (no fc); forward(B, C, T, H, W) -> (B, feat_dim)."""

    feature_names = ("stage1", "stage2", "stage3", "stage4", "frames", "pooled")
    _last_stage = {"stage1": 1, "stage2": 2, "stage3": 3, "stage4": 4, "frames": 4, "pooled": 4}

    def __init__(self, arch: str = "r3d18", width: int = 64, in_channels: int = 3, sync_bn: bool = False):
        super().__init__()
        if arch not in _SPECS:
            raise ValueError(f"unknown video arch {arch!r}; known: {', '.join(VIDEO_ARCHS)}")
        conv, stem, layers = _SPECS[arch]
        norm = _bn3d(sync_bn)
        self.arch, self.width, self.in_channels = arch, width, in_channels
        self.inplanes = width
        self.stem = stem(width, in_channels, norm)
        self.layer1 = self._make_layer(conv, width, layers[0], 1, norm)
        self.layer2 = self._make_layer(conv, width * 2, layers[1], 2, norm)
        self.layer3 = self._make_layer(conv, width * 4, layers[2], 2, norm)
        self.layer4 = self._make_layer(conv, width * 8, layers[3], 2, norm)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.feat_dim = width * 8 * BasicBlock.expansion
        self.feature_dims = {**{f"stage{i + 1}": width * 2 ** i * BasicBlock.expansion for i in range(4)},
                             "frames": self.feat_dim, "pooled": self.feat_dim}
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, conv, planes, blocks, stride, norm):
        down = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            ds = conv.get_downsample_stride(stride)
            down = nn.Sequential(nn.Conv3d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=ds,
                                           bias=False),
                                 norm(planes * BasicBlock.expansion))
        layers = [BasicBlock(self.inplanes, planes, conv, stride, down, norm)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes, conv, norm=norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["pooled"]

    def forward_features(self, x: torch.Tensor, outputs=("pooled",)) -> dict[str, torch.Tensor]:
        """{name: tensor} for the requested names of `feature_names`; stops after the last stage needed.
        "frames" (B, T', C) is the last stage averaged over space only."""
        want = select_outputs(outputs, self.feature_names)
        if x.dim() != 5:
            raise ValueError(f"{self.arch} wants (B, C, T, H, W) clips, got shape {tuple(x.shape)}")
        out = {}
        x = self.stem(x)
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        for i, layer in enumerate(stages[:max(self._last_stage[n] for n in want)], 1):
            x = layer(x)
            if f"stage{i}" in want:
                out[f"stage{i}"] = x
        if "frames" in want:
            out["frames"] = x.mean(dim=(3, 4)).transpose(1, 2)
        if "pooled" in want:
            out["pooled"] = torch.flatten(self.avgpool(x), 1)
        return {n: out[n] for n in want}

    def meta(self) -> dict[str, str]:
        # cifar_stem "0" stays: earlier backbone_from_meta versions require the key in every file.
        return {"arch": self.arch, "width": str(self.width), "cifar_stem": "0", "in_channels": str(self.in_channels),
                "input": "video"}


def build_video_backbone(arch: str, width: int = 64, sync_bn: bool = False, in_channels: int = 3) -> VideoResNet:
    return VideoResNet(arch, width, in_channels, sync_bn)

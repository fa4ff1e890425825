"""ResNet-18/34/50 backbones with torchvision's parameter names, and CMC's per-view encoders.

torchvision does not import with the CPU torch of this environment, so the networks are written here;
the state-dict keys (conv1, bn1, layer1.0.conv1, ..., layerN.0.downsample.0/1, fc) and the
initialisation follow torchvision.models.resnet, so `export_backbone` output loads into
`torchvision.models.resnet50()` (fc excluded). `width` scales every stage (64 is standard; CMC uses
half width per view); `cifar_stem` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv for small images.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from train.models.norm import batch_norm


def _bn(sync: bool):
    return batch_norm(2, sync)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
         "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """torchvision-compatible ResNet trunk; forward returns pooled features (B, feat_dim), no fc."""

    def __init__(self, arch: str = "resnet18", width: int = 64, in_channels: int = 3,
                 cifar_stem: bool = False, sync_bn: bool = False):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
        block, layers = ARCHS[arch]
        norm = _bn(sync_bn)
        self.arch, self.width, self.cifar_stem, self.in_channels = arch, width, cifar_stem, in_channels
        self.inplanes = width
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make(block, width, layers[0], 1, norm)
        self.layer2 = self._make(block, width * 2, layers[1], 2, norm)
        self.layer3 = self._make(block, width * 4, layers[2], 2, norm)
        self.layer4 = self._make(block, width * 8, layers[3], 2, norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make(self, block, planes, blocks, stride, norm):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 norm(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down, norm)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm=norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def meta(self) -> dict[str, str]:
        return {"arch": self.arch, "width": str(self.width), "cifar_stem": str(int(self.cifar_stem)),
                "in_channels": str(self.in_channels)}


class MultiViewEncoder(nn.Module):
    """CMC: one encoder per view (e.g. L with 1 channel and ab with 2), features concatenated.

    `forward(views)` takes a list of per-view tensors; `encoders[i]` embeds view i.
    """

    def __init__(self, arch: str, width: int, channels: list[int], cifar_stem: bool, sync_bn: bool):
        super().__init__()
        self.encoders = nn.ModuleList(ResNet(arch, width, c, cifar_stem, sync_bn) for c in channels)
        self.feat_dim = sum(e.feat_dim for e in self.encoders)
        self.channels = list(channels)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([e(v) for e, v in zip(self.encoders, views)], 1)

    def meta(self) -> dict[str, str]:
        m = self.encoders[0].meta()
        m["channels"] = ",".join(map(str, self.channels))
        return m

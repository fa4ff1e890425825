"""ResNet-18/34/50 backbones with torchvision's parameter names, and CMC's per-view encoders.

torchvision does not import with the CPU torch of this environment, so the networks are written here;
the state-dict keys (conv1, bn1, layer1.0.conv1, ..., layerN.0.downsample.0/1, fc) and the
initialisation follow torchvision.models.resnet, so `export_backbone` output loads into
`torchvision.models.resnet50()` (fc excluded). `width` scales every stage (64 is standard; CMC uses
half width per view); `cifar_stem` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv for small images.
`forward_features` gives the stage maps as well (train/models/features.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from train.models.features import select_outputs
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

    feature_names = ("stage1", "stage2", "stage3", "stage4", "pooled")
    _last_stage = {"stage1": 1, "stage2": 2, "stage3": 3, "stage4": 4, "pooled": 4}

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
        self.feature_dims = {**{f"stage{i + 1}": width * 2 ** i * block.expansion for i in range(4)},
                             "pooled": self.feat_dim}
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
        return self.forward_features(x)["pooled"]

    def forward_features(self, x: torch.Tensor, outputs=("pooled",)) -> dict[str, torch.Tensor]:
        """{name: tensor} for the requested names of `feature_names`; stops after the last stage needed."""
        want = select_outputs(outputs, self.feature_names)
        out = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        for i, layer in enumerate(stages[:max(self._last_stage[n] for n in want)], 1):
            x = layer(x)
            if f"stage{i}" in want:
                out[f"stage{i}"] = x
        if "pooled" in want:
            out["pooled"] = torch.flatten(self.avgpool(x), 1)
        return {n: out[n] for n in want}

    def meta(self) -> dict[str, str]:
        return {"arch": self.arch, "width": str(self.width), "cifar_stem": str(int(self.cifar_stem)),
                "in_channels": str(self.in_channels)}


class MultiViewEncoder(nn.Module):
    """CMC: one encoder per view (e.g. L with 1 channel and ab with 2), features concatenated.

    `forward(views)` takes a list of per-view tensors; `encoders[i]` embeds view i. `forward_features`
    offers "pooled" (the concatenation) and each encoder's outputs as "view{i}.{name}".
    """

    def __init__(self, arch: str, width: int, channels: list[int], cifar_stem: bool, sync_bn: bool):
        super().__init__()
        self.encoders = nn.ModuleList(ResNet(arch, width, c, cifar_stem, sync_bn) for c in channels)
        self.feat_dim = sum(e.feat_dim for e in self.encoders)
        self.channels = list(channels)
        self.feature_dims = {"pooled": self.feat_dim, **{f"view{i}.{n}": d for i, e in enumerate(self.encoders)
                                                         for n, d in e.feature_dims.items()}}
        self.feature_names = tuple(self.feature_dims)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.forward_features(views)["pooled"]

    def forward_features(self, views: list[torch.Tensor], outputs=("pooled",)) -> dict[str, torch.Tensor]:
        want = select_outputs(outputs, self.feature_names)
        if len(views) != len(self.encoders):
            raise ValueError(f"{len(self.encoders)} encoders (channels {self.channels}) but {len(views)} views")
        out = {}
        for i, (e, v) in enumerate(zip(self.encoders, views)):
            mine = [n.partition(".")[2] for n in want if n.startswith(f"view{i}.")]
            if "pooled" in want:
                mine.append("pooled")
            if mine:
                out.update({f"view{i}.{n}": t for n, t in e.forward_features(v, mine).items()})
        if "pooled" in want:
            out["pooled"] = torch.cat([out[f"view{i}.pooled"] for i in range(len(self.encoders))], 1)
        return {n: out[n] for n in want}

    def meta(self) -> dict[str, str]:
        m = self.encoders[0].meta()
        m["channels"] = ",".join(map(str, self.channels))
        return m

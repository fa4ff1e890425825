"""ResNet-18/50 backbones with torchvision's parameter names, CMC's per-view encoders, MLP heads.

torchvision does not import with the CPU torch of this environment, so the networks are written here;
the state-dict keys (conv1, bn1, layer1.0.conv1, ..., layerN.0.downsample.0/1, fc) and the
initialisation follow torchvision.models.resnet, so `export_backbone` output loads into
`torchvision.models.resnet50()` (fc excluded). `width` scales every stage (64 is standard; CMC uses
half width per view); `cifar_stem` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv for small images.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import all_reduce_with_grad


class _SyncStats:
    """Batch norm whose training statistics cover the global batch of all processes (gloo or NCCL).

    torch.nn.SyncBatchNorm refuses CPU tensors; this all-reduces sums with gradients. It takes the
    same path with one process, so 1-process and N-process runs compute the same numbers.
    Same parameter and buffer names as nn.BatchNorm1d/2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        xf = _up(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        n_local = torch.tensor([x.numel() / c], dtype=xf.dtype, device=x.device)
        s = all_reduce_with_grad(torch.cat([xf.sum(dims), n_local]))
        n = s[-1]
        mean = s[:c] / n
        xc = xf - mean.view(shape)
        var = all_reduce_with_grad((xc * xc).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class SyncBatchNorm2d(_SyncStats, nn.BatchNorm2d):
    pass


class SyncBatchNorm1d(_SyncStats, nn.BatchNorm1d):
    pass


def _bn(sync: bool):
    return SyncBatchNorm2d if sync else nn.BatchNorm2d


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


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, last_bn: bool = False,
        sync_bn: bool = False) -> nn.Sequential:
    """Projection / prediction head: (Linear-BN-ReLU) x (layers-1), Linear (+ BN without affine)."""
    bn1d = SyncBatchNorm1d if sync_bn else nn.BatchNorm1d
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), bn1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    if last_bn:
        mods.append(bn1d(out_dim, affine=False))
    return nn.Sequential(*mods)


def build_backbone(arch: str, width: int = 64, cifar_stem: bool = False, sync_bn: bool = False,
                   channels: list[int] | None = None) -> nn.Module:
    """A ResNet on RGB, or CMC's MultiViewEncoder when `channels` (one entry per view) is given.
    Video archs (r3d18, r2plus1d18: train/models_video.py) take (B, C, T, H, W) clips."""
    if arch in ("r3d18", "r2plus1d18"):
        from .models_video import build_video_backbone
        if channels is not None:
            raise ValueError(f"{arch}: one encoder per view (CMC) is not supported for video backbones")
        return build_video_backbone(arch, width, sync_bn)
    if channels is not None:
        return MultiViewEncoder(arch, width, channels, cifar_stem, sync_bn)
    return ResNet(arch, width, 3, cifar_stem, sync_bn)


def backbone_from_meta(meta: dict[str, str]) -> nn.Module:
    channels = [int(c) for c in meta["channels"].split(",")] if meta.get("channels") else None
    return build_backbone(meta["arch"], int(meta["width"]), bool(int(meta["cifar_stem"])), False, channels)


def export_backbone(backbone: nn.Module, path: str, extra: dict[str, str] | None = None) -> None:
    """Write the backbone's state dict (plain BN names) to safetensors with its build metadata."""
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    tmp = f"{path}.tmp"
    save_file(sd, tmp, metadata={**backbone.meta(), **(extra or {})})
    os.replace(tmp, path)


def load_backbone(path: str) -> nn.Module:
    """Rebuild the backbone recorded in a backbone.safetensors and load it strictly."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "arch" not in meta:
        raise ValueError(f"{path} has no build metadata (arch/width/cifar_stem); not written by export_backbone")
    net = backbone_from_meta(meta)
    net.load_state_dict(load_file(path), strict=True)
    return net


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 activations upcast; float64 kept)."""
    return x if x.dtype == torch.float64 else x.float()


def l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(_up(x), dim=1)


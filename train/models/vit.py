"""Vision Transformers ViT-Ti and ViT-S with timm's VisionTransformer parameter names.

timm does not import with the CPU torch of this environment, so the network is written here after
timm.models.vision_transformer (VisionTransformer with class token, learned absolute position
embedding, pre-norm Blocks, final norm, no head): the state-dict keys (cls_token, pos_embed,
patch_embed.proj, blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2, norm) and shapes are timm's,
so the output of `train.models.export.export_backbone` loads strictly into
`timm.create_model("vit_small_patch16_224", num_classes=0)` (ViT-S, patch 16, 224 px) and gives the
same features: timm's forward with num_classes=0 is the class token after the final norm.

Initialisation follows timm's default scheme (weight_init=''): pos_embed trunc_normal(std .02),
cls_token normal(std 1e-6), every Linear trunc_normal(std .02) with zero bias, LayerNorm ones/zeros
(eps 1e-6); the patch-embedding Conv2d keeps PyTorch's default init, as in timm.

`patch_size` 16 is the standard; 4 or 8 suit CIFAR-size images. `image_size` fixes the number of
positions; an input of another size (a multiple of the patch size, square or not) gets the position
grid resampled bicubically (with antialiasing), as timm does with dynamic_img_size=True.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.features import select_outputs

VIT_ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6)}  # arch: (embed dim, depth, heads)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, D, H / patch, W / patch)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection (with bias), scaled dot product, output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # timm's layout of the qkv output: (3, heads, head_dim) along the feature axis
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm-compatible ViT trunk without head; forward(B, C, H, W) -> class token (B, feat_dim)."""

    feature_names = ("tokens", "pooled")

    def __init__(self, arch: str = "vit_small", in_channels: int = 3, image_size: int = 224, patch_size: int = 16):
        super().__init__()
        if arch not in VIT_ARCHS:
            raise ValueError(f"unknown ViT arch {arch!r}; known: {', '.join(VIT_ARCHS)}")
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"{arch}: image_size {image_size} is not a multiple of patch_size {patch_size}")
        dim, depth, heads = VIT_ARCHS[arch]
        self.arch, self.in_channels, self.image_size, self.patch_size = arch, in_channels, image_size, patch_size
        self.grid = image_size // patch_size
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + self.grid ** 2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = _layer_norm(dim)
        self.feat_dim = dim
        self.feature_dims = {"tokens": dim, "pooled": dim}
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings for a gh x gw patch grid: the trained grid resampled when it differs."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = grid.shape[-1]
        grid = grid.float().reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)  # interpolate wants float32
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, grid], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["pooled"]

    def forward_features(self, x: torch.Tensor, outputs=("pooled",)) -> dict[str, torch.Tensor]:
        """{name: tensor} for the requested names: "tokens" (B, N, D) patch tokens and "pooled" (B, D)
        the class token, both after the final norm."""
        want = select_outputs(outputs, self.feature_names)
        if x.dim() != 4 or x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"{self.arch} wants (B, C, H, W) images with H and W multiples of the patch size "
                             f"{self.patch_size}, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        gh, gw = x.shape[2:]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)
        x = self.norm(self.blocks(x + self._pos_embed(gh, gw)))
        out = {"tokens": x[:, 1:], "pooled": x[:, 0]}
        return {n: out[n] for n in want}

    def meta(self) -> dict[str, str]:
        # vit_image_size, not image_size: the trainer's export records the evaluation size as image_size.
        return {"arch": self.arch, "in_channels": str(self.in_channels), "patch_size": str(self.patch_size),
                "vit_image_size": str(self.image_size)}

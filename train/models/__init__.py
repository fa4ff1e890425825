"""The networks, written here with torchvision's / timm's parameter names (neither imports with this
environment's CPU torch): norm layers (`norm`), the `forward_features` contract (`features`), ResNets and
CMC's per-view encoders (`resnet`), video ResNets (`video`), ViTs (`vit`), heads (`heads`), backbones by
name (`registry`) and safetensors export (`export`)."""

from train.models.export import export_backbone, load_backbone
from train.models.heads import l2n, mlp
from train.models.registry import (BackboneArgs, backbone_from_meta, build_backbone, known_backbones,
                                   register_backbone)
from train.models.resnet import ARCHS, MultiViewEncoder, ResNet
from train.models.video import VIDEO_ARCHS, VideoResNet, build_video_backbone
from train.models.vit import VIT_ARCHS, VisionTransformer

__all__ = ["export_backbone", "load_backbone", "l2n", "mlp", "BackboneArgs", "backbone_from_meta", "build_backbone",
           "known_backbones", "register_backbone", "ARCHS", "MultiViewEncoder", "ResNet", "VIDEO_ARCHS",
           "VideoResNet", "build_video_backbone", "VIT_ARCHS", "VisionTransformer"]

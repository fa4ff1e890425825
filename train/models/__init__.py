"""The networks, written here with torchvision's parameter names (torchvision does not import with this
environment's CPU torch): norm layers (`norm`), ResNets and CMC's per-view encoders (`resnet`), video
ResNets (`video`), heads (`heads`), backbones by name (`registry`) and safetensors export (`export`)."""

from train.models.export import export_backbone, load_backbone
from train.models.heads import l2n, mlp
from train.models.registry import backbone_from_meta, build_backbone
from train.models.resnet import ARCHS, MultiViewEncoder, ResNet
from train.models.video import VIDEO_ARCHS, VideoResNet, build_video_backbone

__all__ = ["export_backbone", "load_backbone", "l2n", "mlp", "backbone_from_meta", "build_backbone", "ARCHS",
           "MultiViewEncoder", "ResNet", "VIDEO_ARCHS", "VideoResNet", "build_video_backbone"]

"""The declarative view spec: what a view *is*, written once, read by every backend.

A `RecipeSpec` is a tuple of `ViewSpec`s. A `ViewSpec` is a crop, a flip probability, photometric ops
(colour jitter, grayscale, blur, solarize, RandAugment), a colour space with a channel selection, and a
normalization. Nothing here draws random numbers or touches pixels: `pipeline.views.params` turns a spec into
per-sample parameter records (a pure function of seed, epoch, global index and view), and the backends
only *apply* records (`pipeline.loaders.dali`, `pipeline.loaders.ffcv`, `pipeline.views.torch_ops`).

Every class is `kw_only=True, slots=True, frozen=True` and checks itself in `__post_init__`: a bad value
fails when the recipe is built, not in the middle of an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

COLOR_SPACES = {"rgb": 3, "lab": 3, "ycbcr": 3, "ydbdr": 3}
# Ops of RandAugment (torchvision's set), all applied batched with per-sample magnitudes (torch_ops).
RANDAUGMENT_OPS = ("identity", "autocontrast", "posterize", "solarize", "color", "contrast", "brightness",
                   "sharpness", "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "equalize")


def _check_range(name: str, r: tuple[float, float], lo: float, hi: float) -> None:
    if len(r) != 2 or not (lo <= r[0] <= r[1] <= hi):
        raise ValueError(f"{name}={r}: want a (min, max) pair with {lo} <= min <= max <= {hi}")


def _check_p(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p}: a probability must be in [0, 1]")


@dataclass(kw_only=True, slots=True, frozen=True)
class CropSpec:
    """Where the view comes from in the source image, and its output size."""
    kind: Literal["random_resized", "center"] = "random_resized"
    """random_resized: torchvision's RandomResizedCrop (10 attempts, then a clamped center crop);
    center: the eval crop (a centered square of `center_fraction` x the shorter side)."""
    size: int = 224
    """Output side in pixels (views are square)."""
    scale: tuple[float, float] = (0.08, 1.0)
    """Range of the crop area as a fraction of the image area (random_resized)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop aspect ratio w/h, sampled log-uniformly (random_resized)."""
    center_fraction: float = 0.875
    """center: crop side / shorter side (0.875 = resize 256, center crop 224)."""

    def __post_init__(self):
        if self.kind not in ("random_resized", "center"):
            raise ValueError(f"CropSpec.kind={self.kind!r}: want 'random_resized' or 'center'")
        if self.size < 1:
            raise ValueError(f"CropSpec.size={self.size}: must be >= 1")
        _check_range("CropSpec.scale", self.scale, 1e-6, 1.0)
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"CropSpec.ratio={self.ratio}: want 0 < min <= max")
        if not 0 < self.center_fraction <= 1:
            raise ValueError(f"CropSpec.center_fraction={self.center_fraction}: want (0, 1]")


@dataclass(kw_only=True, slots=True, frozen=True)
class JitterSpec:
    """torchvision ColorJitter semantics for the factor ranges, applied with probability p."""
    brightness: float = 0.4
    """factor ~ U[max(0, 1 - b), 1 + b]"""
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    """shift ~ U[-h, h] in turns (h <= 0.5); applied as a rotation of the chroma plane in YIQ."""
    p: float = 0.8
    random_order: bool = True
    """Apply the four ops in a per-sample random order (torchvision), else b, c, s, h."""

    def __post_init__(self):
        for n in ("brightness", "contrast", "saturation"):
            if getattr(self, n) < 0:
                raise ValueError(f"JitterSpec.{n}={getattr(self, n)}: must be >= 0")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"JitterSpec.hue={self.hue}: must be in [0, 0.5]")
        _check_p("JitterSpec.p", self.p)


@dataclass(kw_only=True, slots=True, frozen=True)
class BlurSpec:
    """Gaussian blur with probability p; sigma in output pixels, kernel side relative to the view size."""
    p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    kernel_fraction: float = 0.1
    """kernel side = the odd integer nearest to kernel_fraction x view size (SimCLR: 10%), at least 3."""

    def __post_init__(self):
        _check_p("BlurSpec.p", self.p)
        _check_range("BlurSpec.sigma", self.sigma, 1e-3, 100.0)
        if not 0 < self.kernel_fraction <= 1:
            raise ValueError(f"BlurSpec.kernel_fraction={self.kernel_fraction}: want (0, 1]")

    def kernel_size(self, view_size: int) -> int:
        k = int(round(self.kernel_fraction * view_size))
        return max(3, k + 1 - k % 2)


@dataclass(kw_only=True, slots=True, frozen=True)
class RandAugmentSpec:
    """RandAugment (Cubuk et al.): `num_ops` ops drawn uniformly from `ops`, each at `magnitude` out of
    `num_bins - 1` (torchvision's scale), with a random sign for signed ops."""
    num_ops: int = 2
    magnitude: int = 9
    num_bins: int = 31
    ops: tuple[str, ...] = RANDAUGMENT_OPS

    def __post_init__(self):
        if self.num_ops < 1:
            raise ValueError(f"RandAugmentSpec.num_ops={self.num_ops}: must be >= 1")
        if not 0 <= self.magnitude < self.num_bins:
            raise ValueError(f"RandAugmentSpec.magnitude={self.magnitude}: want [0, {self.num_bins})")
        unknown = set(self.ops) - set(RANDAUGMENT_OPS)
        if unknown or not self.ops:
            raise ValueError(f"RandAugmentSpec.ops: unknown {sorted(unknown)}; known: {RANDAUGMENT_OPS}")


@dataclass(kw_only=True, slots=True, frozen=True)
class ColorSpec:
    """Output colour space and the channels kept (CMC: Lab -> L = (0,), ab = (1, 2))."""
    space: Literal["rgb", "lab", "ycbcr", "ydbdr"] = "rgb"
    channels: tuple[int, ...] = (0, 1, 2)
    mean: tuple[float, ...] = IMAGENET_MEAN
    """Per kept channel, in the space's native units (rgb: [0, 1]; lab: L [0, 100]; ycbcr: [0, 255])."""
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if self.space not in COLOR_SPACES:
            raise ValueError(f"ColorSpec.space={self.space!r}: known {sorted(COLOR_SPACES)}")
        if not self.channels or any(c not in range(COLOR_SPACES[self.space]) for c in self.channels) \
                or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"ColorSpec.channels={self.channels}: want distinct channels of {self.space}")
        if len(self.mean) != len(self.channels) or len(self.std) != len(self.channels):
            raise ValueError(f"ColorSpec: mean {self.mean} / std {self.std} need one value per channel "
                             f"{self.channels}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ColorSpec.std={self.std}: must be > 0")


@dataclass(kw_only=True, slots=True, frozen=True)
class ViewSpec:
    """One view: geometry, then photometric ops in this fixed order: jitter, grayscale, RandAugment,
    blur, solarize; then colour space and normalization."""
    crop: CropSpec = field(default_factory=CropSpec)
    flip_p: float = 0.5
    jitter: JitterSpec | None = None
    grayscale_p: float = 0.0
    randaugment: RandAugmentSpec | None = None
    blur: BlurSpec | None = None
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    color: ColorSpec = field(default_factory=ColorSpec)

    def __post_init__(self):
        _check_p("ViewSpec.flip_p", self.flip_p)
        _check_p("ViewSpec.grayscale_p", self.grayscale_p)
        _check_p("ViewSpec.solarize_p", self.solarize_p)
        if not 0 <= self.solarize_threshold <= 1:
            raise ValueError(f"ViewSpec.solarize_threshold={self.solarize_threshold}: want [0, 1]")

    @property
    def size(self) -> int:
        return self.crop.size

    @property
    def num_channels(self) -> int:
        return len(self.color.channels)

    def augmentation(self) -> "ViewSpec":
        """This view with the colour output stripped: views with equal augmentation() may share params."""
        return replace(self, color=ColorSpec())


@dataclass(kw_only=True, slots=True, frozen=True)
class RecipeSpec:
    name: str
    views: tuple[ViewSpec, ...]
    shared_params: bool = False
    """All views use the parameters drawn for view 0 (same crop, flip and photometric draw) and differ
    only in colour space / channels: CMC's L and ab views of one crop."""

    def __post_init__(self):
        if not self.views:
            raise ValueError(f"recipe {self.name!r} has no views")
        if self.shared_params:
            base = self.views[0].augmentation()
            for i, v in enumerate(self.views[1:], 1):
                if v.augmentation() != base:
                    raise ValueError(f"recipe {self.name!r}: shared_params needs views that differ only in "
                                     f"colour; view {i} differs from view 0")

    def param_stream(self, view: int) -> int:
        """Which random stream view `view` draws from (shared recipes: all from stream 0)."""
        return 0 if self.shared_params else view

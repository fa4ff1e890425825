"""Named recipes: functions of the output size returning a `RecipeSpec` (data, no pixel code).

    instdisc   Wu et al. 2018 (lemniscate): ONE view: crop (0.2, 1), gray 0.2, jitter 0.4/0.4/0.4/0.4 always, flip
    simclr     Chen et al. 2020: crop (0.08, 1), flip, jitter 0.8/0.8/0.8/0.2 p=0.8, gray 0.2, blur p=0.5
    mocov2     Chen et al. 2020b: crop (0.2, 1), jitter 0.4/0.4/0.4/0.1 p=0.8, gray 0.2, blur p=0.5
    byol       Grill et al. 2020: asymmetric views, blur p=1.0 / 0.1, solarize p=0 / 0.2
    infomin    Tian et al. 2020 ("InfoMin Aug", PyContrast): mocov2-style views plus RandAugment(2, 10)
    cmc_lab    Tian et al. 2019: one crop, an L view and an ab view of it (Lab, CMC's normalization)
    cmc_ycbcr  CMC's YCbCr split: a Y view and a CbCr view of one crop
    cmc_ydbdr  CMC's YDbDr split: a Y view and a DbDr view of one crop
    multicrop  Caron et al. 2020 (SwAV): 2 x 224 crops (0.14, 1) + 6 x 96 crops (0.05, 0.14)
    eval       center crop (shorter side x 0.875), no augmentation: kNN / linear evaluation

`image_size` rescales every view proportionally (multicrop at image_size=112: 2 x 112 + 6 x 48).

Transforms a run applies to a recipe (the trainer's --no-blur / --crop-min-scale, the eval views of a
multi-view recipe): `without_blur`, `with_crop_min_scale`, `center_crop_views`; `run_recipe` applies
the first two as a run's options ask.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from pipeline.views.spec import BlurSpec, ColorSpec, CropSpec, JitterSpec, RandAugmentSpec, RecipeSpec, ViewSpec

# CMC's normalizations (github.com/HobbitLong/CMC, PyContrast): the value range of each channel mapped
# to [-1, 1]. Lab: L in [0, 100], a in [-86.183, 98.233], b in [-107.857, 94.478].
LAB_MEAN = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)
YCBCR_MEAN = (116.151, 121.080, 132.342)  # on the 0..255 scale
YCBCR_STD = (109.500, 111.855, 111.964)
YDBDR_MEAN = (0.5, 0.0, 0.0)  # Y in [0, 1], Db and Dr in [-1.333, 1.333]
YDBDR_STD = (0.5, 1.333, 1.333)


def _split(space: str, mean, std, first: tuple[int, ...], second: tuple[int, ...]):
    return (ColorSpec(space=space, channels=first, mean=tuple(mean[c] for c in first),
                      std=tuple(std[c] for c in first)),
            ColorSpec(space=space, channels=second, mean=tuple(mean[c] for c in second),
                      std=tuple(std[c] for c in second)))


def instdisc(image_size: int = 224) -> RecipeSpec:
    """Instance discrimination's single view (its memory bank is the other side of every pair). The
    reference applies grayscale before the jitter; here jitter comes first, as in every recipe, which
    only matters for the 20% of grey views (their brightness / contrast factors still apply)."""
    v = ViewSpec(crop=CropSpec(size=image_size, scale=(0.2, 1.0)), flip_p=0.5,
                 jitter=JitterSpec(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4, p=1.0),
                 grayscale_p=0.2)
    return RecipeSpec(name="instdisc", views=(v,))


def simclr(image_size: int = 224) -> RecipeSpec:
    v = ViewSpec(crop=CropSpec(size=image_size, scale=(0.08, 1.0)), flip_p=0.5,
                 jitter=JitterSpec(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, p=0.8),
                 grayscale_p=0.2, blur=BlurSpec(p=0.5, sigma=(0.1, 2.0), kernel_fraction=0.1))
    return RecipeSpec(name="simclr", views=(v, v))


def mocov2(image_size: int = 224) -> RecipeSpec:
    v = ViewSpec(crop=CropSpec(size=image_size, scale=(0.2, 1.0)), flip_p=0.5,
                 jitter=JitterSpec(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
                 grayscale_p=0.2, blur=BlurSpec(p=0.5, sigma=(0.1, 2.0), kernel_fraction=0.1))
    return RecipeSpec(name="mocov2", views=(v, v))


def byol(image_size: int = 224) -> RecipeSpec:
    common = dict(crop=CropSpec(size=image_size, scale=(0.08, 1.0)), flip_p=0.5,
                  jitter=JitterSpec(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8),
                  grayscale_p=0.2)
    # 23 px at 224 = 0.1027 of the side.
    v1 = ViewSpec(**common, blur=BlurSpec(p=1.0, sigma=(0.1, 2.0), kernel_fraction=23 / 224), solarize_p=0.0)
    v2 = ViewSpec(**common, blur=BlurSpec(p=0.1, sigma=(0.1, 2.0), kernel_fraction=23 / 224), solarize_p=0.2)
    return RecipeSpec(name="byol", views=(v1, v2))


def infomin(image_size: int = 224) -> RecipeSpec:
    v = ViewSpec(crop=CropSpec(size=image_size, scale=(0.08, 1.0)), flip_p=0.5,
                 jitter=JitterSpec(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
                 grayscale_p=0.2, randaugment=RandAugmentSpec(num_ops=2, magnitude=10),
                 blur=BlurSpec(p=0.5, sigma=(0.1, 2.0), kernel_fraction=0.1))
    return RecipeSpec(name="infomin", views=(v, v))


def _cmc(name: str, space: str, mean, std, image_size: int) -> RecipeSpec:
    first, second = _split(space, mean, std, (0,), (1, 2))
    geo = dict(crop=CropSpec(size=image_size, scale=(0.2, 1.0)), flip_p=0.5)
    return RecipeSpec(name=name, views=(ViewSpec(**geo, color=first), ViewSpec(**geo, color=second)),
                      shared_params=True)


def cmc_lab(image_size: int = 224) -> RecipeSpec:
    return _cmc("cmc_lab", "lab", LAB_MEAN, LAB_STD, image_size)


def cmc_ycbcr(image_size: int = 224) -> RecipeSpec:
    return _cmc("cmc_ycbcr", "ycbcr", YCBCR_MEAN, YCBCR_STD, image_size)


def cmc_ydbdr(image_size: int = 224) -> RecipeSpec:
    return _cmc("cmc_ydbdr", "ydbdr", YDBDR_MEAN, YDBDR_STD, image_size)


def multicrop(image_size: int = 224, num_global: int = 2, num_local: int = 6) -> RecipeSpec:
    small = max(1, round(96 * image_size / 224))
    photo = dict(flip_p=0.5, jitter=JitterSpec(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, p=0.8),
                 grayscale_p=0.2, blur=BlurSpec(p=0.5, sigma=(0.1, 2.0), kernel_fraction=0.1))
    g = ViewSpec(crop=CropSpec(size=image_size, scale=(0.14, 1.0)), **photo)
    loc = ViewSpec(crop=CropSpec(size=small, scale=(0.05, 0.14)), **photo)
    return RecipeSpec(name="multicrop", views=(g,) * num_global + (loc,) * num_local)


def eval_recipe(image_size: int = 224) -> RecipeSpec:
    return RecipeSpec(name="eval", views=(ViewSpec(crop=CropSpec(kind="center", size=image_size), flip_p=0.0),))


RECIPES: dict[str, Callable[..., RecipeSpec]] = {
    "instdisc": instdisc, "simclr": simclr, "mocov2": mocov2, "byol": byol, "infomin": infomin, "cmc_lab": cmc_lab,
    "cmc_ycbcr": cmc_ycbcr, "cmc_ydbdr": cmc_ydbdr, "multicrop": multicrop, "eval": eval_recipe,
}


def get_recipe(recipe: str | RecipeSpec, image_size: int = 224) -> RecipeSpec:
    """A recipe by name (at `image_size`), or a RecipeSpec passed through unchanged."""
    if isinstance(recipe, RecipeSpec):
        return recipe
    if recipe not in RECIPES:
        raise KeyError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return RECIPES[recipe](image_size=image_size)


# -- transforms a run applies to a recipe ------------------------------------------------------------
def without_blur(spec: RecipeSpec) -> RecipeSpec:
    """`spec` with no Gaussian blur in any view (blur at 32 px destroys what little a view holds)."""
    return dataclasses.replace(spec, name=f"{spec.name}-noblur",
                               views=tuple(dataclasses.replace(v, blur=None) for v in spec.views))


def with_crop_min_scale(spec: RecipeSpec, lo: float) -> RecipeSpec:
    """`spec` with the lower bound of every random-resized crop's area range set to `lo`."""
    views = []
    for i, v in enumerate(spec.views):
        if v.crop.kind == "random_resized":
            if lo > v.crop.scale[1]:
                raise ValueError(f"invalid value for 'crop_min_scale': {lo} is above view {i}'s largest crop "
                                 f"area {v.crop.scale[1]} (recipe {spec.name})")
            v = dataclasses.replace(v, crop=dataclasses.replace(v.crop, scale=(lo, v.crop.scale[1])))
        views.append(v)
    return dataclasses.replace(spec, name=f"{spec.name}-crop{lo:g}", views=tuple(views))


def center_crop_views(spec: RecipeSpec, image_size: int) -> RecipeSpec:
    """The same colour outputs, center-cropped, no flip and no photometric augmentation: the eval views
    of a multi-view recipe (CMC's L and ab views for kNN and the linear probe)."""
    views = tuple(dataclasses.replace(v, crop=CropSpec(kind="center", size=image_size), flip_p=0.0, jitter=None,
                                      grayscale_p=0.0, randaugment=None, blur=None, solarize_p=0.0)
                  for v in spec.views)
    return dataclasses.replace(spec, name=f"{spec.name}_eval", views=views, shared_params=True)


def run_recipe(recipe: str | RecipeSpec, image_size: int, blur: bool = True, crop_min_scale: float = 0.0) -> RecipeSpec:
    """The recipe a run trains on: `recipe` at `image_size`, without blur unless `blur`, with the crop
    area range starting at `crop_min_scale` when it is set."""
    spec = get_recipe(recipe, image_size)
    if not blur:
        spec = without_blur(spec)
    if crop_min_scale:
        spec = with_crop_min_scale(spec, crop_min_scale)
    return spec

"""infoview data pipeline: converter (pipeline.convert), multi-view loaders (pipeline.build_loader) and clip
loaders for video splits (pipeline.build_clip_loader, pipeline/loaders/clips.py).

Loader imports are lazy so that importing `pipeline.convert` (and its worker processes) does not pay
for torch / DALI / ffcv.
"""

__all__ = ["build_loader", "Batch", "RECIPES", "get_recipe", "RecipeSpec", "ViewSpec", "CropSpec", "JitterSpec",
           "BlurSpec", "RandAugmentSpec", "ColorSpec", "sample_params", "EpochSampler", "build_clip_loader",
           "CLIP_RECIPES", "get_clip_recipe", "ClipSpec", "TemporalSpec", "sample_clip_params"]


def __getattr__(name):
    if name == "build_loader":
        from pipeline.loaders.loader import build_loader
        return build_loader
    if name == "Batch":
        from pipeline.loaders.batch import Batch
        return Batch
    if name in ("RECIPES", "get_recipe"):
        from pipeline.views import recipes
        return getattr(recipes, name)
    if name in ("RecipeSpec", "ViewSpec", "CropSpec", "JitterSpec", "BlurSpec", "RandAugmentSpec", "ColorSpec"):
        from pipeline.views import spec
        return getattr(spec, name)
    if name == "sample_params":
        from pipeline.views.params import sample_params
        return sample_params
    if name in ("build_clip_loader", "CLIP_RECIPES", "get_clip_recipe", "ClipSpec", "TemporalSpec",
                "sample_clip_params"):
        from pipeline.loaders import clips
        return getattr(clips, name)
    if name == "EpochSampler":
        from pipeline.loaders.sampler import EpochSampler
        return EpochSampler
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
